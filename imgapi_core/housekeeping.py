"""The start-up sweep: what a killed process or a race left behind goes, nothing a record needs.

- upload temp files whose process is gone (uploads.sweep_temp_files);
- originals no record refers to (renamed into place by a process killed before its commit);
- thumbnails of bytes no image refers to any more (a job that wrote after a delete);
- leftovers of interrupted media writes.
Files younger than a grace period stay: a live sibling process may be between its write and its
commit right now.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from imgapi_core import uploads
from imgapi_core.media import Media, sha256_of_thumbnail
from imgapi_core.store import Store

log = logging.getLogger("imgapi")

ORPHAN_GRACE_S = 60.0


async def sweep_at_start(store: Store, media: Media, tmp_dir: Path) -> None:
    removed = uploads.sweep_temp_files(tmp_dir)
    if removed:
        log.info("removed %d upload temp files left by a stopped process", removed)

    originals: set[str] | None = None

    async def referenced(keys: list[str]) -> set[str]:
        # Read once per sweep: an object store asks a page of keys at a time.
        nonlocal originals
        if originals is None:
            originals = await store.original_keys()
        thumbs = {key: sha256_of_thumbnail(key) for key in keys}
        known = await store.known_sha256s(sha for sha in thumbs.values() if sha)
        return {key for key in keys if key in originals or thumbs[key] in known}

    orphans = await media.sweep_orphans(referenced, older_than=time.time() - ORPHAN_GRACE_S)
    if orphans:
        log.info("removed %d media files that no record refers to", orphans)
