"""The API's handle on jobs: the first states of a new upload's jobs, submit after commit, the
in-process runner or arq worker, the sweeper, and health.

The same job functions run three ways:
1. no REDIS_URL: in the API process (LocalRunner), no Redis needed;
2. REDIS_URL and WORKER=inline: the API enqueues to arq and runs an arq worker inside itself;
3. REDIS_URL and WORKER=off: the API only enqueues; `arq jobs.WorkerSettings` runs the workers.
"""

from __future__ import annotations

import asyncio
import logging

from arq.worker import Worker

from imgapi_core import dispatch
from imgapi_core.cancelling import bounded, cancel_all
from imgapi_core.media import Media
from imgapi_core.runtime import CAPTIONS_OFF, Runtime, retry_delay
from imgapi_core.settings import Settings
from imgapi_core.store import JOB_KINDS, Store
from imgapi_core.worker import job_slots, worker_options

log = logging.getLogger("imgapi.jobs")


class Jobs:
    """What the API uses: the first states of a new upload's jobs, submit after commit, health."""

    def __init__(self, settings: Settings, store: Store, media: Media) -> None:
        self.settings = settings
        self.store = store
        self.media = media
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
            self.runtime = Runtime(cfg, self.store, self.media)
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
        if self.runtime is not None and cfg.captions_enabled:
            # As the worker does: the model loads in the captioner's thread while the API
            # serves, and a model that cannot load is logged once, with what to do about it.
            self._background.append(
                asyncio.create_task(self.runtime.preload_captioner(), name="imgapi-caption-preload")
            )
        min_age = max(5.0, cfg.sweep_seconds * 2)
        self._background.append(
            asyncio.create_task(
                dispatch.sweep_forever(
                    cfg.sweep_seconds,
                    lambda: dispatch.sweep(
                        self.store,
                        self.queue,
                        self.local,
                        min_age_s=min_age,
                        max_attempts=cfg.job_max_attempts,
                        backoff_s=retry_delay,
                    ),
                )
            )
        )
        if not cfg.captions_enabled:
            await self._skip_waiting_captions()

    async def _skip_waiting_captions(self) -> None:
        """Captions turned off after uploads queued them: those are skipped, not left waiting."""
        skipped = await self.store.skip_queued("caption", CAPTIONS_OFF)
        if skipped:
            log.info("captions are off: %d queued caption jobs skipped", skipped)

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
        await cancel_all([*self._background, *self._tasks])
        if self._worker is not None:
            # Running jobs are interrupted; run() puts them back to queued for the next start.
            await cancel_all(list(self._worker.tasks.values()))
            # It deletes its health key through a patient connection: with Redis gone that
            # would retry for ever.
            await bounded(self._worker.close(), 5.0, "stopping the in-process arq worker")
        if self.local is not None:
            await self.local.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.queue is not None:
            await self.queue.close()
