"""The API's JSON shapes: a stored upload as a record, the one error shape, the list cursor."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from imgapi_core.imaging import THUMB_SIZES, display_size
from imgapi_core.store import JOB_KINDS, JobState, Record, all_finished


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


# Absolute URL of a path of this service (signed where access control asks for it).
Url = Callable[[str], str]


def thumbnail_urls(url: Url, image_id: str) -> dict[str, str]:
    return {size: url(f"/api/images/{image_id}/thumbnails/{size}") for size in THUMB_SIZES}


def job_states(jobs: Mapping[str, JobState]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in JOB_KINDS:
        job = jobs.get(kind)
        if job is None:
            continue
        state: dict[str, Any] = {"state": job.state, "attempts": job.attempts}
        # Why it ended without a result (an unavailable job: why captions cannot run), or why a
        # queued job is being tried again.
        if job.state in ("failed", "skipped", "unavailable") or (
            job.state == "queued" and job.error
        ):
            state["error"] = job.error
        out[kind] = state
    return out


def record(rec: Record, jobs: Mapping[str, JobState], url: Url) -> dict:
    """One upload as the API shows it: the upload answer's shape, for success and failure alike."""
    data: dict[str, Any] = {
        "image_id": rec.image_id,
        "original_name": rec.original_name,
        "processed_at": rec.processed_at,
    }
    if rec.error is not None:
        data.update(metadata={}, thumbnails={}, jobs={}, ready=True)
        return {"status": "failed", "data": data, "thumbnails": {}, "error": rec.error}
    exif = rec.exif_json
    orientation = rec.orientation or 1
    # The size it is shown at: a phone photo stored 4000x3000 with orientation 6 is 3000x4000.
    shown = display_size(rec.width or 0, rec.height or 0, orientation)
    data["metadata"] = {
        "width": rec.width,
        "height": rec.height,
        "display_width": shown[0],
        "display_height": shown[1],
        "orientation": orientation,
        "frames": rec.frames or 1,
        "format": rec.format,
        "size_bytes": rec.size_bytes,
        "sha256": rec.sha256,
        "first_upload": rec.first_upload,
        # Stored as JSON already: spliced in as it is rather than parsed and written again.
        "exif": orjson.Fragment(exif) if exif else None,
        "caption": rec.caption,
        # When it was taken, on the camera's clock (EXIF has no time zone): null when unknown.
        "taken_at": rec.taken_at,
    }
    thumbs = thumbnail_urls(url, rec.image_id)
    data["thumbnails"] = thumbs
    data["original"] = url(f"/api/images/{rec.image_id}/original")
    data["jobs"] = job_states(jobs)
    # Every job finished (done, failed, skipped, unavailable): nothing about it changes on its own.
    data["ready"] = all_finished(jobs)
    return {"status": "success", "data": data, "thumbnails": thumbs, "error": None}


def failure(
    error: str, *, image_id: str | None = None, original_name: str = "", processed_at: str = ""
) -> dict:
    """The one error shape. Upload failures carry the recorded upload in `data`."""
    data: dict[str, Any] | None = None
    if image_id is not None:
        data = {
            "image_id": image_id,
            "original_name": original_name,
            "processed_at": processed_at,
            "metadata": {},
            "thumbnails": {},
        }
    return {"status": "failed", "data": data, "error": error}


def encode_cursor(processed_at: str, image_id: str) -> str:
    raw = f"{processed_at}|{image_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    processed_at, sep, image_id = raw.partition("|")
    if not sep or not processed_at or not image_id:
        return None
    return processed_at, image_id
