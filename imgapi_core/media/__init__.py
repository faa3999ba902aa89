"""The media interface: where originals and thumbnails live, addressed by storage keys.

The database holds keys like `originals/{image_id}.jpg` and `thumbnails/small/{sha256}.jpeg`, never
a server path, so the data folder or bucket can move. One protocol, two implementations: a local
folder (imgapi_core.media.local) and S3-compatible object storage (imgapi_core.media.s3);
`open_media(settings)` gives the configured one.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from imgapi_core.settings import Settings

ORIGINALS = "originals"
THUMBNAILS = "thumbnails"

# Wider than what original_key() builds: a database upgraded from the seed holds its own file
# names (any case, spaces). One path component, never hidden (temp files are) and never "..".
_ORIGINAL_KEY = re.compile(r"originals/(?!\.)[^/\\\x00]{1,255}")
_THUMBNAIL_KEY = re.compile(r"thumbnails/([a-z0-9_-]{1,32})/([0-9a-f]{64})\.(jpeg|webp|avif)")
# Ids are ours (hex); a seed database may hold others, like "img123".
_IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIZE = re.compile(r"[a-z0-9_-]{1,32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXT = re.compile(r"[a-z0-9]{1,8}")


# Given some keys, answers those that a record still refers to.
Referenced = Callable[[list[str]], Awaitable[set[str]]]


class MediaMissing(FileNotFoundError):
    """No object under that key (deleted, or lost with a disk)."""


class OutOfSpace(OSError):
    """The media store has no room for what was written (ENOSPC, EDQUOT)."""


class MediaUnavailable(ConnectionError):
    """The object store cannot be reached now (down, timing out, refusing): worth a retry. The API
    answers 503 with Retry-After."""


@dataclass(frozen=True)
class Staged:
    """An original written by stage_file: durable, but under `key` only once published."""

    key: str
    token: str = ""  # the implementation's handle (an S3 multipart upload id)


@dataclass(frozen=True)
class MediaStat:
    size: int
    mtime: float


class Reader(Protocol):
    """One version of an object, opened: its size and bytes stay those of the moment it was
    opened, even if the object is deleted or replaced while it is read."""

    stat: MediaStat

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) in chunks; memory stays flat whatever the size."""
        ...


def original_key(image_id: str, ext: str) -> str:
    # Both parts come from the server (a random id, the sniffed format), but a key becomes a path
    # component: refuse anything that could climb out of its folder.
    if not (_IMAGE_ID.fullmatch(image_id) and _EXT.fullmatch(ext)):
        raise ValueError(f"bad original key parts {image_id!r}, {ext!r}")
    return f"{ORIGINALS}/{image_id}.{ext}"


THUMBNAIL_FORMATS = ("jpeg", "webp", "avif")


def thumbnail_key(size: str, sha256: str, fmt: str = "jpeg") -> str:
    if not (_SIZE.fullmatch(size) and _SHA256.fullmatch(sha256) and fmt in THUMBNAIL_FORMATS):
        raise ValueError(f"bad thumbnail key parts {size!r}, {sha256!r}, {fmt!r}")
    return f"{THUMBNAILS}/{size}/{sha256}.{fmt}"


def is_valid_key(key: str) -> bool:
    return bool(_ORIGINAL_KEY.fullmatch(key) or _THUMBNAIL_KEY.fullmatch(key))


def sha256_of_thumbnail(key: str) -> str | None:
    match = _THUMBNAIL_KEY.fullmatch(key)
    return match.group(2) if match else None


class Media(Protocol):
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises MediaUnavailable when the store cannot be reached now (`/healthz` asks)."""
        ...

    async def put_file(self, key: str, source: Path) -> None:
        """Moves a finished local file under `key`, durably; never a partial object there."""
        ...

    async def stage_file(self, key: str, source: Path) -> Staged:
        """The first half of storing an upload's original: its bytes moved into the store,
        durably, but (where the store can) not readable under `key` until publish(). The
        upload's record commits in between. A process that dies before publish leaves something
        sweep_orphans completes (when a record refers to the key) or removes (when none does)."""
        ...

    async def publish(self, staged: Staged) -> None: ...

    async def discard(self, staged: Staged) -> None:
        """Undoes stage_file (the record did not commit); a missing stage is fine."""
        ...

    async def presigned_url(
        self, key: str, expires_s: int, content_type: str, filename: str | None = None
    ) -> str | None:
        """A URL a client can GET the object from directly, valid for expires_s; None where the
        store has none (a local folder). `filename` asks for a Content-Disposition."""
        ...

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Derived data (thumbnails): whole or absent, but not necessarily durable."""
        ...

    async def read_bytes(self, key: str) -> bytes:
        """Raises MediaMissing for a missing (or empty, after a crash) object."""
        ...

    async def stat(self, key: str) -> MediaStat | None: ...

    def reader(self, key: str) -> AbstractAsyncContextManager[Reader]:
        """Raises MediaMissing for a missing (or empty) object."""
        ...

    def local_file(self, key: str) -> AbstractAsyncContextManager[Path]:
        """A local file holding the object, for decoders that want a path (Pillow, BLIP)."""
        ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Removes these objects; missing ones are fine."""
        ...

    async def sweep_orphans(self, referenced: Referenced, older_than: float) -> int:
        """Removes objects older than `older_than` (epoch seconds) that `referenced` does not
        claim, and leftovers of interrupted writes; publishes staged originals that a record
        refers to; returns how many went."""
        ...


async def open_media(settings: Settings) -> Media:
    """STORAGE_URL picks S3; unset, the local MEDIA_DIR."""
    if settings.storage_url:
        from imgapi_core.media.s3 import S3Media

        return await S3Media.from_settings(settings).open()
    from imgapi_core.media.local import LocalMedia

    return await LocalMedia(Path(settings.media_dir)).open()
