"""What the store tests share: a stored upload in one call."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

from sanic.request import RequestParameters

from imgapi_core.routes import listing
from imgapi_core.store import JOB_KINDS, ImageQuery, NewUpload, Store, now_iso

SHA = "a" * 64


async def add_image(
    store: Store,
    image_id: str,
    sha256: str = SHA,
    processed_at: str | None = None,
    jobs: Mapping[str, tuple[str, str | None]] | None = None,
) -> bool:
    """A 4x3 JPEG upload recorded with its jobs (all queued unless `jobs` says otherwise)."""
    stamp = processed_at or now_iso()
    return await store.record_success(
        NewUpload(
            image_id=image_id,
            original_name=f"{image_id}.jpg",
            processed_at=stamp,
            start_time=stamp,
            original_key=f"originals/{image_id}.jpg",
            sha256=sha256,
            width=4,
            height=3,
            format="jpeg",
            size_bytes=100,
            jobs=dict.fromkeys(JOB_KINDS, ("queued", None)) if jobs is None else jobs,
        )
    )


def list_request(
    path: str, default_limit: int = 100
) -> tuple[ImageQuery, tuple[str, str] | None, int]:
    """What GET /api/images reads from this path, with the route's own parser: the query, the
    position its cursor points at, and the page's size (tests and bench/bench_search.py)."""
    args = RequestParameters()
    for key, value in parse_qsl(urlsplit(path).query, keep_blank_values=True):
        args.setdefault(key, []).append(value)
    query = listing.image_query(cast(Any, SimpleNamespace(args=args)))
    cursor = args.get("cursor")
    after = listing.decode_cursor(cursor, query) if cursor is not None else None
    return query, after, int(args.get("limit", str(default_limit)))
