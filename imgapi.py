"""imgapi: the Sanic app (create_app), its routes, the upload path, and the CLI.

python imgapi.py [--host 127.0.0.1] [--port 8000] [--workers N]
sanic imgapi:create_app --factory
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.exceptions import NotFound, SanicException
from sanic.response import file_stream, raw
from sanic_ext import openapi

import imaging
import openapi_spec
import records
import settings as settings_mod
import uploads
from jobs import Jobs
from logs import setup_logging
from settings import Settings
from store import Store, now_iso

log = logging.getLogger("imgapi")

THUMB_CACHE = "public, max-age=31536000, immutable"
ORPHAN_GRACE_S = 60.0
MAX_LIST_LIMIT = 1000
# Bytes beyond MAX_UPLOAD_BYTES that a multipart body may carry (boundaries, part headers).
MULTIPART_OVERHEAD = uploads.OVERHEAD


class ApiError(SanicException):
    """An error answered in the one JSON error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status_code=status)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> HTTPResponse:
    return raw(records.dumps(body), status=status, headers=headers, content_type="application/json")


def new_image_id() -> str:
    return secrets.token_hex(12)


def base_url(request: Request) -> str:
    configured: str = request.app.ctx.settings.public_url
    if configured:
        return configured
    return f"{request.scheme}://{request.host}"


# -- start-up and shut-down ---------------------------------------------------------------------


async def open_resources(app: Sanic) -> None:
    cfg: Settings = app.ctx.settings
    if cfg.slow_callback_ms:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)  # asyncio then logs every callback slower than the threshold
        loop.slow_callback_duration = cfg.slow_callback_ms / 1000
    for folder in (cfg.originals_dir, cfg.thumbnails_dir, cfg.tmp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    removed = uploads.sweep_temp_files(cfg.tmp_dir)
    if removed:
        log.info("removed %d upload temp files left by a stopped process", removed)
    app.ctx.store = await Store(cfg.db_path).open()
    app.ctx.cpu = ThreadPoolExecutor(
        max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="imgapi-cpu"
    )
    app.ctx.rendering = {}
    orphans = await remove_orphan_originals(app.ctx.store, cfg.originals_dir)
    if orphans:
        log.info("removed %d originals that no record refers to", orphans)
    app.ctx.jobs = Jobs(cfg, app.ctx.store)
    await app.ctx.jobs.start()


async def close_resources(app: Sanic) -> None:
    jobs = getattr(app.ctx, "jobs", None)
    if jobs is not None:
        await jobs.close()
    store = getattr(app.ctx, "store", None)
    if store is not None:
        await store.close()
    cpu = getattr(app.ctx, "cpu", None)
    if cpu is not None:
        cpu.shutdown(wait=True, cancel_futures=True)


async def remove_orphan_originals(store: Store, originals: Path) -> int:
    """Originals renamed into place by a process killed before its transaction committed.

    Only files older than a grace period go: a live sibling process may be between its rename and
    its commit right now.
    """
    known = await store.image_ids_with_files()
    return await asyncio.to_thread(_remove_unknown, originals, known, time.time() - ORPHAN_GRACE_S)


def _remove_unknown(folder: Path, known: set[str], cutoff: float) -> int:
    removed = 0
    for path in folder.iterdir():
        if path.stem in known:
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


# -- the upload path ----------------------------------------------------------------------------


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The upload body as it arrives. Sanic's REQUEST_TIMEOUT stops applying once a streaming
    handler runs, so silence (REQUEST_TIMEOUT) and the whole body (UPLOAD_TIMEOUT) are timed here:
    a stalled or trickling client gets a 408 instead of holding the connection."""
    cfg: Settings = request.app.ctx.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.upload_timeout
    while True:
        wait = min(cfg.request_timeout, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0)):
                chunk = await request.stream.read()
        except TimeoutError:
            if loop.time() >= deadline:
                message = f"upload not received within UPLOAD_TIMEOUT ({cfg.upload_timeout:g} s)"
            else:
                message = f"no data from the client for {cfg.request_timeout:g} s"
            raise imaging.Rejected(408, message) from None
        if chunk is None:
            return
        yield chunk


def store_original(temp: Path, dest: Path) -> None:
    """fsync, then rename: a file under originals/ is never partial."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, dest)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def validate_and_store(
    temp: Path, dest_dir: Path, image_id: str, max_pixels: int, known: imaging.ImageInfo | None
) -> tuple[imaging.ImageInfo, Path]:
    info = known or imaging.validate_image(temp, max_pixels)
    dest = dest_dir / f"{image_id}.{info.ext}"
    store_original(temp, dest)
    return info, dest


