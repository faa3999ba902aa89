"""The API's JSON shapes: a stored upload as a record, the one error shape, the list cursor."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from imgapi_core.imaging import THUMB_SIZES
from imgapi_core.store import JOB_KINDS


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def thumbnail_urls(base_url: str, image_id: str) -> dict[str, str]:
    return {size: f"{base_url}/api/images/{image_id}/thumbnails/{size}" for size in THUMB_SIZES}


def job_states(jobs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in JOB_KINDS:
        row = jobs.get(kind)
        if row is None:
            continue
        state: dict[str, Any] = {"state": row["state"], "attempts": row["attempts"]}
        if row["state"] in ("failed", "skipped") or (row["state"] == "queued" and row["error"]):
            state["error"] = row["error"]
        out[kind] = state
    return out


def record(row: Mapping[str, Any], jobs: Mapping[str, Mapping[str, Any]], base_url: str) -> dict:
    """One upload as the API shows it: the upload answer's shape, for success and failure alike."""
    data: dict[str, Any] = {
        "image_id": row["image_id"],
        "original_name": row["original_name"],
        "processed_at": row["processed_at"],
    }
    if row["error"] is not None:
        data.update(metadata={}, thumbnails={}, jobs={})
        return {"status": "failed", "data": data, "thumbnails": {}, "error": row["error"]}
    exif = row["exif_json"]
    data["metadata"] = {
        "width": row["width"],
        "height": row["height"],
        "format": row["format"],
        "size_bytes": row["size_bytes"],
        "sha256": row["sha256"],
        "first_upload": row["first_upload"],
        # Stored as JSON already: spliced in as it is rather than parsed and written again.
        "exif": orjson.Fragment(exif) if exif else None,
        "caption": row["caption"],
    }
    thumbs = thumbnail_urls(base_url, row["image_id"])
    data["thumbnails"] = thumbs
    data["jobs"] = job_states(jobs)
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
