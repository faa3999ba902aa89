"""How a queued job reaches a runner: the jobs table is the truth, these only hand jobs out.

- LocalRunner: the in-process runner (no Redis): takes due jobs from the table, runs them.
- ArqQueue: enqueues to arq with deterministic job ids; clears what a dead worker held.
- sweep(): every few seconds, jobs that no runner holds are handed out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from imgapi_core.store import Job, Store, StoreUnavailable
from imgapi_core.timestamps import now_iso

log = logging.getLogger("imgapi.jobs")

RunJob = Callable[[str, str], Awaitable[object]]


def job_id(kind: str, sha256: str) -> str:
    """One arq job per (kind, sha256): a second enqueue of the same work is a no-op."""
    return f"imgapi:{kind}:{sha256}"


def function_name(kind: str) -> str:
    return f"{kind}_job"


class LocalRunner:
    """Runs due jobs of the table in this process, at most `concurrency` at a time."""

    def __init__(self, store: Store, run: RunJob, concurrency: int, idle_s: float) -> None:
        self.store = store
        self.run = run
        self.concurrency = concurrency
        self.idle_s = idle_s
        self._wake = asyncio.Event()
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="imgapi-local-runner")

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # before looking, so a wake during the query is not lost
            try:
                await self._fill()
            except StoreUnavailable as exc:  # a database restarting: nothing to debug here
                log.warning("in-process runner could not read due jobs (will retry): %s", exc)
            except Exception:
                log.exception("in-process runner could not read due jobs; retrying")
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
                # that close() sends when a wake-up lands in the same loop iteration.
                async with asyncio.timeout(self.idle_s):
                    await self._wake.wait()

    async def _fill(self) -> None:
        free = self.concurrency - len(self._tasks)
        if free <= 0:
            return
        for job in await self.store.due_jobs(free + len(self._tasks)):
            key = (job.kind, job.sha256)
            if key in self._tasks:
                continue
            task = asyncio.create_task(self._run_one(job), name=f"imgapi-job-{job.kind}")
            self._tasks[key] = task
            task.add_done_callback(lambda _t, key=key: self._done(key))
            free -= 1
            if free == 0:
                break

    async def _run_one(self, job: Job) -> None:
        try:
            await self.run(job.kind, job.sha256)
        except StoreUnavailable as exc:
            # run() could not record the outcome: the job's lease lapses and the sweep hands it
            # out again once the database is back.
            log.warning("job %s %s: %s (its lease will lapse)", job.kind, job.sha256[:12], exc)
        except Exception:  # run() records its own failures; this is a last resort
            log.exception("job %s %s crashed its runner task", job.kind, job.sha256)

    def _done(self, key: tuple[str, str]) -> None:
        self._tasks.pop(key, None)
        self._wake.set()

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


class ArqQueue:
    """The arq side of dispatch. Connects lazily. By default it fails fast: Redis being down must
    never hold up an upload (the job row is already committed; the sweeper enqueues it later).
    A `patient` one, for arq workers, retries every command until Redis is back: arq's worker
    loop does not survive a failed Redis call, so it must never see one."""

    def __init__(
        self, url: str, queue_name: str, redis: ArqRedis | None = None, *, patient: bool = False
    ) -> None:
        self.url = url
        self.queue_name = queue_name
        self.patient = patient
        self._redis = redis
        self._owned = redis is None

    @property
    def redis(self) -> ArqRedis:
        if self._redis is None:
            retry: dict = {}
            if self.patient:
                retry = {
                    "retry": Retry(ExponentialBackoff(cap=2, base=0.1), -1),
                    "retry_on_error": [RedisConnectionError, RedisTimeoutError, OSError],
                }
            pool = ConnectionPool.from_url(
                self.url,
                socket_connect_timeout=2,
                socket_timeout=10,
                health_check_interval=30,
                **retry,
            )
            self._redis = ArqRedis(connection_pool=pool, default_queue_name=self.queue_name)
        return self._redis

    async def enqueue(self, jobs: Iterable[tuple[str, str]]) -> int:
        """(kind, sha256) pairs; returns how many were new to arq."""
        added = 0
        for kind, sha256 in jobs:
            job = await self.redis.enqueue_job(
                function_name(kind),
                sha256,
                _job_id=job_id(kind, sha256),
                _queue_name=self.queue_name,
            )
            added += job is not None
        return added

    async def hand_out(self, jobs: list[Job]) -> int:
        """Jobs the table says nobody holds: any in-progress mark a dead worker left is cleared,
        and the ones arq does not know (lost with Redis, or never enqueued) are enqueued."""
        if not jobs:
            return 0
        ids = [job_id(j.kind, j.sha256) for j in jobs]
        async with self.redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.exists(job_key_prefix + jid)
            known = await pipe.execute()
        missing = [j for j, present in zip(jobs, known, strict=True) if not present]
        await self.redis.delete(*(in_progress_key_prefix + jid for jid in ids))
        return await self.enqueue((j.kind, j.sha256) for j in missing)

    async def ping(self) -> str:
        try:
            async with asyncio.timeout(2):
                await self.redis.ping()
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"
        return "ok"

    async def close(self) -> None:
        if self._redis is not None and self._owned:
            await self._redis.aclose()
        self._redis = None


async def sweep(
    store: Store,
    queue: ArqQueue | None,
    local: LocalRunner | None,
    *,
    min_age_s: float,
    max_attempts: int,
    backoff_s: Callable[[int], float],
    limit: int = 200,
) -> tuple[int, int]:
    """One pass: running jobs whose lease lapsed go back to queued after a backoff (or fail once
    their attempts are used up); queued, due jobs that have waited longer than `min_age_s` (fresh
    ones are in flight already) are handed out again. Returns (lapsed, handed out)."""
    lapsed = await store.release_lapsed(max_attempts, backoff_s)
    if lapsed:
        log.warning("%d running jobs lost their runner; queued again", len(lapsed))
    handed = 0
    if queue is not None:
        stale = await store.due_jobs(limit, updated_before=now_iso(ago_s=min_age_s))
        handed = await queue.hand_out(stale)
    if local is not None and lapsed:
        local.wake()
    return len(lapsed), handed


async def sweep_forever(interval_s: float, once: Callable[[], Awaitable[object]]) -> None:
    """Runs `once` every interval; its errors (Redis or the database away) are logged, not fatal."""
    while True:
        try:
            await once()
        except Exception as exc:
            log.warning("job sweep failed (will retry): %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(interval_s)
