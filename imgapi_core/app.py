"""The Sanic app: create_app assembles settings, blueprints, listeners and the one error handler;
open_resources / close_resources start and stop what a serving process holds."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from sanic import HTTPResponse, Request, Sanic
from sanic.exceptions import NotFound, SanicException
from sanic_ext import openapi

from imgapi_core import formats, metrics, openapi_spec, records
from imgapi_core import settings as settings_mod
from imgapi_core.access.guard import is_image_route, open_guard
from imgapi_core.background import Jobs
from imgapi_core.errors import ClientError
from imgapi_core.events.hub import EventHub
from imgapi_core.events.notify import RedisNotifier, channel_name
from imgapi_core.housekeeping import sweep_at_start
from imgapi_core.media import MediaUnavailable, open_media
from imgapi_core.pipeline import MULTIPART_OVERHEAD, Pipeline
from imgapi_core.routes import events, images, json_response, media, system, urls_on
from imgapi_core.routes import jobs as job_routes
from imgapi_core.routes import metrics as metrics_routes
from imgapi_core.routes import web as web_routes
from imgapi_core.routes import webhooks as webhook_routes
from imgapi_core.settings import Settings
from imgapi_core.store import StoreUnavailable, open_store
from imgapi_core.webhooks import WebhookSender

log = logging.getLogger("imgapi")

# The API's operations (each in the OpenAPI document); the gallery's page and files are not.
BLUEPRINTS = (
    images.bp,
    job_routes.bp,
    media.bp,
    system.bp,
    events.bp,
    webhook_routes.bp,
    metrics_routes.bp,
)
WEB_BLUEPRINT = web_routes.bp

# What a 503 for a database or object store that cannot be reached asks the client to wait.
UNAVAILABLE_RETRY_AFTER_S = 2


async def open_resources(app: Sanic) -> None:
    """Everything a serving process holds. On any failure what was opened is closed again before
    the error goes on: Sanic runs no after_server_stop for a server that never started, and
    the store's threads would keep the process alive."""
    cfg: Settings = app.ctx.settings
    try:
        if cfg.slow_callback_ms:
            loop = asyncio.get_running_loop()
            loop.set_debug(True)  # asyncio then logs every callback slower than the threshold
            loop.slow_callback_duration = cfg.slow_callback_ms / 1000
        try:
            cfg.tmp_dir.mkdir(parents=True, exist_ok=True)
            app.ctx.media = await open_media(cfg)
        except OSError as exc:
            # Names the setting to fix, not only the folder or bucket that failed.
            raise RuntimeError(f"{settings_mod.media_setting(cfg)}: {exc}") from exc
        try:
            app.ctx.store = await open_store(cfg)
        except Exception as exc:  # whatever the store refuses, its setting is the one to look at
            where = settings_mod.database_setting(cfg)
            raise RuntimeError(f"{where}: {exc or type(exc).__name__}") from exc
        app.ctx.cpu = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="imgapi-cpu"
        )
        app.ctx.rendering = {}
        host, unix = bind_address(app)
        app.ctx.guard = await open_guard(app.ctx.store, cfg, host, unix)
        await sweep_at_start(app.ctx.store, app.ctx.media, cfg.tmp_dir)
        # Before the jobs start: their first events are followed like every later one.
        # PostgreSQL wakes every process itself (LISTEN/NOTIFY); SQLite's other processes (arq
        # workers) publish their commits on Redis.
        notifier = (
            RedisNotifier(cfg.redis_url, channel_name(cfg.arq_queue))
            if cfg.redis_url and not cfg.database_url
            else None
        )
        app.ctx.events = EventHub(app.ctx.store, notifier, keep_s=cfg.events_keep_seconds)
        await app.ctx.events.start()
        app.ctx.jobs = Jobs(cfg, app.ctx.store, app.ctx.media)
        await app.ctx.jobs.start()
        if cfg.webhook_url:
            app.ctx.webhooks = WebhookSender(
                cfg,
                app.ctx.store,
                app.ctx.events,
                urls_on(service_base_url(app), app.ctx.guard),
                f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}",
            )
            await app.ctx.webhooks.start()
        app.ctx.pipeline = Pipeline(cfg, app.ctx.store, app.ctx.media, app.ctx.cpu, app.ctx.jobs)
    except BaseException:
        try:
            await close_resources(app)
        except Exception as exc:  # the first error is the one to report
            log.warning("closing after a failed start: %s: %s", type(exc).__name__, exc)
        raise


