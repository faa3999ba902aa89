"""The arq side of the jobs: the job functions, the worker's options, its start-up and shut-down.

`arq jobs.WorkerSettings` (the entry point re-exports these) runs them in a worker process; the API
runs the same worker inside itself when REDIS_URL is set and WORKER=inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from typing import Any

from arq.connections import RedisSettings

from imgapi_core import dispatch
from imgapi_core import settings as settings_mod
from imgapi_core.logs import setup_logging
from imgapi_core.runtime import Runtime, retry_delay
from imgapi_core.settings import Settings
from imgapi_core.store import Store

log = logging.getLogger("imgapi.jobs")

ARQ_JOB_TIMEOUT_S = 300
# arq's own retry count: the jobs table decides retries; arq only re-runs after a worker death.
ARQ_MAX_TRIES = 1000


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
        "health_check_interval": 5,
        # One key per worker host: scaled workers share a queue, and a worker that stops deletes
        # its key (`arq --check` runs in the worker's own container, so it reads the same name).
        "health_check_key": f"{cfg.arq_queue}:health-check:{socket.gethostname()}",
        "on_startup": worker_startup,
        "on_shutdown": worker_shutdown,
    }


async def worker_startup(ctx: dict[str, Any]) -> None:
    """`arq jobs.WorkerSettings`: this process's store, runtime and sweeper."""
    cfg = settings_mod.load()
    setup_logging(cfg.log_level)
    store = await Store(cfg.db_path).open()
    runtime = Runtime(cfg, store)
    queue = dispatch.ArqQueue(cfg.redis_url, cfg.arq_queue, redis=ctx["redis"])
    ctx["imgapi"] = runtime
    ctx["imgapi_store"] = store
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
        # fails caption jobs with its error; it must not keep the worker from starting.
        ctx["imgapi_preload"] = asyncio.create_task(_preload(runtime))
    log.info(
        "worker %s started (queue %s, %d slots)", runtime.runner_id, cfg.arq_queue, job_slots(cfg)
    )


async def _preload(runtime: Runtime) -> None:
    from models import CaptionError

    try:
        await runtime.captioner.load()
    except CaptionError as exc:
        log.warning("caption model not loaded: %s", exc)


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
    store = ctx.pop("imgapi_store", None)
    if store is not None:
        await store.close()


class _WorkerSettings(dict):
    """arq reads its worker settings with `.items()`: built from the environment when arq asks,
    so importing this module reads nothing and connects to nothing."""

    def items(self):  # type: ignore[override]
        return worker_options(settings_mod.load()).items()


WorkerSettings = _WorkerSettings()
