"""The media interface's contract, run against every implementation (the local folder today; an
S3 one joins as one more parameter): keys, whole writes, reads, ranges, deletes, the sweep."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imgapi_core.media import (
    MediaMissing,
    OutOfSpace,
    is_valid_key,
    original_key,
    sha256_of_thumbnail,
    thumbnail_key,
)
from imgapi_core.media.local import LocalMedia

SHA = "ab" * 32
DATA = bytes(range(256)) * 1000  # 256 kB: more than one stream chunk


@pytest.fixture(params=["local"])
async def media(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LocalMedia]:
    opened = await LocalMedia(tmp_path / "media").open()
    try:
        yield opened
    finally:
        await opened.close()


def source_file(tmp_path: Path, data: bytes = DATA) -> Path:
    path = tmp_path / "upload.part"
    path.write_bytes(data)
    return path


def test_keys_are_built_from_server_values_only():
    assert original_key("0a1b", "jpg") == "originals/0a1b.jpg"
    assert original_key("img123", "png") == "originals/img123.png"  # a seed database's ids
    assert thumbnail_key("small", SHA) == f"thumbnails/small/{SHA}.jpeg"
    assert sha256_of_thumbnail(thumbnail_key("medium", SHA)) == SHA
    assert sha256_of_thumbnail("originals/0a1b.jpg") is None
    for bad in (("../x", "jpg"), ("a/b", "jpg"), ("a", "j/g"), ("a", "")):
        with pytest.raises(ValueError):
            original_key(*bad)
    with pytest.raises(ValueError):
        thumbnail_key("../..", SHA)
    for key in ("originals/../x.jpg", "/etc/passwd", "originals/a.jpg/..", "thumbnails/x.jpeg"):
        assert not is_valid_key(key), key
    for key in ("originals/..", "originals/.x.jpg.tmp", "originals/", "originals/a\\b.jpg"):
        assert not is_valid_key(key), key
    # A database upgraded from the seed keeps the seed's own file names as keys.
    assert is_valid_key("originals/IMG 1.JPG")


async def test_put_file_moves_it_in_whole(media, tmp_path):
    key = original_key("abc", "jpg")
    source = source_file(tmp_path)
    await media.put_file(key, source)
    assert not source.exists()
    stat = await media.stat(key)
    assert stat is not None and stat.size == len(DATA)
    assert await media.read_bytes(key) == DATA
    async with media.local_file(key) as path:
        assert path.read_bytes() == DATA


async def test_an_opened_object_gives_any_byte_range(media, tmp_path):
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    async with media.reader(key) as reader:
        assert reader.stat.size == len(DATA)
        for start, end in ((0, None), (0, 1), (100, 300_000), (255_999, None), (1000, 1000)):
            got = b"".join([chunk async for chunk in reader.chunks(start, end)])
            assert got == DATA[start:end], (start, end)


async def test_an_opened_object_keeps_its_bytes_through_a_delete(media, tmp_path):
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    async with media.reader(key) as reader:
        await media.delete([key])
        assert b"".join([chunk async for chunk in reader.chunks()]) == DATA
    assert await media.stat(key) is None


async def test_put_bytes_replaces_whole(media):
    key = thumbnail_key("small", SHA)
    await media.put_bytes(key, b"first")
    await media.put_bytes(key, b"second")
    assert await media.read_bytes(key) == b"second"


async def test_missing_objects_read_as_missing(media, tmp_path):
    key = original_key("nothere", "png")
    assert await media.stat(key) is None
    with pytest.raises(MediaMissing):
        await media.read_bytes(key)
    with pytest.raises(MediaMissing):
        async with media.local_file(key):
            pass
    with pytest.raises(MediaMissing):
        async with media.reader(key):
            pass
    await media.delete([key])  # missing is fine


async def test_an_empty_thumbnail_left_by_a_crash_reads_as_missing(media, tmp_path):
    key = thumbnail_key("small", SHA)
    path = tmp_path / "media" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    assert await media.stat(key) is None
    with pytest.raises(MediaMissing):
        await media.read_bytes(key)


async def test_delete_removes(media, tmp_path):
    keys = [original_key("abc", "jpg"), thumbnail_key("small", SHA)]
    await media.put_file(keys[0], source_file(tmp_path))
    await media.put_bytes(keys[1], b"x")
    await media.delete(keys)
    assert [await media.stat(k) for k in keys] == [None, None]


@pytest.mark.parametrize("only_folders", [False, True], ids=["file", "folder"])
async def test_a_full_disk_is_out_of_space(media, tmp_path, monkeypatch, only_folders):
    real_fsync = os.fsync

    def no_space(fd: int) -> None:
        # The folder's fsync comes after the rename: the object was in place for a moment.
        if only_folders and not stat.S_ISDIR(os.fstat(fd).st_mode):
            return real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutOfSpace):
        await media.put_file(original_key("abc", "jpg"), source_file(tmp_path))
    assert await media.stat(original_key("abc", "jpg")) is None
    assert list((tmp_path / "media" / "originals").iterdir()) == []


async def test_sweep_removes_old_unreferenced_files_only(media, tmp_path):
    root = tmp_path / "media"
    keep, orphan = original_key("keep", "jpg"), original_key("orphan", "jpg")
    young = original_key("young", "jpg")
    thumb_keep, thumb_orphan = thumbnail_key("small", SHA), thumbnail_key("small", "cd" * 32)
    for key in (keep, orphan, young):
        await media.put_file(key, source_file(tmp_path, b"jpeg"))
    for key in (thumb_keep, thumb_orphan):
        await media.put_bytes(key, b"thumb")
    stray = root / "thumbnails" / "small" / f".{SHA}.jpeg.x1y2.tmp"  # an interrupted write
    stray.write_bytes(b"half")
    old = time.time() - 3600
    for path in root.rglob("*"):
        if path.is_file() and path.name != "young.jpg":
            os.utime(path, (old, old))
    asked: list[str] = []

    async def referenced(keys: list[str]) -> set[str]:
        asked.extend(keys)
        return {keep, thumb_keep} & set(keys)

    removed = await media.sweep_orphans(referenced, older_than=time.time() - 60)
    assert removed == 3
    assert young not in asked  # too young to be judged
    assert await media.stat(keep) and await media.stat(thumb_keep) and await media.stat(young)
    assert await media.stat(orphan) is None and await media.stat(thumb_orphan) is None
    assert not stray.exists()


# -- the local folder ------------------------------------------------------------------------------


async def test_local_thumbnails_are_readable_files_and_a_failed_write_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    media = await LocalMedia(tmp_path / "media").open()
    key = thumbnail_key("small", SHA)
    await media.put_bytes(key, b"old")
    path = tmp_path / "media" / key
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # served content, not a private temp file

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        await media.put_bytes(key, b"new")
    assert await media.read_bytes(key) == b"old"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