async def upload(request: Request) -> HTTPResponse:
    app = request.app
    cfg: Settings = app.ctx.settings
    store: Store = app.ctx.store
    start_time = now_iso()
    image_id = new_image_id()
    received = uploads.Received()
    try:
        too_big = cfg.max_upload_bytes + MULTIPART_OVERHEAD
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > too_big:
            raise uploads.TooLarge(cfg.max_upload_bytes)
        try:
            received = await uploads.receive(
                body_chunks(request),
                request.headers.get("content-type"),
                cfg.tmp_dir,
                cfg.max_upload_bytes,
                too_big,
            )
        except BaseException as exc:
            received = getattr(exc, "received", received)
            raise
        imaging.check_name_and_type(received.original_name, received.content_type)
        assert received.temp_path is not None
        # Bytes that were validated before are not decoded again: same bytes, same verdict.
        prior = await store.known_sha256(received.sha256)
        known = None
        if prior is not None:
            known = imaging.image_info(prior["format"], prior["width"], prior["height"])
        loop = asyncio.get_running_loop()
        info, dest = await loop.run_in_executor(
            app.ctx.cpu,
            validate_and_store,
            received.temp_path,
            cfg.originals_dir,
            image_id,
            cfg.max_pixels,
            known,
        )
        received.temp_path = None  # renamed into place; nothing left to discard
    except imaging.Rejected as exc:
        received.discard()
        if exc.status == 408:
            # Do not wait for the rest of a body that is not coming: close after the answer.
            request.stream.request_max_size = 0
            request.stream.keep_alive = False
        return await record_failure(
            request, image_id, received.original_name, start_time, exc.status, exc.message
        )
    except asyncio.CancelledError:
        received.discard()
        # The client went away mid-upload: still recorded, shielded from the cancellation.
        with contextlib.suppress(Exception):
            await asyncio.shield(
                store.record_failure(
                    image_id=image_id,
                    original_name=received.original_name,
                    processed_at=now_iso(),
                    start_time=start_time,
                    error="upload interrupted: the client closed the connection",
                )
            )
        raise
    except BaseException:
        received.discard()
        raise

    processed_at = now_iso()
    try:
        dispatch = await store.record_success(
            image_id=image_id,
            original_name=received.original_name,
            processed_at=processed_at,
            image_path=str(dest),
            start_time=start_time,
            sha256=received.sha256,
            width=info.width,
            height=info.height,
            fmt=info.format,
            size_bytes=received.size,
            kinds=app.ctx.jobs.initial_states(),
        )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise
    if dispatch:
        app.ctx.jobs.submit(received.sha256)
    row, jobs = await store.record_with_jobs(image_id)
    body = records.record(row, jobs, base_url(request))
    return json_response(body, status=201, headers={"Location": f"/api/images/{image_id}"})


async def record_failure(
    request: Request, image_id: str, original_name: str, start_time: str, status: int, message: str
) -> HTTPResponse:
    processed_at = now_iso()
    await request.app.ctx.store.record_failure(
        image_id=image_id,
        original_name=original_name,
        processed_at=processed_at,
        start_time=start_time,
        error=message,
    )
    log.info("upload %s (%r) rejected: %s", image_id, original_name, message)
    body = records.failure(
        message, image_id=image_id, original_name=original_name, processed_at=processed_at
    )
    return json_response(body, status=status)


# -- reading ------------------------------------------------------------------------------------


async def list_images(request: Request) -> HTTPResponse:
    store: Store = request.app.ctx.store
    args = request.args
    raw_limit = args.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    limit = int(raw_limit)
    status = args.get("status")
    if status not in (None, "success", "failed"):
        raise ApiError(400, "status must be success or failed")
    before = None
    if "cursor" in args:
        before = records.decode_cursor(args.get("cursor", ""))
        if before is None:
            raise ApiError(400, "cursor is not valid: use the Link header of the previous page")
    rows, jobs = await store.page_with_jobs(limit=limit + 1, before=before, status=status)
    more = len(rows) > limit
    rows = rows[:limit]
    base = base_url(request)
    body = [records.record(r, jobs.get(r["sha256"], {}), base) for r in rows]
    headers = {}
    if more:
        last = rows[-1]
        query = (
            f"limit={limit}&cursor={records.encode_cursor(last['processed_at'], last['image_id'])}"
        )
        if status:
            query += f"&status={status}"
        headers["Link"] = f'<{base}/api/images?{query}>; rel="next"'
    return json_response(body, headers=headers)


