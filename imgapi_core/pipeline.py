"""The upload pipeline without HTTP: receive the body, check name and type, validate the image,
store the original, record the upload (success or failure) and hand its jobs to a runner.

Cheapest check first: size as bytes arrive, extension and MIME type, magic bytes, header
dimensions against MAX_PIXELS, then a real decode in a thread. Every outcome is recorded.
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


class Pipeline:
    def __init__(self, settings: Settings, store: Store, cpu: Executor, jobs: Jobs) -> None:
        self.settings = settings
        self.store = store
        self.cpu = cpu
        self.jobs = jobs

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
        returned; a cancellation (the client left) is recorded, then re-raised."""
        cfg = self.settings
        store = self.store
        start_time = now_iso()
        image_id = new_image_id()
        received = uploads.Received()
        try:
            too_big = self.max_body_bytes
            if declared_length and declared_length.isdigit() and int(declared_length) > too_big:
                raise uploads.TooLarge(cfg.max_upload_bytes)
            try:
                received = await uploads.receive(
                    chunks, content_type, cfg.tmp_dir, cfg.max_upload_bytes, too_big
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
        await self.store.record_failure(
            image_id=image_id,
            original_name=original_name,
            processed_at=processed_at,
            start_time=start_time,
            error=error.message,
        )
        log.info("upload %s (%r) rejected: %s", image_id, original_name, error.message)
        return Outcome(image_id, original_name, processed_at, error)
