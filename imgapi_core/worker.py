"""The arq side of the jobs: the job functions, the worker's options, its start-up and shut-down.

`arq jobs.WorkerSettings` (the entry point re-exports these) runs them in a worker process; the API
runs the same worker inside itself when REDIS_URL is set and WORKER=inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import socket
import sys
from collections.abc import ItemsView
from typing import Any

import redis
from arq.connections import RedisSettings

from imgapi_core import dispatch, formats, metrics, uploads
from imgapi_core import settings as settings_mod
from imgapi_core.events.notify import RedisNotifier, channel_name
from imgapi_core.logs import setup_logging
from imgapi_core.media import open_media
from imgapi_core.runtime import Runtime, retry_delay
from imgapi_core.settings import Settings, SettingsError
from imgapi_core.store import open_store

log = logging.getLogger("imgapi.jobs")

ARQ_JOB_TIMEOUT_S = 300
# arq's own retry count: the jobs table decides retries; arq only re-runs after a worker death.
ARQ_MAX_TRIES = 1000
# arq writes the health key this often, with a time to live one second longer.
HEALTH_CHECK_INTERVAL_S = 5


# -- arq job functions --------------------------------------------------------------------------


async def thumbnail_job(ctx: dict[str, Any], sha256: str) -> str:
    return await ctx["imgapi"].run("thumbnail", sha256)


async def exif_job(ctx: dict[str, Any], sha256: str) -> str:
    return await ctx["imgapi"].run("exif", sha256)


async def caption_job(ctx: dict[str, Any], sha256: str) -> str:
    return await ctx["imgapi"].run("caption", sha256)


FUNCTIONS = (thumbnail_job, exif_job, caption_job)


def job_slots(cfg: Settings) -> int:
    # Caption jobs mostly wait for their batch; they get slots of their own so a full batch can
    # form without starving thumbnails.
    return cfg.job_concurrency + (cfg.caption_batch if cfg.captions_enabled else 0)


def redis_settings(cfg: Settings) -> RedisSettings:
    # Many tries on the first connection: in compose, Redis may start after the worker.
    return dataclasses.replace(
        RedisSettings.from_dsn(cfg.redis_url), conn_retries=60, conn_retry_delay=1, conn_timeout=2
    )


def worker_options(cfg: Settings) -> dict[str, Any]:
    return {
        "functions": FUNCTIONS,
        "queue_name": cfg.arq_queue,
        # arq's --check reads redis_settings; the worker itself runs on the patient pool.
        "redis_settings": redis_settings(cfg) if cfg.redis_url else None,
        "redis_pool": (
            dispatch.ArqQueue(cfg.redis_url, cfg.arq_queue, patient=True).redis
            if cfg.redis_url
            else None
        ),
        "max_jobs": job_slots(cfg),
        "poll_delay": cfg.arq_poll_seconds,
        "job_timeout": ARQ_JOB_TIMEOUT_S,
        "keep_result": 0,  # results live in the jobs table; a finished id may be enqueued again
        "max_tries": ARQ_MAX_TRIES,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "health_check_key": health_check_key(cfg),
        "on_startup": worker_startup,
        "on_shutdown": worker_shutdown,
    }


async def worker_startup(ctx: dict[str, Any]) -> None:
    """`arq jobs.WorkerSettings`: this process's store, runtime and sweeper."""
    cfg = settings_mod.load()
    setup_logging(cfg.log_level)
    if cfg.worker_metrics_port:
        # First: a port in use stops the start before anything else is opened.
        try:
            ctx["imgapi_metrics"] = metrics.MetricsServer(cfg.worker_metrics_port)
        except OSError as exc:
            raise RuntimeError(f"WORKER_METRICS_PORT={cfg.worker_metrics_port}: {exc}") from exc
    store = await open_store(cfg)
    media = await open_media(cfg)
    # Jobs on S3 read originals through temp copies: a worker killed mid-job leaves one, and on
    # a host with workers only no API start-up would ever sweep it.
    if removed := await asyncio.to_thread(uploads.sweep_temp_files, cfg.tmp_dir):
        log.info("removed %d temp files left by stopped processes", removed)
    runtime = Runtime(cfg, store, media)
    queue = dispatch.ArqQueue(cfg.redis_url, cfg.arq_queue, redis=ctx["redis"])
    # This worker's job events reach the API processes (waiters, streams, webhooks) through it.
    notifier = RedisNotifier(cfg.redis_url, channel_name(cfg.arq_queue))
    if not cfg.database_url:  # PostgreSQL tells the API processes itself (LISTEN/NOTIFY)
        notifier.attach(store)
    ctx["imgapi_notifier"] = notifier
    ctx["imgapi"] = runtime
    ctx["imgapi_store"] = store
    ctx["imgapi_media"] = media
    ctx["imgapi_sweeper"] = asyncio.create_task(
        dispatch.sweep_forever(
            cfg.sweep_seconds,
            lambda: dispatch.sweep(
                store,
                queue,
                None,
                min_age_s=max(5.0, cfg.sweep_seconds * 2),
                max_attempts=cfg.job_max_attempts,
                backoff_s=retry_delay,
            ),
        )
    )
    if cfg.captions_enabled:
        # Loaded now rather than on the first job, in the background: a model that cannot load
        # must not keep the worker from starting. It logs once why captions are unavailable
        # (caption jobs then end as 'unavailable' with that reason).
        ctx["imgapi_preload"] = asyncio.create_task(runtime.preload_captioner())
    log.info(
        "worker %s started (queue %s, %d slots)", runtime.runner_id, cfg.arq_queue, job_slots(cfg)
    )