async def load_record(request: Request, image_id: str) -> Any:
    row = await request.app.ctx.store.get_record(image_id)
    if row is None:
        raise ApiError(404, f"no image with id {image_id!r}")
    return row


async def get_image(request: Request, image_id: str) -> HTTPResponse:
    row, jobs = await request.app.ctx.store.record_with_jobs(image_id)
    if row is None:
        raise ApiError(404, f"no image with id {image_id!r}")
    return json_response(records.record(row, jobs, base_url(request)))


async def get_thumbnail(request: Request, image_id: str, size: str) -> HTTPResponse:
    if size not in imaging.THUMB_SIZES:
        raise ApiError(400, f"size must be one of {', '.join(imaging.THUMB_SIZES)}")
    row = await load_record(request, image_id)
    if row["error"] is not None:
        raise ApiError(404, f"image {image_id!r} failed to upload: it has no thumbnails")
    sha256 = row["sha256"]
    etag = f'"{sha256}-{size}"'
    headers = {"ETag": etag, "Cache-Control": THUMB_CACHE}
    if etag in request.headers.get("if-none-match", ""):
        return HTTPResponse(status=304, headers=headers)
    cfg: Settings = request.app.ctx.settings
    path = imaging.thumbnail_path(cfg.thumbnails_dir, size, sha256)
    if not _has_content(path):
        await render_on_demand(request.app, sha256)
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(None, path.read_bytes)
    return raw(data, content_type="image/jpeg", headers=headers)


def _has_content(path: Path) -> bool:
    """False for a missing file, and for the empty one a crash can leave of an unsynced write."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


async def render_on_demand(app: Sanic, sha256: str) -> None:
    """The thumbnail job's own function, run now; concurrent requests share one rendering."""
    pending: dict[str, asyncio.Future] = app.ctx.rendering
    task = pending.get(sha256)
    if task is None:
        task = asyncio.ensure_future(_render(app, sha256))
        pending[sha256] = task
        task.add_done_callback(lambda _t: pending.pop(sha256, None))
    await asyncio.shield(task)


async def _render(app: Sanic, sha256: str) -> None:
    cfg: Settings = app.ctx.settings
    source = await app.ctx.store.original_of(sha256)
    if source is None or not Path(source).exists():
        raise ApiError(404, "the original of this image is gone")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(
            app.ctx.cpu, imaging.write_thumbnails, source, cfg.thumbnails_dir, sha256
        )
    except imaging.Rejected as exc:
        raise ApiError(422, f"thumbnail cannot be made: {exc.message}") from None


async def get_original(request: Request, image_id: str) -> HTTPResponse:
    row = await load_record(request, image_id)
    if row["error"] is not None:
        raise ApiError(404, f"image {image_id!r} failed to upload: nothing was stored")
    path = Path(row["image_path"])
    if not path.exists():
        raise ApiError(404, "the original of this image is gone")
    return await file_stream(
        path,
        mime_type=imaging.image_info(row["format"], row["width"], row["height"]).content_type,
        headers={"Cache-Control": THUMB_CACHE},
    )


async def delete_image(request: Request, image_id: str) -> HTTPResponse:
    cfg: Settings = request.app.ctx.settings
    deleted = await request.app.ctx.store.delete_image(image_id)
    if deleted is None:
        raise ApiError(404, f"no image with id {image_id!r}")
    if deleted.image_path:
        with contextlib.suppress(FileNotFoundError):
            Path(deleted.image_path).unlink()
    if deleted.last_reference and deleted.sha256:
        for size in imaging.THUMB_SIZES:
            with contextlib.suppress(FileNotFoundError):
                imaging.thumbnail_path(cfg.thumbnails_dir, size, deleted.sha256).unlink()
    return HTTPResponse(status=204)


