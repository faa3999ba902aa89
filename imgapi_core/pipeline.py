"""The upload pipeline without HTTP: receive the body, check name and type, validate the image,
store the original, record the upload (success or failure) and hand its jobs to a runner.

Cheapest check first: declared length, extension and MIME type (as soon as the file part's
headers arrive), size as bytes arrive, magic bytes, header dimensions against MAX_PIXELS, then a
real decode in a thread. Every outcome is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from imgapi_core import imaging, uploads
from imgapi_core.background import Jobs
from imgapi_core.errors import ClientError
from imgapi_core.settings import Settings
from imgapi_core.store import Store, now_iso

log = logging.getLogger("imgapi")

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


def store_original(temp: Path, dest: Path) -> None:
    """fsync, then rename: a file under originals/ is never partial."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, dest)
    try:
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        # The rename may not last, and the upload is answered as failed: no file under originals/
        # without its record.
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise


def validate_and_store(
    temp: Path, dest_dir: Path, image_id: str, max_pixels: int, known: imaging.ImageInfo | None
) -> tuple[imaging.ImageInfo, Path]:
    """Raises uploads.NoSpace (507) when the disk is full; the caller removes the temp file."""
    info = known or imaging.validate_image(temp, max_pixels)
    dest = dest_dir / f"{image_id}.{info.ext}"
    try:
        store_original(temp, dest)
    except OSError as exc:
        # fsync is where a full disk shows for data the page cache accepted (delayed allocation,
        # network file systems); a rename can need a new directory block.
        if uploads.is_no_space(exc):
            raise uploads.NoSpace() from exc
        raise
    return info, dest


# Long enough for cancelled uploads to write their records; short enough not to hold a stop.
DRAIN_TIMEOUT_S = 10.0
INTERRUPTED_BY_CLIENT = "upload interrupted: the client closed the connection"
INTERRUPTED_BY_SHUTDOWN = "upload interrupted: the server was shutting down"


class Pipeline:
    def __init__(self, settings: Settings, store: Store, cpu: Executor, jobs: Jobs) -> None:
        self.settings = settings
        self.store = store
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
        image_id = new_image_id()
        received = uploads.Received()
        try:
            too_big = self.max_body_bytes
            # A Content-Length that is not a number is left to the HTTP layer: the cap is also
            # enforced as the bytes arrive.
            declared = uploads.whole_number(declared_length)
            if declared is not None and declared > too_big:
                raise uploads.TooLarge(cfg.max_upload_bytes)
            try:
                # Also checks the file's name and type (imaging.check_name_and_type) as soon as
                # its part headers arrive, before any of its bytes are read or stored.
                received = await uploads.receive(
                    chunks, content_type, cfg.tmp_dir, cfg.max_upload_bytes, too_big
                )
            except BaseException as exc:
                received = getattr(exc, "received", received)
                raise
            assert received.temp_path is not None
            # Bytes that were validated before are not decoded again: same bytes, same verdict.
            prior = await store.known_sha256(received.sha256)
            known = None
            if prior is not None:
                known = imaging.image_info(prior["format"], prior["width"], prior["height"])
            loop = asyncio.get_running_loop()
            info, dest = await loop.run_in_executor(
                self.cpu,
                validate_and_store,
                received.temp_path,
                cfg.originals_dir,
                image_id,
                cfg.max_pixels,
                known,
            )
            received.temp_path = None  # renamed into place; nothing left to discard
        except ClientError as exc:
            received.discard()
            return await self.record_failure(image_id, received.original_name, start_time, exc)
        except asyncio.CancelledError:
            received.discard()
            # The client went away, or the server is stopping: still recorded, shielded from the
            # cancellation.
            cause = INTERRUPTED_BY_SHUTDOWN if self.shutting_down else INTERRUPTED_BY_CLIENT
            record = asyncio.ensure_future(
                store.record_failure(
                    image_id=image_id,
                    original_name=received.original_name,
                    processed_at=now_iso(),
                    start_time=start_time,
                    error=cause,
                )
            )
            self._recording.add(record)
            record.add_done_callback(self._recording.discard)
            with contextlib.suppress(Exception):
                await asyncio.shield(record)
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
                kinds=self.jobs.initial_states(),
            )
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise
        if dispatch:
            self.jobs.submit(received.sha256)
        return Outcome(image_id, received.original_name, processed_at)

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