async def begin_shutdown(app: Sanic) -> None:
    """Uploads cancelled from now on are recorded as cut short by the shutdown; event streams end
    and waiters answer, rather than hold the server until its graceful-shutdown timeout."""
    app.ctx.stopping = True
    pipeline = getattr(app.ctx, "pipeline", None)
    if pipeline is not None:
        pipeline.begin_shutdown()
    events = getattr(app.ctx, "events", None)
    if events is not None:
        events.end_all()


async def close_resources(app: Sanic) -> None:
    pipeline = getattr(app.ctx, "pipeline", None)
    if pipeline is not None:
        # Records of uploads cancelled by the shutdown, before the store closes.
        await pipeline.drain()
    for name in ("webhooks", "jobs", "events"):
        resource = getattr(app.ctx, name, None)
        if resource is not None:
            await resource.close()
    for name in ("guard", "store", "media"):
        resource = getattr(app.ctx, name, None)
        if resource is not None:
            await resource.close()
    cpu = getattr(app.ctx, "cpu", None)
    if cpu is not None:
        cpu.shutdown(wait=True, cancel_futures=True)


def service_base_url(app: Sanic) -> str:
    """The base of URLs no request asked for (webhook bodies): PUBLIC_URL, else the address this
    server listens on (a wildcard address as loopback)."""
    cfg: Settings = app.ctx.settings
    if cfg.public_url:
        return cfg.public_url
    host, unix = bind_address(app)
    if unix or not host or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = app.state.port or 8000
    return f"http://{host}:{port}"


def bind_address(app: Sanic) -> tuple[str | None, bool]:
    """The address this server listens on, for AUTH=auto: (host, is a Unix socket). (None, False)
    where it is not known (an ASGI server): the guard then requires keys."""
    state = app.state
    if state.unix:
        return None, True
    for info in state.server_info:
        # With several server processes each gets the listening socket itself, not a host.
        sock = info.settings.get("sock")
        if sock is not None:
            if sock.family == socket.AF_UNIX:
                return None, True
            return sock.getsockname()[0], False
        if info.settings.get("unix"):
            return None, True
        host = info.settings.get("host")
        if host:
            return host, False
    return state.host or None, False


async def guard_request(request: Request) -> HTTPResponse | None:
    guard = getattr(request.app.ctx, "guard", None)
    if guard is None:  # before open_resources (cannot serve yet) or an app without resources
        return None
    return await guard.check(request)


# Images are served as what they are, never sniffed into something else, and a browser opening one
# directly runs nothing (an SVG or HTML polyglot would otherwise run as this origin).
MEDIA_HEADERS = {"Content-Security-Policy": "default-src 'none'; sandbox"}


async def close_when_stopping(request: Request, response: HTTPResponse) -> None:
    """Sanic closes the connections that are idle when a shutdown begins, then waits for the
    others up to its graceful timeout: one that goes idle meanwhile (a waiter answered) would
    hold the shutdown that long."""
    if getattr(request.app.ctx, "stopping", False) and request.stream is not None:
        request.stream.keep_alive = False


async def start_clock(request: Request) -> None:
    request.ctx.started = time.perf_counter()


async def count_request(request: Request, response: HTTPResponse) -> None:
    """Every answer, refusals and errors too, by route name (never the path: it holds ids)."""
    started = getattr(request.ctx, "started", None)
    seconds = time.perf_counter() - started if started is not None else None
    route = request.route.name if request.route is not None else None
    metrics.http_answered(route, request.method, response.status, seconds)