async def stats(request: Request) -> HTTPResponse:
    raw_stats = await request.app.ctx.store.stats()
    total, failed = raw_stats["total"], raw_stats["failed"]
    rate = (total - failed) / total * 100 if total else 0.0
    average = raw_stats["average_processing_time_seconds"]
    jobs = raw_stats["jobs"]
    return json_response(
        {
            "total": total,
            "failed": failed,
            "success_rate": f"{rate:.2f}%",
            "average_processing_time_seconds": round(average, 3) if average is not None else 0,
            "processing": raw_stats["processing"],
            "queued_jobs": jobs.get("queued", 0) + jobs.get("running", 0),
            "failed_jobs": jobs.get("failed", 0),
            "jobs": {
                state: jobs.get(state, 0)
                for state in ("queued", "running", "done", "failed", "skipped")
            },
        }
    )


async def healthz(request: Request) -> HTTPResponse:
    checks: dict[str, str] = {}
    healthy = True
    try:
        async with asyncio.timeout(2):
            await request.app.ctx.store.ping()
        checks["database"] = "ok"
    except Exception as exc:
        healthy = False
        checks["database"] = f"error: {exc}"
    redis_state = await request.app.ctx.jobs.ping()
    if redis_state is not None:
        checks["redis"] = redis_state
        healthy = healthy and redis_state == "ok"
    checks["status"] = "ok" if healthy else "unavailable"
    return json_response(checks, status=200 if healthy else 503)


# -- errors -------------------------------------------------------------------------------------


async def handle_error(request: Request, exc: Exception) -> HTTPResponse:
    if isinstance(exc, SanicException):
        status = exc.status_code
        message = str(exc) or "error"
        if isinstance(exc, NotFound) and not isinstance(exc, ApiError):
            message = f"no route for {request.method} {request.path}"
    else:
        status, message = 500, "internal server error"
        log.exception("unhandled error on %s %s", request.method, request.path)
    return json_response(records.failure(message), status=status)


# -- the app ------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, own_resources: bool = True) -> Sanic:
    """One place builds the app: settings (default: environment and .env), routes, listeners.

    With own_resources=False the caller opens and closes the database, pools and job runner
    (open_resources / close_resources) itself: sanic-testing's ASGI client runs the server
    listeners around every single request, which would stop background jobs between requests.
    """
    cfg = settings or settings_mod.load()
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
    app.ext.openapi.raw(openapi_spec.SPEC)
    # The document is written out in openapi_spec.py; sanic-ext's per-route guesses would
    # replace its operations with bare "default" responses.
    for handler in (
        upload,
        list_images,
        get_image,
        delete_image,
        get_thumbnail,
        get_original,
        stats,
        healthz,
    ):
        openapi.exclude()(handler)

    app.add_route(upload, "/api/images", methods=["POST"], stream=True, name="upload")
    app.add_route(list_images, "/api/images", methods=["GET"], name="list_images")
    app.add_route(get_image, "/api/images/<image_id:str>", methods=["GET"], name="get_image")
    app.add_route(
        delete_image, "/api/images/<image_id:str>", methods=["DELETE"], name="delete_image"
    )
    app.add_route(
        get_thumbnail,
        "/api/images/<image_id:str>/thumbnails/<size:str>",
        methods=["GET"],
        name="get_thumbnail",
    )
    app.add_route(
        get_original, "/api/images/<image_id:str>/original", methods=["GET"], name="get_original"
    )
    app.add_route(stats, "/api/stats", methods=["GET"], name="stats")
    app.add_route(healthz, "/healthz", methods=["GET"], name="healthz")
    app.error_handler.add(Exception, handle_error)
    if own_resources:
        app.before_server_start(open_resources)
        app.after_server_stop(close_resources)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="imgapi: image upload and processing service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--dev", action="store_true", help="debug mode with auto-reload")
    args = parser.parse_args(argv)
    try:
        cfg = settings_mod.load()
    except settings_mod.SettingsError as exc:
        print(f"imgapi: bad setting: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    from sanic.worker.loader import AppLoader

    loader = AppLoader(factory=partial(create_app, cfg))
    app = loader.load()
    app.prepare(
        host=args.host,
        port=args.port,
        workers=args.workers,
        dev=args.dev,
        access_log=False,
        single_process=args.workers == 1 and not args.dev,
    )
    if args.workers == 1 and not args.dev:
        # One process: Sanic.serve would still add a manager process (and its memory).
        Sanic.serve_single(primary=app)
    else:
        Sanic.serve(primary=app, app_loader=loader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
