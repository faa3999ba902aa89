"""Helpers for the job tests that drive the in-process app through sanic-testing's ASGI client
(api/test_jobs.py, api/test_exif_thumbs_jobs.py, api/test_media_keys.py, system/test_jobs_arq.py):
corpus photos, uploads, waiting for jobs, and the database and stored media read directly (on
either engine: db_query, media_view)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import db_query
import media_view
from conftest import corpus_folder, multipart, wait_for
from sanic_testing.testing import SanicASGITestClient

from imgapi_core.media import thumbnail_key
from imgapi_core.settings import Settings

FINISHED = ("done", "failed", "skipped", "unavailable")
# A small camera JPEG with EXIF (Make FUJIFILM), 1200x800: both thumbnail sizes are real resizes.
SMALL_PHOTO = "fujifilm-x100f-seed.jpg"


def photo_bytes(name: str) -> bytes:
    return (corpus_folder("photos") / name).read_bytes()


def unique_jpeg(data: bytes, tag: str | None = None) -> bytes:
    """The same JPEG with a COM segment after SOI: new bytes (new sha256), same pixels."""
    payload = (tag or uuid.uuid4().hex).encode()
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def db_rows(cfg: Settings, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    """Reads the app's database directly, on a connection of its own."""
    return db_query.fetch(cfg, sql, params)


def db_write(cfg: Settings, sql: str, params: Iterable[Any] = ()) -> int:
    return db_query.execute(cfg, sql, params)


def job_rows(cfg: Settings, sha256: str) -> dict[str, Any]:
    rows = db_rows(cfg, "SELECT * FROM jobs WHERE sha256 = ?", (sha256,))
    return {row["kind"]: row for row in rows}


async def upload(
    client: SanicASGITestClient, data: bytes, name: str = "photo.jpg", status: int = 201
) -> dict:
    content_type = "image/png" if name.endswith(".png") else "image/jpeg"
    _, res = await client.post("/api/images", files=multipart(data, name, content_type))
    assert res.status == status, res.text
    return res.json


async def get_record(client: SanicASGITestClient, image_id: str) -> dict:
    _, res = await client.get(f"/api/images/{image_id}")
    assert res.status == 200, res.text
    return res.json


async def wait_jobs(
    client: SanicASGITestClient,
    image_id: str,
    kinds: Iterable[str] = ("thumbnail", "exif"),
    states: Iterable[str] = FINISHED,
    within: float = 30,
) -> dict:
    """Polls the record until each of `kinds` is in one of `states`; returns the last record."""
    kinds, states = tuple(kinds), tuple(states)
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen["record"] = await get_record(client, image_id)
        job_states = seen["record"]["data"]["jobs"]
        return all(job_states[kind]["state"] in states for kind in kinds)

    await wait_for(reached, within)
    return seen["record"]


def original_key(cfg: Settings, image_id: str) -> str:
    """The storage key of an upload's original, found in storage (not in the record)."""
    (key,) = media_view.keys(cfg, f"originals/{image_id}.")
    return key


def thumbnail_keys(sha256: str, fmt: str = "jpeg") -> dict[str, str]:
    return {size: thumbnail_key(size, sha256, fmt) for size in ("small", "medium")}
