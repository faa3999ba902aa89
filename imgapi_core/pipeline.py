"""The upload pipeline without HTTP: receive the body, check name and type, validate the image,
store the original, record the upload (success or failure) and hand its jobs to a runner.

Cheapest check first: declared length, extension and MIME type (as soon as the file part's
headers arrive), size as bytes arrive, magic bytes, header dimensions against MAX_PIXELS, then a
real decode in a thread. Every outcome is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from imgapi_core import imaging, metrics, uploads
from imgapi_core.access import tokens
from imgapi_core.background import Jobs
from imgapi_core.errors import ClientError
from imgapi_core.media import Media, MediaUnavailable, OutOfSpace, original_key
from imgapi_core.numbers import whole_number
from imgapi_core.settings import Settings
from imgapi_core.store import NewUpload, Store, now_iso

log = logging.getLogger("imgapi")

T = TypeVar("T")

# Bytes beyond MAX_UPLOAD_BYTES that a multipart body may carry (boundaries, part headers).
MULTIPART_OVERHEAD = uploads.OVERHEAD


def new_image_id() -> str:
    return secrets.token_hex(12)


@dataclass(frozen=True)
class Outcome:
    """What became of one upload. `error` is None when it was stored."""

    image_id: str
    original_name: str
    processed_at: str
    error: ClientError | None = None
    delete_token: str | None = None  # for the uploader only: not kept, only its hash is


# Long enough for cancelled uploads to write their records; short enough not to hold a stop.
DRAIN_TIMEOUT_S = 10.0
INTERRUPTED_BY_CLIENT = "upload interrupted: the client closed the connection"
INTERRUPTED_BY_SHUTDOWN = "upload interrupted: the server was shutting down"


class Pipeline:
    def __init__(
        self, settings: Settings, store: Store, media: Media, cpu: Executor, jobs: Jobs
    ) -> None:
        self.settings = settings
        self.store = store
        self.media = media
        self.cpu = cpu
        self.jobs = jobs
        # A bare CancelledError does not say who cancelled: the server stopping (it cancels what
        # is still running once its graceful shutdown time is up) or the client leaving.
        self.shutting_down = False
        # Uploads in progress, and the records of those cut short: drain() waits for both.
        self._in_progress: set[asyncio.Task] = set()
        self._recording: set[asyncio.Task] = set()

    def begin_shutdown(self) -> None:
        """Called when the server begins to stop (Sanic's before_server_stop): uploads cancelled
        from now on are recorded as interrupted by the shutdown, not by their client."""
        self.shutting_down = True

    async def drain(self) -> None:
        """Waits, up to DRAIN_TIMEOUT_S, for the uploads in progress to end, the records of
        those cut short included. To be awaited on shutdown before the store closes: Sanic cancels
        the uploads still running when its graceful shutdown time is up, and their records are
        written after that, which a store closing at the same time would refuse or drop."""
        pending = (self._in_progress | self._recording) - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)

    @property
    def max_body_bytes(self) -> int:
        return self.settings.max_upload_bytes + MULTIPART_OVERHEAD

    async def ingest(
        self,
        chunks: AsyncIterator[bytes],
        content_type: str | None,
        declared_length: str | None = None,
    ) -> Outcome:
        """One upload from its multipart body to its record. Client errors are recorded and
        returned; a cancellation (the client left, or the server is stopping) is recorded, then
        re-raised."""
        task = asyncio.current_task()
        assert task is not None
        self._in_progress.add(task)
        try:
            return await self._ingest(chunks, content_type, declared_length)
        finally:
            self._in_progress.discard(task)

    async def _ingest(
        self, chunks: AsyncIterator[bytes], content_type: str | None, declared_length: str | None
    ) -> Outcome:
        cfg = self.settings
        store = self.store
        start_time = now_iso()
        started = time.perf_counter()  # for the metrics: a monotonic clock
        image_id = new_image_id()
        received = uploads.Received()
        try:
            too_big = self.max_body_bytes
            # A Content-Length that is not a number is left to the HTTP layer: the cap is also
            # enforced as the bytes arrive.
            declared = whole_number(declared_length)
            if declared is not None and declared > too_big:
                raise uploads.TooLarge(cfg.max_upload_bytes)
            try:
                # Also checks the file's name and type (imaging.check_name_and_type) as soon as
                # its part headers arrive, before any of its bytes are read or stored.
                received = await uploads.receive(
                    chunks,
                    content_type,
                    cfg.tmp_dir,
                    cfg.max_upload_bytes,
                    too_big,
                    cfg.allowed_formats,
                )
            except BaseException as exc:
                received = getattr(exc, "received", received)
                raise
            assert received.temp_path is not None
            # Bytes that were validated before are not decoded again: same bytes, same verdict.
            prior = await store.known_image(received.sha256)
            if prior is not None and prior.format in cfg.allowed_formats:
                info = imaging.image_info(
                    prior.format, prior.width, prior.height, prior.frames, prior.orientation
                )
            else:
                loop = asyncio.get_running_loop()
                info = await loop.run_in_executor(
                    self.cpu,
                    imaging.validate_image,
                    received.temp_path,
                    cfg.max_pixels,
                    cfg.max_frames,
                    cfg.allowed_formats,
                )
        except ClientError as exc:
            received.discard()
            failure = await self.record_failure(image_id, received.original_name, start_time, exc)
            metrics.upload_recorded(False, 0, time.perf_counter() - started)
            return failure
        except asyncio.CancelledError:
            received.discard()
            # The client went away, or the server is stopping: still recorded, shielded from the
            # cancellation.
            cause = INTERRUPTED_BY_SHUTDOWN if self.shutting_down else INTERRUPTED_BY_CLIENT
            await self._finish_shielded(
                store.record_failure(
                    image_id=image_id,
                    original_name=received.original_name,
                    processed_at=now_iso(),
                    start_time=start_time,
                    error=cause,
                ),
                suppress=True,
            )
            metrics.upload_recorded(False, 0, time.perf_counter() - started)
            raise
        except BaseException:
            received.discard()
            raise
        # The bytes are whole and valid: from here the upload is stored and recorded even if its
        # client leaves, as one task a cancellation cannot split. Cut in two, a commit could land
        # while the original it refers to was being removed, or a record of an interruption
        # could be written beside the record of the stored image.
        delete_token = tokens.new_delete_token()
        upload = NewUpload(
            image_id=image_id,
            original_name=received.original_name,
            processed_at="",  # stamped once the original is in place
            start_time=start_time,
            original_key=original_key(image_id, info.ext),
            sha256=received.sha256,
            width=info.width,
            height=info.height,
            format=info.format,
            size_bytes=received.size,
            frames=info.frames,
            orientation=info.orientation,
            jobs=self.jobs.initial_states(),
            delete_token_hash=tokens.hash_token(delete_token),
        )
        outcome = await self._finish_shielded(
            self._counted_when_done(self._store_and_record(received, upload), upload, started)
        )
        if outcome.error is None:
            outcome = dataclasses.replace(outcome, delete_token=delete_token)
        return outcome

    async def _finish_shielded(self, work: Awaitable[T], *, suppress: bool = False) -> T:
        """Runs `work` to its end whatever happens to the caller; drain() waits for it."""
        task = asyncio.ensure_future(work)
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        if suppress:
            with contextlib.suppress(Exception):
                return await asyncio.shield(task)
        return await asyncio.shield(task)

    @staticmethod
    async def _counted_when_done(
        work: Awaitable[Outcome], upload: NewUpload, started: float
    ) -> Outcome:
        """Counted inside the shielded task: an upload stored after its client left is still
        one (and one refused for want of space a failure)."""
        outcome = await work
        stored = outcome.error is None
        metrics.upload_recorded(stored, upload.size_bytes, time.perf_counter() - started)
        return outcome

    async def _store_and_record(self, received: uploads.Received, upload: NewUpload) -> Outcome:
        assert received.temp_path is not None
        try:
            staged = await self.media.stage_file(upload.original_key, received.temp_path)
        except OutOfSpace:
            received.discard()
            return await self.record_failure(
                upload.image_id, upload.original_name, upload.start_time, uploads.NoSpace()
            )
        except MediaUnavailable as exc:
            received.discard()
            log.warning("upload %s: %s", upload.image_id, exc)
            return await self.record_failure(
                upload.image_id,
                upload.original_name,
                upload.start_time,
                uploads.StorageUnavailable(),
            )
        except BaseException:
            received.discard()
            # A failed put may still have landed (a rename, then a failed folder fsync).
            with contextlib.suppress(Exception):
                await self.media.delete([upload.original_key])
            raise
        received.temp_path = None  # moved into the media store
        upload = dataclasses.replace(upload, processed_at=now_iso())
        try:
            dispatch = await self.store.record_success(upload)
        except BaseException:
            # Nothing refers to the original: it goes (and the start-up sweep catches it if
            # this process dies first).
            with contextlib.suppress(Exception):
                await self.media.discard(staged)
            raise
        try:
            await self.media.publish(staged)
        except Exception:
            # The record is committed and the bytes are stored (staged): the first read of the
            # original (its jobs, a client) publishes them, or else the next start-up sweep.
            log.exception("upload %s: stored, but could not publish its original", upload.image_id)
        if dispatch:
            self.jobs.submit(upload.sha256)
        return Outcome(upload.image_id, upload.original_name, upload.processed_at)

    async def record_failure(
        self, image_id: str, original_name: str, start_time: str, error: ClientError
    ) -> Outcome:
        processed_at = now_iso()
        try:
            await self.store.record_failure(
                image_id=image_id,
                original_name=original_name,
                processed_at=processed_at,
                start_time=start_time,
                error=error.message,
            )
        except Exception:
            if error.status != 507:
                raise
            # The database may sit on the disk that is full: the client still gets the 507 it
            # is owed, not a 500 about the record.
            log.exception("upload %s: could not record the failure %r", image_id, error.message)
            return Outcome(image_id, original_name, processed_at, error)
        log.info("upload %s (%r) rejected: %s", image_id, original_name, error.message)
        return Outcome(image_id, original_name, processed_at, error)
