"""The media interface's contract, run against every implementation (the local folder, and S3 on
moto's server): keys, whole writes, reads, ranges, deletes, the sweep. What only a local folder
has (permissions, a full disk, fsync) is tested on it alone; S3's own: test_media_s3.py."""

from __future__ import annotations

import asyncio
import errno
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from imgapi_core import settings as settings_mod
from imgapi_core.media import (
    Media,
    MediaMissing,
    OutOfSpace,
    is_valid_key,
    open_media,
    original_key,
    sha256_of_thumbnail,
    thumbnail_key,
)
from imgapi_core.media.local import LocalMedia
from imgapi_core.media.s3 import S3Media

SHA = "ab" * 32
DATA = bytes(range(256)) * 1000  # 256 kB: more than one stream chunk


@pytest.fixture(params=["local", "s3"])
async def media(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Media]:
    env = {"MEDIA_DIR": str(tmp_path / "media")}
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        env |= server.settings(request.getfixturevalue("s3_bucket"))
    opened = await open_media(settings_mod.load(env=env, dotenv=None))
    assert isinstance(opened, S3Media if request.param == "s3" else LocalMedia)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def local_media(tmp_path: Path) -> AsyncIterator[LocalMedia]:
    """For what only a folder has: permissions, a full disk, fsync."""
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
    """A local file handle keeps the bytes; S3 cannot keep a deleted object readable, and says
    so (MediaMissing) rather than send anything else."""
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    async with media.reader(key) as reader:
        await media.delete([key])
        if isinstance(media, LocalMedia):
            assert b"".join([chunk async for chunk in reader.chunks()]) == DATA
        else:
            with pytest.raises(MediaMissing):
                async for _chunk in reader.chunks():
                    pass
    assert await media.stat(key) is None


async def test_a_staged_original_is_published_or_discarded(media, tmp_path):
    key, other = original_key("staged", "jpg"), original_key("dropped", "jpg")
    staged = await media.stage_file(key, source_file(tmp_path))
    assert staged.key == key
    assert not (tmp_path / "upload.part").exists()  # moved, as put_file does
    await media.publish(staged)
    await media.publish(staged)  # a retry finds the work done
    assert await media.read_bytes(key) == DATA
    dropped = await media.stage_file(other, source_file(tmp_path, b"drop"))
    await media.discard(dropped)
    await media.discard(dropped)  # a missing stage is fine
    assert await media.stat(other) is None
    # A folder has no URL of its own; S3 gives one (fetched in test_media_s3.py).
    url = await media.presigned_url(key, 60, "image/jpeg")
    assert (url is None) == isinstance(media, LocalMedia)


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
    await media.put_bytes(key, b"")  # what an unsynced write can leave in a folder after a crash
    assert await media.stat(key) is None
    with pytest.raises(MediaMissing):
        await media.read_bytes(key)
    with pytest.raises(MediaMissing):
        async with media.reader(key):
            pass


async def test_delete_removes(media, tmp_path):
    keys = [original_key("abc", "jpg"), thumbnail_key("small", SHA)]
    await media.put_file(keys[0], source_file(tmp_path))
    await media.put_bytes(keys[1], b"x")
    await media.delete(keys)
    assert [await media.stat(k) for k in keys] == [None, None]


@pytest.mark.parametrize("only_folders", [False, True], ids=["file", "folder"])
async def test_a_full_disk_is_out_of_space(local_media, tmp_path, monkeypatch, only_folders):
    media = local_media
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


async def write_stray(media: Media, tmp_path: Path) -> Callable[[], Awaitable[bool]]:
    """What an interrupted write leaves under thumbnails/ (a folder's temp file; on S3, an object
    some other tool put there); gives a function telling whether it is still there."""
    name = f"thumbnails/small/.{SHA}.jpeg.x1y2.tmp"
    if isinstance(media, LocalMedia):
        path = tmp_path / "media" / name
        path.write_bytes(b"half")

        async def file_exists() -> bool:
            return path.exists()

        return file_exists
    assert isinstance(media, S3Media)
    full = f"{media.prefix}/{name}"
    await media.client.put_object(Bucket=media.bucket, Key=full, Body=b"half")

    async def object_exists() -> bool:
        listed = await media.client.list_objects_v2(Bucket=media.bucket, Prefix=full)
        return bool(listed.get("Contents"))

    return object_exists


async def next_whole_second() -> float:
    """Waits for the next whole second and gives it: what was written before is older than it,
    in every store (S3 keeps LastModified in whole seconds), what is written after is not."""
    boundary = math.floor(time.time()) + 1
    await asyncio.sleep(boundary - time.time() + 0.05)
    return float(boundary)


async def test_sweep_removes_old_unreferenced_files_only(media, tmp_path):
    keep, orphan = original_key("keep", "jpg"), original_key("orphan", "jpg")
    young = original_key("young", "jpg")
    thumb_keep, thumb_orphan = thumbnail_key("small", SHA), thumbnail_key("small", "cd" * 32)
    for key in (keep, orphan):
        await media.put_file(key, source_file(tmp_path, b"jpeg"))
    for key in (thumb_keep, thumb_orphan):
        await media.put_bytes(key, b"thumb")
    stray_exists = await write_stray(media, tmp_path)
    older_than = await next_whole_second()
    await media.put_file(young, source_file(tmp_path, b"jpeg"))
    asked: list[str] = []

    async def referenced(keys: list[str]) -> set[str]:
        asked.extend(keys)
        return {keep, thumb_keep} & set(keys)

    removed = await media.sweep_orphans(referenced, older_than=older_than)
    assert removed == 3
    assert young not in asked  # too young to be judged
    assert await media.stat(keep) and await media.stat(thumb_keep) and await media.stat(young)
    assert await media.stat(orphan) is None and await media.stat(thumb_orphan) is None
    assert not await stray_exists()


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
