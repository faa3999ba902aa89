"""Background jobs: thumbnails, EXIF and captions, as arq job functions.

The same functions run three ways:
1. no REDIS_URL: in the API process (LocalRunner), no Redis needed;
2. REDIS_URL and WORKER=inline: the API enqueues to arq and runs an arq worker inside itself;
3. REDIS_URL and WORKER=off: the API only enqueues; `arq jobs.WorkerSettings` runs the workers.

Every job is `async def job(ctx, sha256)` and idempotent. The jobs table is the truth: a job is
claimed there (queued -> running, with a lease the runner keeps renewing), and finished there
(done / failed with its error / queued again with a backoff). A job whose runner vanished is
handed out again when its lease lapses, so nothing is lost to a dead worker or to Redis being down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker

import dispatch
import imaging
import settings as settings_mod
from logs import setup_logging
from settings import Settings
from store import JOB_KINDS, Store

log = logging.getLogger("imgapi.jobs")

CAPTIONS_OFF = "captioning is off (CAPTION_MODEL=none)"
ARQ_JOB_TIMEOUT_S = 300
# arq's own retry count: the jobs table decides retries; arq only re-runs after a worker death.
ARQ_MAX_TRIES = 1000


class PermanentError(Exception):
    """A job error that running the job again cannot fix."""


def _yield_cpu() -> None:
    """Job threads run at a lower CPU priority (on Linux nice is per thread): where jobs share a
    process or machine with the API, uploads and the event loop get the cores first."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Runtime:
    """What one process needs to run jobs, and the bookkeeping around each run."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.cpu = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 2,
            thread_name_prefix="imgapi-job",
            initializer=_yield_cpu,
        )
        self._running: set[tuple[str, str]] = set()
        self._heartbeat: asyncio.Task | None = None
        self._captioner: Any = None

    @property
    def captioner(self) -> Any:
        """One per process, built on first use; the model itself loads on the first caption."""
        if self._captioner is None:
            from models import Captioner

            cfg = self.settings
            self._captioner = Captioner(
                cfg.caption_model,
                device=cfg.caption_device,
                batch_size=cfg.caption_batch,
                max_wait_ms=cfg.caption_max_wait_ms,
                threads=cfg.caption_threads,
                token=cfg.hf_token or None,
                retry_after_s=cfg.caption_retry_seconds,
            )
        return self._captioner

    async def run(self, kind: str, sha256: str) -> str:
        """Claims, runs and records one job; returns what happened (arq keeps it in its log)."""
        cfg = self.settings
        job = await self.store.claim_job(sha256, kind, self.runner_id, cfg.job_lease_seconds)
        if job is None:
            row = await self.store.job_state(sha256, kind)
            return f"not run: {row['state'] if row else 'no such job'}"
        key = (sha256, kind)
        self._running.add(key)
        self._start_heartbeat()
        try:
            state = await self._work(kind, sha256)
        except asyncio.CancelledError:
            # Shutdown or arq's timeout: queued again at once for the next runner.
            await asyncio.shield(
                self.store.retry_job(
                    sha256, kind, self.runner_id, "interrupted before it finished", 0
                )
            )
            raise
        except PermanentError as exc:
            log.warning("%s job %s failed: %s", kind, sha256[:12], exc)
            await self.store.finish_job(sha256, kind, self.runner_id, "failed", str(exc))
            return "failed"
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            if job.attempts >= cfg.job_max_attempts:
                log.error(
                    "%s job %s failed after %d attempts: %s",
                    kind,
                    sha256[:12],
                    job.attempts,
                    message,
                )
                await self.store.finish_job(
                    sha256,
                    kind,
                    self.runner_id,
                    "failed",
                    f"{message} (gave up after {job.attempts} attempts)",
                )
                return "failed"
            delay = min(60.0, 2.0**job.attempts)
            log.warning(
                "%s job %s attempt %d failed, retrying in %.0fs: %s",
                kind,
                sha256[:12],
                job.attempts,
                delay,
                message,
            )
            await self.store.retry_job(sha256, kind, self.runner_id, message, delay)
            return "retrying"
        finally:
            self._running.discard(key)
        await self.store.finish_job(sha256, kind, self.runner_id, state)
        return state

    async def _work(self, kind: str, sha256: str) -> str:
        if kind == "thumbnail":
            source = await self._source(sha256)
            await self._in_thread(
                imaging.write_thumbnails, source, self.settings.thumbnails_dir, sha256
            )
        elif kind == "exif":
            source = await self._source(sha256)
            exif = await self._in_thread(imaging.extract_exif, source)
            await self.store.set_exif(sha256, json.dumps(exif, allow_nan=False, sort_keys=True))
        elif kind == "caption":
            if not self.settings.captions_enabled:
                return "skipped"
            from models import CaptionError

            source = await self._source(sha256)
            try:
                caption = await self.captioner.caption(source)
            except CaptionError as exc:
                raise PermanentError(str(exc)) from None
            await self.store.set_caption(sha256, caption)
        else:
            raise PermanentError(f"unknown job kind {kind!r}")
        return "done"

    async def _source(self, sha256: str) -> str:
        source = await self.store.original_of(sha256)
        if source is None or not Path(source).exists():
            raise PermanentError("the original file is gone")
        return source

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.cpu, fn, *args)
        except imaging.Rejected as exc:
            raise PermanentError(f"the image cannot be decoded: {exc.message}") from None

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._renew_leases(), name="imgapi-heartbeat")

    async def _renew_leases(self) -> None:
        lease = self.settings.job_lease_seconds
        while self._running:
            await asyncio.sleep(lease / 3)
            try:
                await self.store.renew_leases(self.runner_id, list(self._running), lease)
            except Exception as exc:
                log.warning("could not renew job leases: %s", exc)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._captioner is not None:
            await self._captioner.close()
        self.cpu.shutdown(wait=True, cancel_futures=True)


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
            lambda: dispatch.sweep(store, queue, None, min_age_s=max(5.0, cfg.sweep_seconds * 2)),
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


# -- the API's handle on jobs -------------------------------------------------------------------


class Jobs:
    """What the API uses: the first states of a new upload's jobs, submit after commit, health."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.runtime: Runtime | None = None
        self.local: dispatch.LocalRunner | None = None
        self.queue: dispatch.ArqQueue | None = None
        self._worker: Worker | None = None
        self._tasks: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []

    def initial_states(self) -> dict[str, tuple[str, str | None]]:
        """Each kind's first state for a new upload, with a note when it will not run."""
        states: dict[str, tuple[str, str | None]] = dict.fromkeys(JOB_KINDS, ("queued", None))
        if not self.settings.captions_enabled:
            states["caption"] = ("skipped", CAPTIONS_OFF)
        return states

    async def start(self) -> None:
        cfg = self.settings
        runs_jobs = cfg.worker == "inline"
        if runs_jobs:
            self.runtime = Runtime(cfg, self.store)
        if cfg.redis_url:
            self.queue = dispatch.ArqQueue(cfg.redis_url, cfg.arq_queue)
            if runs_jobs:
                self._background.append(asyncio.create_task(self._run_arq_worker()))
        elif runs_jobs:
            assert self.runtime is not None
            self.local = dispatch.LocalRunner(
                self.store, self.runtime.run, job_slots(cfg), idle_s=cfg.sweep_seconds
            )
            self.local.start()
        min_age = max(5.0, cfg.sweep_seconds * 2)
        self._background.append(
            asyncio.create_task(
                dispatch.sweep_forever(
                    cfg.sweep_seconds,
                    lambda: dispatch.sweep(self.store, self.queue, self.local, min_age_s=min_age),
                )
            )
        )
        if not cfg.captions_enabled:
            await self._skip_waiting_captions()

    async def _skip_waiting_captions(self) -> None:
        """Captions turned off after uploads queued them: those are skipped, not left waiting."""
        for job in await self.store.due_jobs(10_000):
            if job.kind == "caption":
                await self.store.skip_job(job.sha256, "caption", CAPTIONS_OFF)

    async def _run_arq_worker(self) -> None:
        """Mode 2: an arq worker inside the API process, restarted if Redis drops it."""
        assert self.runtime is not None
        options = worker_options(self.settings)
        for name in ("redis_settings", "redis_pool", "on_startup", "on_shutdown"):
            options.pop(name)
        while True:
            # Its own patient connections: arq closes the pool it was given when it stops.
            redis = dispatch.ArqQueue(
                self.settings.redis_url, self.settings.arq_queue, patient=True
            ).redis
            self._worker = Worker(
                **options, redis_pool=redis, handle_signals=False, ctx={"imgapi": self.runtime}
            )
            try:
                await self._worker.main()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "in-process arq worker stopped (%s: %s); restarting in 1s",
                    type(exc).__name__,
                    exc,
                )
                await redis.aclose()
                await asyncio.sleep(1)

    def submit(self, sha256: str) -> None:
        """After the upload's transaction committed: hand its jobs to a runner, without waiting."""
        if self.local is not None:
            self.local.wake()
        if self.queue is not None:
            task = asyncio.create_task(self._enqueue(sha256))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _enqueue(self, sha256: str) -> None:
        assert self.queue is not None
        kinds = [k for k, (state, _) in self.initial_states().items() if state == "queued"]
        try:
            await self.queue.enqueue((kind, sha256) for kind in kinds)
        except Exception as exc:
            # The rows are committed as queued: the sweeper enqueues them once Redis is back.
            log.warning(
                "could not enqueue jobs of %s (%s: %s); the sweeper will retry",
                sha256[:12],
                type(exc).__name__,
                exc,
            )

    async def ping(self) -> str | None:
        return await self.queue.ping() if self.queue is not None else None

    async def close(self) -> None:
        tasks = [*self._background, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._worker is not None:
            # Running jobs are interrupted; run() puts them back to queued for the next start.
            for task in list(self._worker.tasks.values()):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._worker.close()
        if self.local is not None:
            await self.local.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.queue is not None:
            await self.queue.close()
