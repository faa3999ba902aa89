"""Making an image's thumbnails: one decode of its original, every size, into the media store.

The thumbnail job and the on-demand path of the thumbnail route share this, so both keep the rule
that no derivative of a deleted image may remain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from concurrent.futures import Executor

from imgapi_core import imaging
from imgapi_core.media import THUMBNAIL_FORMATS, Media, MediaMissing, thumbnail_key
from imgapi_core.store import Store


class OriginalGone(Exception):
    """No stored original for these bytes (deleted, or lost with a disk)."""


def thumbnail_keys(sha256: str) -> list[str]:
    """Every thumbnail an image may have: each size in each format (formats enabled once and
    turned off since included, so that a delete leaves none)."""
    return [
        thumbnail_key(size, sha256, fmt)
        for size in imaging.THUMB_SIZES
        for fmt in THUMBNAIL_FORMATS
    ]


async def make_thumbnails(
    store: Store,
    media: Media,
    cpu: Executor,
    sha256: str,
    out_formats: Collection[str] = ("jpeg",),
) -> None:
    """Renders and stores every size in every format from one decode. Raises OriginalGone, or
    ClientError for an image that cannot be decoded."""
    key = await store.original_of(sha256)
    if key is None:
        raise OriginalGone(sha256)
    loop = asyncio.get_running_loop()
    try:
        async with media.local_file(key) as path:
            rendered = await loop.run_in_executor(
                cpu, imaging.render_thumbnail_set, path, imaging.THUMB_SIZES, tuple(out_formats)
            )
    except MediaMissing:
        raise OriginalGone(sha256) from None
    for fmt, by_size in rendered.items():
        for size, data in by_size.items():
            await media.put_bytes(thumbnail_key(size, sha256, fmt), data)
    if not await store.known_sha256s([sha256]):
        # The image was deleted while this rendered: its delete removed what existed then (it
        # removes thumbnails after its commit), and this removes what was written since.
        await media.delete(thumbnail_keys(sha256))