async def security_headers(request: Request, response: HTTPResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    route = request.route
    if route is not None and is_image_route(route.name):
        for name, value in MEDIA_HEADERS.items():
            response.headers.setdefault(name, value)


async def handle_error(request: Request, exc: Exception) -> HTTPResponse:
    """The one error handler: every error, ours or Sanic's, in the one JSON shape."""
    if isinstance(exc, ClientError):
        status, message = exc.status, exc.message
    elif isinstance(exc, SanicException):
        status = exc.status_code
        message = str(exc) or "error"
        if isinstance(exc, NotFound):
            message = f"no route for {request.method} {request.path}"
    elif isinstance(exc, StoreUnavailable | MediaUnavailable):
        # A database or object store restarting is not a bug of this request: the client may
        # send it again in a moment, and nothing of it was kept.
        log.warning("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
        what = "database" if isinstance(exc, StoreUnavailable) else "media storage"
        return json_response(
            records.failure(f"the {what} is unavailable; try again shortly"),
            status=503,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )
    else:
        status, message = 500, "internal server error"
        log.exception("unhandled error on %s %s", request.method, request.path)
    return json_response(records.failure(message), status=status)


def with_codecs_at_hand(cfg: Settings) -> Settings:
    """Settings fitted to this Pillow. THUMB_FORMATS naming what it cannot encode is a bad
    setting. ALLOWED_FORMATS loses what it cannot decode, with a warning: an upload of such a
    format is then a 415 naming what is accepted, not a 400 that blames the file."""
    try:
        formats.check_thumbnail_encoders(cfg.thumb_formats)
    except ValueError as exc:
        settings_mod.exit_bad_setting(settings_mod.SettingsError(str(exc)))
    missing = formats.missing_codecs(cfg.allowed_formats)
    if not missing:
        return cfg
    usable = tuple(name for name in cfg.allowed_formats if name not in missing)
    if not usable:
        settings_mod.exit_bad_setting(
            settings_mod.SettingsError(
                f"ALLOWED_FORMATS={','.join(cfg.allowed_formats)!r}: this Pillow cannot decode"
                f" {', '.join(missing)}"
            )
        )
    log.warning(
        "not accepting %s uploads: this Pillow has no codec for them (Pillow's wheels do)",
        ", ".join(missing),
    )
    return cfg.replace(allowed_formats=usable)


def create_app(settings: object = None, *, own_resources: bool = True) -> Sanic:
    """One place builds the app: settings (default: environment and .env), routes, listeners.

    `settings` is used only when it is a Settings: `sanic imgapi:create_app --factory` calls the
    factory with its own argparse namespace as the first argument, which is not ours to read.
    Settings read here are read as by a command line: a bad one is one line on stderr and exit
    status 2 (Sanic's command line would log a ValueError with its traceback and exit 0).

    With own_resources=False the caller opens and closes the database, pools and job runner
    (open_resources / close_resources) itself: sanic-testing's ASGI client runs the server
    listeners around every single request, which would stop background jobs between requests.
    """
    cfg = settings if isinstance(settings, Settings) else settings_mod.load_or_exit()
    cfg = with_codecs_at_hand(cfg)
    app = Sanic("imgapi", dumps=lambda v: records.dumps(v).decode())
    app.ctx.settings = cfg
    app.config.REQUEST_TIMEOUT = cfg.request_timeout
    # Uploads time their own body (body_chunks); Sanic's response timer must not fire first.
    app.config.RESPONSE_TIMEOUT = cfg.upload_timeout + cfg.request_timeout + 60
    # Streamed uploads enforce their own cap. After an early 413 Sanic reads and drops the rest of
    # the body up to this size before closing, so a client that sends its whole body before
    # reading the answer (most do) gets the 413 rather than a connection reset; past it, the
    # connection is cut.
    app.config.REQUEST_MAX_SIZE = 2 * cfg.max_upload_bytes + MULTIPART_OVERHEAD
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.OAS_URL_PREFIX = "/docs"
    # sanic-ext's CORS: no origin is allowed unless CORS_ORIGINS names it.
    app.config.CORS_ORIGINS = ",".join(cfg.cors_origins)
    app.config.CORS_ALLOW_HEADERS = "authorization,x-api-key,x-delete-token,content-type"
    app.config.CORS_EXPOSE_HEADERS = "location,link,retry-after"
    app.ext.openapi.raw(openapi_spec.SPEC)
    for bp in BLUEPRINTS:
        # The document is written out in openapi_spec.py; sanic-ext's per-route guesses would
        # replace its operations with bare "default" responses.
        for future in bp._future_routes:
            openapi.exclude()(future.handler)
        app.blueprint(bp)
    app.blueprint(WEB_BLUEPRINT)  # its handlers exclude themselves from the document
    app.error_handler.add(Exception, handle_error)
    # Before the guard: its refusals are answers to time too.
    app.on_request(start_clock, priority=200)
    app.on_request(guard_request, priority=100)
    app.on_response(count_request)
    app.on_response(security_headers)
    app.on_response(close_when_stopping)
    if own_resources:
        app.before_server_start(open_resources)
        app.before_server_stop(begin_shutdown)
        app.after_server_stop(close_resources)
    return app
