"""Media in a local folder (MEDIA_DIR): keys are paths under it.

Originals are fsynced, renamed into place and their folder fsynced: a name under originals/ is
never a partial file, and survives a power loss once written. Thumbnails are derived data: written
to a temp file and renamed (never partial while the machine runs) without fsync; after a power
loss a name may be missing or empty, and both read as missing, so they are rendered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

from imgapi_core.media import (
    ORIGINALS,
    THUMBNAILS,
    MediaMissing,
    MediaStat,
    MediaUnavailable,
    OutOfSpace,
    Referenced,
    Staged,
    is_valid_key,
)

CHUNK = 256 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _space_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise OutOfSpace(exc.errno, "no space left in MEDIA_DIR") from exc
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalMedia:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def open(self) -> LocalMedia:
        for folder in (ORIGINALS, THUMBNAILS):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        return self

    async def close(self) -> None:
        pass

    def path(self, key: str) -> Path:
        if not is_valid_key(key):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root / key

    # -- writing ----------------------------------------------------------------------------

    async def put_file(self, key: str, source: Path) -> None:
        await asyncio.to_thread(self._put_file, self.path(key), source)

    @staticmethod
    def _put_file(dest: Path, source: Path) -> None:
        with _space_errors():
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
            try:
                _fsync_dir(dest.parent)
            except BaseException:
                # The rename may not last: a failed put leaves no object under the key.
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()
                raise

    async def ping(self) -> None:
        if not await asyncio.to_thread(self.root.is_dir):
            raise MediaUnavailable(f"the media folder {self.root} is gone")

    async def stage_file(self, key: str, source: Path) -> Staged:
        # A rename into place is already atomic and durable; an original the record never
        # committed for is an orphan the start-up sweep removes.
        await self.put_file(key, source)
        return Staged(key)

    async def publish(self, staged: Staged) -> None:
        return None

    async def discard(self, staged: Staged) -> None:
        await self.delete([staged.key])

    async def presigned_url(
        self, key: str, expires_s: int, content_type: str, filename: str | None = None
    ) -> str | None:
        return None

    async def put_bytes(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_bytes, self.path(key), data)

    @staticmethod
    def _put_bytes(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with _space_errors(), os.fdopen(fd, "wb") as out:
                # mkstemp makes the file 0600; media is served content.
                os.fchmod(out.fileno(), 0o644)
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def delete(self, keys: Iterable[str]) -> None:
        paths = [self.path(key) for key in keys]
        await asyncio.to_thread(self._unlink, paths)

    @staticmethod
    def _unlink(paths: list[Path]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- reading ----------------------------------------------------------------------------

    async def stat(self, key: str) -> MediaStat | None:
        try:
            st = await asyncio.to_thread(self.path(key).stat)
        except FileNotFoundError:
            return None
        if st.st_size == 0:  # what an unsynced write can leave after a crash
            return None
        return MediaStat(st.st_size, st.st_mtime)

    async def read_bytes(self, key: str) -> bytes:
        try:
            data = await asyncio.to_thread(self.path(key).read_bytes)
        except FileNotFoundError:
            raise MediaMissing(key) from None
        if not data:
            raise MediaMissing(key)
        return data

    @contextlib.asynccontextmanager
    async def reader(self, key: str) -> AsyncIterator[LocalReader]:
        try:
            fd = await asyncio.to_thread(os.open, self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise MediaMissing(key) from None
        try:
            # Measured on the open handle: a delete or replace after this leaves these bytes.
            st = os.fstat(fd)
            if st.st_size == 0:
                raise MediaMissing(key)
            yield LocalReader(fd, MediaStat(st.st_size, st.st_mtime))
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        path = self.path(key)
        if not await asyncio.to_thread(path.is_file):
            raise MediaMissing(key)
        yield path

    # -- the start-up sweep ------------------------------------------------------------------

    async def sweep_orphans(self, referenced: Referenced, older_than: float) -> int:
        """Removes what no record claims: originals renamed into place by a process killed before
        its commit, thumbnails of deleted images, temp files of interrupted writes. Only files
        last changed before `older_than` (epoch seconds) go: a live process may be between its
        write and its commit right now."""
        keys, strays = await asyncio.to_thread(self._old_files, older_than)
        keep = await referenced(keys) if keys else set()
        doomed = [self.root / key for key in keys if key not in keep] + strays
        await asyncio.to_thread(self._unlink, doomed)
        return len(doomed)

    def _old_files(self, older_than: float) -> tuple[list[str], list[Path]]:
        keys: list[str] = []
        strays: list[Path] = []
        for folder in (ORIGINALS, THUMBNAILS):
            for path in (self.root / folder).rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    if not path.is_file() or path.stat().st_mtime >= older_than:
                        continue
                    key = path.relative_to(self.root).as_posix()
                    if is_valid_key(key):
                        keys.append(key)
                    else:
                        strays.append(path)
        return keys, strays


class LocalReader:
    def __init__(self, fd: int, stat: MediaStat) -> None:
        self._fd = fd
        self.stat = stat

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        end = self.stat.size if end is None else min(end, self.stat.size)
        offset = start
        while offset < end:
            chunk = await asyncio.to_thread(os.pread, self._fd, min(CHUNK, end - offset), offset)
            if not chunk:
                # The caller may have promised the length already: fail rather than come up short.
                raise OSError(f"object ended at byte {offset} of {end}")
            yield chunk
            offset += len(chunk)
