"""What only the S3 media store does, on moto's server: staged originals invisible until
published, multipart uploads, the sweep of open uploads, a reader that refuses a replaced object,
a server that is down, presigned URLs, and the mapping of S3's errors."""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from services import S3Server, start_s3_server, stop_s3_server

from imgapi_core import settings as settings_mod
from imgapi_core import uploads
from imgapi_core.media import MediaMissing, MediaUnavailable, original_key, thumbnail_key
from imgapi_core.media import s3 as s3_module
from imgapi_core.media.s3 import MIN_PART_SIZE, S3Media, _errors, content_disposition

SHA = "ab" * 32
DATA = bytes(range(256)) * 1000  # 256 kB

OpenS3 = Callable[..., Awaitable[S3Media]]


def settings_for(server: S3Server, bucket: str, tmp_path: Path) -> settings_mod.Settings:
    env = {**server.settings(bucket), "MEDIA_DIR": str(tmp_path / "media")}
    return settings_mod.load(env=env, dotenv=None)


@pytest.fixture
async def open_s3(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> AsyncIterator[OpenS3]:
    """Opens an S3Media on this test's bucket with the constructor options given."""
    opened: list[S3Media] = []

    async def make(**options: Any) -> S3Media:
        media = S3Media.from_settings(settings_for(s3_server, s3_bucket, tmp_path), **options)
        opened.append(await media.open())
        return media

    yield make
    for media in opened:
        await media.close()


@pytest.fixture
async def media(open_s3: OpenS3) -> S3Media:
    return await open_s3()


def source_file(tmp_path: Path, data: bytes = DATA) -> Path:
    path = tmp_path / "upload.part"
    path.write_bytes(data)
    return path


async def names(media: S3Media) -> list[str]:
    """Every object name in the bucket."""
    listed = await media.client.list_objects_v2(Bucket=media.bucket)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


async def open_uploads(media: S3Media) -> list[dict[str, Any]]:
    listed = await media.client.list_multipart_uploads(Bucket=media.bucket)
    return listed.get("Uploads", [])


async def read_all(media: S3Media, key: str) -> bytes:
    async with media.reader(key) as reader:
        return b"".join([chunk async for chunk in reader.chunks()])


# -- keys ---------------------------------------------------------------------------------------


async def test_keys_are_objects_under_the_prefix(media, tmp_path):
    assert media.prefix == "media"
    await media.put_file(original_key("abc", "jpg"), source_file(tmp_path))
    await media.put_bytes(thumbnail_key("small", SHA), b"thumb")
    assert await names(media) == [
        "media/originals/abc.jpg",
        f"media/thumbnails/small/{SHA}.jpeg",
    ]
    for bad in ("../x", "originals/../../x.jpg", "/etc/passwd"):
        with pytest.raises(ValueError):
            await media.put_bytes(bad, b"x")


# -- staged originals ------------------------------------------------------------------------------


async def test_a_staged_original_is_invisible_until_published(media, tmp_path):
    key = original_key("staged", "jpg")
    staged = await media.stage_file(key, source_file(tmp_path))
    assert staged.token  # the multipart upload's id
    assert not (tmp_path / "upload.part").exists()
    # Durable (the parts are stored) but under no key: not read, not listed.
    assert await media.stat(key) is None
    with pytest.raises(MediaMissing):
        await media.read_bytes(key)
    assert await names(media) == []
    assert [u["Key"] for u in await open_uploads(media)] == ["media/originals/staged.jpg"]

    await media.publish(staged)
    assert await media.read_bytes(key) == DATA
    assert await open_uploads(media) == []
    await media.publish(staged)  # already done: fine


@pytest.mark.parametrize("how", ["reader", "local_file"])
async def test_a_reader_waits_for_a_publish_then_publishes_a_lost_one_itself(
    media, tmp_path, monkeypatch, how
):
    """Only a committed record leads a reader to an original's key. A staged upload there is a
    publish on its way (the reader waits for it) or one that failed or died after the commit:
    past the waits the reader publishes it, rather than leave the photo unreadable (and its
    jobs failing) until the next start-up sweep."""
    monkeypatch.setattr(s3_module, "PUBLISH_WAITS", (0.05, 0.05))
    key = original_key(f"staged-{how}", "jpg")
    staged = await media.stage_file(key, source_file(tmp_path))

    async def read() -> bytes:
        if how == "reader":
            return await read_all(media, key)
        async with media.local_file(key) as path:
            return path.read_bytes()

    # On its way: published while the reader waits.
    publisher = asyncio.get_running_loop().call_later(
        0.06, lambda: asyncio.ensure_future(media.publish(staged))
    )
    assert await read() == DATA
    publisher.cancel()
    await media.delete([key])

    # Lost: nobody publishes it but the reader.
    await media.stage_file(key, source_file(tmp_path))
    assert await read() == DATA
    assert await open_uploads(media) == []
    assert await media.read_bytes(key) == DATA

    # Not published, and it cannot be now: unavailable (a retry), never "gone".
    await media.stage_file(key, source_file(tmp_path, b"other"))

    async def refused(*_args: object) -> None:
        raise MediaUnavailable("the S3 server is down")

    await media.delete([key])
    monkeypatch.setattr(media, "publish", refused)
    with pytest.raises(MediaUnavailable):
        await read()


async def test_a_read_that_missed_a_publish_by_a_moment_is_told_to_read_again(media, tmp_path):
    """A job's read fails while the original is staged, and the publish lands before the read
    asks why: that is a retry, never "the original is gone"."""
    key = original_key("racing", "jpg")
    await media.publish(await media.stage_file(key, source_file(tmp_path)))
    assert isinstance(await media._missing(key), MediaUnavailable)
    assert isinstance(await media._missing(original_key("never", "jpg")), MediaMissing)


async def test_discard_aborts_a_staged_upload_and_removes_a_published_one(media, tmp_path):
    key = original_key("dropped", "jpg")
    staged = await media.stage_file(key, source_file(tmp_path))
    await media.discard(staged)
    assert await open_uploads(media) == [] and await names(media) == []
    await media.discard(staged)  # missing is fine

    published = await media.stage_file(key, source_file(tmp_path))
    await media.publish(published)
    await media.discard(published)
    assert await media.stat(key) is None


async def test_publishing_a_lost_stage_raises_missing(media, tmp_path):
    key = original_key("lost", "jpg")
    staged = await media.stage_file(key, source_file(tmp_path))
    await media.client.abort_multipart_upload(
        Bucket=media.bucket, Key=media.name(key), UploadId=staged.token
    )
    with pytest.raises(MediaMissing):
        await media.publish(staged)


async def test_a_failed_part_aborts_the_upload(media, tmp_path, monkeypatch):
    real_upload_part = media.client.upload_part
    calls = 0

    async def failing_upload_part(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "UploadPart")
        return await real_upload_part(**kwargs)

    monkeypatch.setattr(media, "part_size", MIN_PART_SIZE)
    monkeypatch.setattr(media.client, "upload_part", failing_upload_part)
    source = source_file(tmp_path, bytes(MIN_PART_SIZE + 10))
    with pytest.raises(ClientError):
        await media.stage_file(original_key("half", "jpg"), source)
    assert calls == 2
    assert await open_uploads(media) == []  # aborted before the error went on
    assert source.exists()  # not moved: the caller still owns it


# -- multipart uploads -------------------------------------------------------------------------


async def test_a_file_above_the_threshold_goes_up_in_parts(open_s3, tmp_path, monkeypatch):
    # S3 (and moto) refuse parts under 5 MiB but for the last: 5 MiB and a bit make two parts.
    media = await open_s3(multipart_threshold=1024 * 1024, part_size=MIN_PART_SIZE)
    data = bytes(range(256)) * (MIN_PART_SIZE // 256) + b"tail" * 100
    read: list[int] = []
    real_read_part = s3_module._read_part

    def counting_read_part(fd: int, offset: int, length: int) -> tuple[bytes, str]:
        read.append(length)
        return real_read_part(fd, offset, length)

    monkeypatch.setattr(s3_module, "_read_part", counting_read_part)
    key = original_key("big", "jpg")
    source = source_file(tmp_path, data)
    await media.put_file(key, source)
    assert not source.exists()
    assert read == [MIN_PART_SIZE, 400]  # one part in memory at a time
    head = await media.client.head_object(Bucket=media.bucket, Key=media.name(key))
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object of two parts
    assert hashlib.sha256(await read_all(media, key)).digest() == hashlib.sha256(data).digest()

    # Staged, the same parts; ListParts finds them for publish.
    read.clear()
    staged = await media.stage_file(original_key("big2", "jpg"), source_file(tmp_path, data))
    assert read == [MIN_PART_SIZE, 400]
    await media.publish(staged)
    assert await media.read_bytes(original_key("big2", "jpg")) == data


async def test_a_small_file_is_one_put(media, tmp_path):
    key = original_key("small", "jpg")
    await media.put_file(key, source_file(tmp_path))
    head = await media.client.head_object(Bucket=media.bucket, Key=media.name(key))
    assert "-" not in head["ETag"]
    assert head["ETag"].strip('"') == hashlib.md5(DATA).hexdigest()


# -- the sweep ----------------------------------------------------------------------------------


async def test_sweep_publishes_claimed_uploads_and_aborts_unclaimed_ones(
    media, tmp_path, monkeypatch
):
    claimed, unclaimed = original_key("committed", "jpg"), original_key("abandoned", "jpg")
    await media.stage_file(claimed, source_file(tmp_path))
    await media.stage_file(unclaimed, source_file(tmp_path))
    # Not ours to judge: outside originals/ and thumbnails/, or outside the prefix.
    for name in ("media/other/x.bin", "elsewhere/originals/y.jpg"):
        await media.client.put_object(Bucket=media.bucket, Key=name, Body=b"keep")
    asked: list[str] = []

    async def referenced(keys: list[str]) -> set[str]:
        asked.extend(keys)
        return {claimed} & set(keys)

    # Young uploads are left alone unless claimed: a live process may still be writing them.
    # (moto says every upload began in 2010: this test's uploads get their real age back.)
    real_list = media.client.list_multipart_uploads

    async def list_with_real_ages(**kwargs: Any) -> Any:
        answer = await real_list(**kwargs)
        for upload in answer.get("Uploads", []):
            upload["Initiated"] = datetime.now(UTC)
        return answer

    monkeypatch.setattr(media.client, "list_multipart_uploads", list_with_real_ages)
    assert await media.sweep_orphans(referenced, older_than=time.time() - 3600) == 0
    monkeypatch.undo()
    assert [u["Key"] for u in await open_uploads(media)] == ["media/originals/abandoned.jpg"]
    assert await media.read_bytes(claimed) == DATA  # the process died between commit and publish

    removed = await media.sweep_orphans(referenced, older_than=time.time() + 60)
    assert removed == 1  # the abandoned upload; the published original is claimed
    assert await open_uploads(media) == []
    assert await media.stat(unclaimed) is None
    assert await media.read_bytes(claimed) == DATA
    assert await names(media) == [
        "elsewhere/originals/y.jpg",
        "media/originals/committed.jpg",
        "media/other/x.bin",
    ]
    assert unclaimed in asked


async def test_sweep_pages_and_asks_in_batches(media, tmp_path, monkeypatch):
    monkeypatch.setattr(s3_module, "BATCH", 2)
    keys = [thumbnail_key("small", f"{i:064x}") for i in range(5)]
    for key in keys:
        await media.put_bytes(key, b"t")
    staged = [original_key(f"s{i}", "jpg") for i in range(5)]
    for key in staged:
        await media.stage_file(key, source_file(tmp_path))
    batches: list[int] = []

    async def referenced(asked: list[str]) -> set[str]:
        batches.append(len(asked))
        return {keys[0], staged[0], staged[3]} & set(asked)

    assert await media.sweep_orphans(referenced, older_than=time.time() + 60) == 4 + 3
    # The thumbnails, then the open uploads of originals (moto sends those in one page: asked
    # about in batches all the same).
    assert batches == [2, 2, 1, 2, 2, 1]
    assert await media.stat(keys[0]) is not None
    assert [await media.stat(key) is not None for key in staged] == [1, 0, 0, 1, 0]
    assert await open_uploads(media) == []


# -- reading ------------------------------------------------------------------------------------


async def test_a_reader_keeps_its_version_or_raises_missing(media, tmp_path):
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    async with media.reader(key) as reader:
        first = [chunk async for chunk in reader.chunks(0, 1000)]
        assert b"".join(first) == DATA[:1000]
        # Replaced by other bytes of the same length: never mixed into what was opened.
        await media.put_bytes(key, bytes(len(DATA)))
        with pytest.raises(MediaMissing):
            async for _chunk in reader.chunks(1000):
                pass
    async with media.reader(key) as reader:
        await media.delete([key])
        with pytest.raises(MediaMissing):
            async for _chunk in reader.chunks():
                pass


async def test_a_reader_streams_in_chunks_and_may_stop_early(media, tmp_path):
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    async with media.reader(key) as reader:
        sizes = [len(chunk) async for chunk in reader.chunks()]
        assert sum(sizes) == len(DATA) and max(sizes) <= 256 * 1024
        async for _chunk in reader.chunks():
            break  # the body is closed, the connection freed
        assert b"".join([c async for c in reader.chunks(10, 20)]) == DATA[10:20]


async def test_local_file_is_a_temp_copy_removed_after(media, tmp_path):
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    async with media.local_file(key) as path:
        assert path.parent == tmp_path / "media" / "tmp"
        assert path.read_bytes() == DATA
        # Named as an upload's temp file: the start-up sweep removes it after a crash.
        assert path.name.startswith(uploads.temp_owner()) and path.suffix == ".part"
        assert uploads.sweep_temp_files(path.parent) == 1
    assert not path.exists()
    assert list((tmp_path / "media" / "tmp").iterdir()) == []


# -- presigned URLs -----------------------------------------------------------------------------


def fetch(url: str) -> tuple[int, Message, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers, response.read()


async def test_a_presigned_url_serves_the_bytes_with_their_type(media, tmp_path):
    key = original_key("abc", "jpg")
    await media.put_file(key, source_file(tmp_path))
    url = await media.presigned_url(key, 60, "image/jpeg", 'ünïcode "name";.jpg')
    assert url is not None and "X-Amz-Signature=" in url
    status, headers, body = await asyncio.to_thread(fetch, url)
    assert status == 200 and body == DATA
    assert headers["Content-Type"] == "image/jpeg"
    disposition = headers["Content-Disposition"]
    assert disposition.startswith('inline; filename="_n_code _name_;.jpg"; ')
    assert disposition.endswith("filename*=UTF-8''%C3%BCn%C3%AFcode%20%22name%22%3B.jpg")

    thumb = thumbnail_key("small", SHA, "webp")
    await media.put_bytes(thumb, b"RIFF....WEBP")
    url = await media.presigned_url(thumb, 60, "image/webp")
    status, headers, body = await asyncio.to_thread(fetch, url)
    assert (status, headers["Content-Type"], body) == (200, "image/webp", b"RIFF....WEBP")
    assert "Content-Disposition" not in headers


def test_content_disposition_is_plain_ascii_whatever_the_name():
    assert content_disposition("photo.jpg") == (
        "inline; filename=\"photo.jpg\"; filename*=UTF-8''photo.jpg"
    )
    for name in ('a"b\\c.jpg', "x\r\nSet-Cookie: y.jpg", "日本.png", ""):
        value = content_disposition(name)
        assert value.isascii() and "\r" not in value and "\n" not in value
        assert value.count('"') == 2, value


# -- a server that is down ------------------------------------------------------------------------


@pytest.fixture
def private_s3(s3_server: S3Server, tmp_path: Path) -> Iterator[S3Server]:
    """A moto server of this test's own, which it may stop."""
    server = start_s3_server(tmp_path / "private-moto.log")
    try:
        yield server
    finally:
        stop_s3_server(server)


async def test_a_server_that_is_down_is_unavailable_within_seconds(private_s3, tmp_path):
    bucket = private_s3.create_bucket("private-bucket")
    media = await S3Media.from_settings(settings_for(private_s3, bucket, tmp_path)).open()
    key = thumbnail_key("small", SHA)

    async def seconds_to_fail(call: Awaitable[object]) -> float:
        started = time.monotonic()
        with pytest.raises(MediaUnavailable) as raised:
            await call
        assert raised.value.__cause__ is not None
        messages.append(str(raised.value))
        return time.monotonic() - started

    messages: list[str] = []

    try:
        await media.put_bytes(key, b"thumb")
        stop_s3_server(private_s3)
        # Side by side: each gives up after botocore's few retries, not minutes of them.
        took = await asyncio.gather(
            seconds_to_fail(media.stat(key)),
            seconds_to_fail(media.read_bytes(key)),
            seconds_to_fail(media.put_bytes(key, b"x")),
            seconds_to_fail(media.delete([key])),
            seconds_to_fail(media.sweep_orphans(lambda keys: asyncio.sleep(0, set()), 0)),
        )
        assert max(took) < 10, took
    finally:
        await media.close()

    opening = S3Media.from_settings(settings_for(private_s3, bucket, tmp_path)).open()
    assert await seconds_to_fail(opening) < 10
    assert messages[-1].startswith("cannot reach s3://private-bucket/media at http://127.0.0.1:")
    assert "\n" not in messages[-1]


async def test_opening_a_missing_bucket_says_so(s3_server, tmp_path):
    cfg = settings_for(s3_server, "no-such-bucket-here", tmp_path)
    with pytest.raises(MediaUnavailable, match="no bucket 'no-such-bucket-here'") as raised:
        await S3Media.from_settings(cfg).open()
    assert "\n" not in str(raised.value)


# -- the mapping of S3's errors -------------------------------------------------------------------


def client_error(status: int, code: str) -> ClientError:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "NoSuchKey", MediaMissing),
        (404, "404", MediaMissing),
        (412, "PreconditionFailed", MediaMissing),
        (503, "SlowDown", MediaUnavailable),
        (500, "InternalError", MediaUnavailable),
        (400, "RequestTimeout", MediaUnavailable),
        (404, "NoSuchBucket", MediaUnavailable),
        (403, "AccessDenied", ClientError),
        (400, "InvalidArgument", ClientError),
    ],
)
def test_s3_errors_map_to_the_media_errors(status, code, expected):
    error = client_error(status, code)
    with pytest.raises(expected) as raised, _errors("originals/x.jpg"):
        raise error
    if expected is not ClientError:
        assert raised.value.__cause__ is error
