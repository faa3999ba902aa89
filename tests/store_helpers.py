"""What the store tests share: a stored upload in one call."""

from __future__ import annotations

from collections.abc import Mapping

from imgapi_core.store import JOB_KINDS, NewUpload, Store, now_iso

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
