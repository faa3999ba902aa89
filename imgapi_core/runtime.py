"""Running one job: claim it in the jobs table, do the work in a thread, record what happened.

The jobs table is the truth: a job is claimed there (queued -> running, with a lease the runner
keeps renewing), and finished there (done / failed with its error / unavailable with its reason /
queued again with a backoff). A job whose runner vanished is handed out again when its lease
lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from imgapi_core import imaging, metrics
from imgapi_core.errors import ClientError
from imgapi_core.media import Media, MediaMissing
from imgapi_core.settings import Settings
from imgapi_core.store import Store
from imgapi_core.thumbnails import OriginalGone, make_thumbnails

log = logging.getLogger("imgapi.jobs")

CAPTIONS_OFF = "captioning is off (CAPTION_MODEL=none)"
RETRY_CAPTIONS = "POST /api/jobs/retry?kind=caption"


def retry_delay(attempts: int) -> float:
    """Seconds before a job that failed (or lost its runner) on attempt N is tried again."""
    return min(60.0, 2.0**attempts)


class PermanentError(Exception):
    """A job error that running the job again cannot fix."""


class Unavailable(Exception):
    """The job cannot run in this process at all (captioning not installed, no model): it ends
    as `unavailable` with this reason. Not `failed`: nothing is wrong with the image, and its
    record must not look broken; the bulk retry takes it once the operator fixed the cause."""


def captions_unavailable_line(reason: str, retry_after_s: float) -> str:
    """The one log line that says why captions cannot run here and what to do about it."""
    return (
        f"captions unavailable: {reason}; caption jobs end as 'unavailable' until this is fixed, "
        f"then {RETRY_CAPTIONS} (a failed model load is tried again after "
        f"CAPTION_RETRY_SECONDS={retry_after_s:g}s)"
    )


def _yield_cpu() -> None:
    """Job threads run at a lower CPU priority (on Linux nice is per thread): where jobs share a
    process or machine with the API, uploads and the event loop get the cores first."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Runtime:
    """What one process needs to run jobs, and the bookkeeping around each run."""

    def __init__(self, settings: Settings, store: Store, media: Media) -> None:
        self.settings = settings
        self.store = store
        self.media = media
        self.runner_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.cpu = ThreadPoolExecutor(
            max_workers=os.cpu_count() or 2,
            thread_name_prefix="imgapi-job",
            initializer=_yield_cpu,
        )
        self._running: set[tuple[str, str]] = set()
        self._heartbeat: asyncio.Task | None = None
        self._captioner: Any = None
        # The reason last logged by captions_unavailable(): every caption job ends with the same
        # one, and a warning per job would bury the line that says what to fix.
        self._unavailable_logged: str | None = None

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
                on_batch=metrics.caption_batch,
            )
        return self._captioner

    def captions_unavailable(self, reason: str) -> None:
        """Logs why this process cannot caption, once per reason rather than once per job."""
        if reason == self._unavailable_logged:
            return
        self._unavailable_logged = reason
        log.warning(captions_unavailable_line(reason, self.settings.caption_retry_seconds))

    async def preload_captioner(self) -> None:
        """Loads the caption model now (in the captioner's own thread, never on the event loop),
        so the first caption job does not wait for it and the start-up log says at once when
        captions cannot run. Never raises: it runs in the background of a start-up."""
        from models.errors import CaptionError

        try:
            await self.captioner.load()
        except CaptionError as exc:  # every load failure is a CaptionUnavailable
            self.captions_unavailable(exc.message)
        except Exception as exc:  # e.g. closed while starting: the first caption job tries again
            log.warning("caption model not preloaded: %s: %s", type(exc).__name__, exc)

    async def run(self, kind: str, sha256: str) -> str:
        """Claims, runs and records one job; returns what happened (arq keeps it in its log).
        Counted here, where every runner (in-process, arq) passes, once its state is recorded."""
        started = time.perf_counter()
        state = await self._claim_and_run(kind, sha256)
        metrics.job_ran(kind, state, time.perf_counter() - started)
        return state

    async def _claim_and_run(self, kind: str, sha256: str) -> str:
        cfg = self.settings
        claim = asyncio.ensure_future(
            self.store.claim_job(sha256, kind, self.runner_id, cfg.job_lease_seconds)
        )
        try:
            job = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # Cancelled (shutdown, arq's timeout) while the claim ran: the store finishes a
            # write it has begun, so the job may be ours now. Handed back at once, or it would
            # sit as running until its lease lapsed, and count as a runner that died.
            with contextlib.suppress(Exception):
                if await asyncio.shield(claim) is not None:
                    await asyncio.shield(
                        self.store.retry_job(
                            sha256, kind, self.runner_id, "interrupted before it started", 0
                        )
                    )
            raise
        if job is None:
            current = await self.store.job_state(sha256, kind)
            return f"not run: {current.state if current else 'no such job'}"
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
        except Unavailable as exc:
            # Logged once by captions_unavailable(); no retries: the next try would fail the same
            # way until the operator acts, and then retries the jobs.
            await self.store.finish_job(sha256, kind, self.runner_id, "unavailable", str(exc))
            return "unavailable"
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
            delay = retry_delay(job.attempts)
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
            try:
                await make_thumbnails(
                    self.store, self.media, self.cpu, sha256, self.settings.thumb_formats
                )
            except OriginalGone:
                raise PermanentError("the original file is gone") from None
            except ClientError as exc:
                raise PermanentError(f"the image cannot be decoded: {exc.message}") from None
        elif kind == "exif":
            async with self._original(sha256) as path:
                exif = await self._in_thread(imaging.extract_exif, path)
            await self.store.set_exif(sha256, json.dumps(exif, allow_nan=False, sort_keys=True))
        elif kind == "caption":
            if not self.settings.captions_enabled:
                return "skipped"
            from models.errors import CaptionError, CaptionUnavailable

            async with self._original(sha256) as path:
                try:
                    caption = await self.captioner.caption(str(path))
                except CaptionUnavailable as exc:
                    self.captions_unavailable(exc.message)
                    raise Unavailable(exc.message) from None
                except CaptionError as exc:  # this image's fault: it cannot be captioned
                    raise PermanentError(str(exc)) from None
            await self.store.set_caption(sha256, caption)
        else:
            raise PermanentError(f"unknown job kind {kind!r}")
        return "done"

    @contextlib.asynccontextmanager
    async def _original(self, sha256: str) -> AsyncIterator[Path]:
        key = await self.store.original_of(sha256)
        if key is None:
            raise PermanentError("the original file is gone")
        try:
            async with self.media.local_file(key) as path:
                yield path
        except MediaMissing:
            raise PermanentError("the original file is gone") from None

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.cpu, fn, *args)
        except ClientError as exc:
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