async def worker_shutdown(ctx: dict[str, Any]) -> None:
    for name in ("imgapi_sweeper", "imgapi_preload"):
        task = ctx.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    runtime = ctx.pop("imgapi", None)
    if runtime is not None:
        await runtime.close()
    for name in ("imgapi_store", "imgapi_media", "imgapi_notifier"):
        resource = ctx.pop(name, None)
        if resource is not None:
            await resource.close()
    server = ctx.pop("imgapi_metrics", None)
    if server is not None:
        await asyncio.to_thread(server.close)  # joins the server's thread


# -- health ----------------------------------------------------------------------------------


def health_check_key(cfg: Settings, host: str | None = None, pid: int | None = None) -> str:
    """One key per worker process: a worker that stops deletes its key, and with one key per host
    it would delete the key of every other worker on that host too."""
    return f"{_health_key_prefix(cfg, host)}{os.getpid() if pid is None else pid}"


def _health_key_prefix(cfg: Settings, host: str | None) -> str:
    return f"{cfg.arq_queue}:health-check:{socket.gethostname() if host is None else host}:"


def live_health_key(cfg: Settings, host: str | None = None) -> str | None:
    """A health key of a live worker on this host (arq lets it expire a second after its
    interval), or None. `--check` runs in a process of its own and cannot know the worker's pid."""
    pattern = _glob_escape(_health_key_prefix(cfg, host)) + "*"
    client = redis.Redis.from_url(cfg.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        key = next(client.scan_iter(match=pattern, count=1000), None)
    finally:
        client.close()
    return key.decode() if key is not None else None


def health(cfg: Settings) -> tuple[bool, str]:
    """Whether a worker of this host is alive, and what was found (for a one-line report)."""
    if not cfg.redis_url:
        return False, "REDIS_URL is empty, so no arq worker can run"
    try:
        key = live_health_key(cfg)
    except redis.RedisError as exc:
        return False, f"cannot reach Redis: {exc}"
    if key is None:
        return False, f"no live arq worker on {socket.gethostname()}"
    return True, f"arq worker alive ({key})"


def check_health(cfg: Settings) -> int:
    """`arq jobs.WorkerSettings --check`: 0 when a worker of this host is alive, else 1."""
    alive, what = health(cfg)
    if alive:
        print(f"imgapi: healthy: {what}")
        return 0
    print(f"imgapi: unhealthy: {what}", file=sys.stderr)
    return 1


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _arq_health_check() -> bool:
    # arq gives the settings no sign of why they are read; its command line decides by this flag.
    return "--check" in sys.argv[1:]


class _WorkerSettings(dict):
    """arq reads its worker settings with `.items()`: built from the environment when arq asks,
    so importing this module reads nothing and connects to nothing."""

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        try:
            cfg = settings_mod.load()
            if not cfg.redis_url:
                raise SettingsError(
                    "REDIS_URL is empty: `arq jobs.WorkerSettings` takes its jobs from Redis"
                )
            try:
                formats.check_thumbnail_encoders(cfg.thumb_formats)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        except SettingsError as exc:
            # arq would print a traceback; this is the service's one line, and exit status 2.
            settings_mod.exit_bad_setting(exc)
        if _arq_health_check():
            # `arq jobs.WorkerSettings --check`: arq's own check reads one fixed key, but each
            # worker process has its own (health_check_key), so this one answers it instead.
            raise SystemExit(check_health(cfg))
        return worker_options(cfg).items()


WorkerSettings = _WorkerSettings()
