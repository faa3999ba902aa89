"""Upload and list errors through the in-process app (sanic-testing's ASGI client): numbers that
are not ASCII digits, filename* charsets, name and type checked before the body is read, a full
disk (507), and an upload cut short by a shutdown. Each failed upload is answered in the one
error shape and recorded like any other failure."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import db_query
import media_view
import pytest
from PIL import Image
from sanic import Sanic

from imgapi_core import pipeline as pipeline_mod
from imgapi_core import settings as settings_mod

BOUNDARY = "upload-errors-boundary"
MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
NO_SPACE = "the server has no space left to store this upload"


def jpeg_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 140, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def part_head(disposition_extra: bytes, ctype: bytes = b"image/jpeg") -> bytes:
    return (
        b"--" + BOUNDARY.encode() + b"\r\n"
        b'Content-Disposition: form-data; name="file"' + disposition_extra + b"\r\n"
        b"Content-Type: " + ctype + b"\r\n\r\n"
    )


def form(disposition_extra: bytes, data: bytes, ctype: bytes = b"image/jpeg") -> bytes:
    tail = b"\r\n--" + BOUNDARY.encode() + b"--\r\n"
    return part_head(disposition_extra, ctype) + data + tail


def db_rows(cfg: settings_mod.Settings, sql: str, *params: Any) -> list[tuple]:
    return [tuple(row) for row in db_query.fetch(cfg, sql, params)]


def assert_error_shape(res, status: int) -> dict:
    assert res.status == status, res.text
    assert res.headers["content-type"] == "application/json"
    body = res.json
    assert set(body) == {"status", "data", "error"}, body
    assert body["status"] == "failed"
    assert isinstance(body["error"], str) and body["error"].strip(), body
    return body


def assert_recorded(cfg: settings_mod.Settings, body: dict, original_name: str) -> None:
    """The failed upload's answer carries its record, and the database holds it: images row with
    the error, stats row with status 0; nothing stored (no original, no thumbnail) and nothing
    left behind (no temp file, no open S3 multipart upload)."""
    data = body["data"]
    assert data["original_name"] == original_name
    assert data["metadata"] == {} and data["thumbnails"] == {}
    rows = db_rows(
        cfg,
        "SELECT original_name, error, image_path, metadata_sha256 FROM images WHERE image_id = ?",
        data["image_id"],
    )
    assert rows == [(original_name, body["error"], None, None)]
    stats = db_rows(
        cfg, "SELECT status, end_time IS NOT NULL FROM stats WHERE image_id = ?", data["image_id"]
    )
    assert stats == [(0, 1)]
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


async def post(client, body: bytes | AsyncIterator[bytes], **headers: str):
    _, res = await client.post(
        "/api/images", content=body, headers={"content-type": MULTIPART_TYPE, **headers}
    )
    return res


# -- numbers: ASCII digits only ------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [
        *("%C2%B2", "%C2%B9%C2%B2", "%D9%A1%D9%A2", "%EF%BC%91", "%F0%9D%9F%99"),
        *("1_0", "+5", "9" * 5000),
    ],
    ids=["superscript-2", "superscripts", "arabic-indic", "fullwidth", "math-1", "_", "+", "5000"],
)
async def test_list_limit_that_is_not_ascii_digits_is_400(client, limit):
    """`"²".isdigit()` is true and `int("²")` raises: it was a 500. `int()` also took "١٢"."""
    _, res = await client.get(f"/api/images?limit={limit}")
    body = assert_error_shape(res, 400)
    assert "limit" in body["error"]


async def test_list_limit_with_leading_zeros_is_still_a_number(client):
    _, res = await client.get("/api/images?limit=0010")
    assert res.status == 200, res.text


@pytest.mark.parametrize("declared", ["²", "١٢", "1_0", " 5", "9" * 5000])
async def test_declared_length_that_is_not_ascii_digits_does_not_break_an_upload(
    app: Sanic, cfg, declared
):
    """The pipeline read Content-Length with isdigit() and int(): "²" raised ValueError (a 500).
    A length it cannot read is left alone; the cap still applies as the bytes arrive."""
    data = form(b'; filename="ok.jpg"', jpeg_bytes())

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    outcome = await app.ctx.pipeline.ingest(chunks(), MULTIPART_TYPE, declared)
    if declared == "9" * 5000:
        assert outcome.error is not None and outcome.error.status == 413
    else:
        assert outcome.error is None, outcome.error.message
        assert db_rows(cfg, "SELECT error FROM images") == [(None,)]


# -- filename*: UTF-8 and ISO-8859-1 only --------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "recorded"),
    [
        (b"; filename*=idna''%41.jpg", ""),
        (b"; filename=\"plain.jpg\"; filename*=idna''%41.jpg", "plain.jpg"),
        (b"; filename*=utf-16''%41%00.jpg", ""),
        (b"; filename*=rot13''n.jpg", ""),
    ],
    ids=["idna", "idna-with-plain-name", "utf-16", "rot13"],
)
async def test_filename_star_in_another_charset_is_400_and_recorded(client, cfg, extra, recorded):
    """`filename*=idna''...` raised UnicodeError (errors="replace" is not supported by the idna
    codec): a 500, not recorded."""
    res = await post(client, form(extra, jpeg_bytes()))
    body = assert_error_shape(res, 400)
    assert "filename*" in body["error"] and "UTF-8" in body["error"], body["error"]
    assert_recorded(cfg, body, recorded)


async def test_filename_star_in_utf8_or_latin1_is_accepted(client):
    res = await post(client, form(b"; filename*=UTF-8''%E2%82%AC.jpg", jpeg_bytes()))
    assert res.status == 201 and res.json["data"]["original_name"] == "€.jpg", res.text
    res = await post(client, form(b"; filename*=iso-8859-1''%E9t%E9.jpg", jpeg_bytes((9, 9))))
    assert res.status == 201 and res.json["data"]["original_name"] == "été.jpg", res.text


# -- name and type before the body ---------------------------------------------------------------


class CountingBody:
    """The part's headers, then `chunks` chunks of 8 KiB, counting what the server asked for."""

    def __init__(self, head: bytes, chunks: int) -> None:
        self.head, self.chunks = head, chunks
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        for _ in range(self.chunks):
            self.sent += 1
            yield b"MZ" * 4096
        yield b"\r\n--" + BOUNDARY.encode() + b"--\r\n"


@pytest.mark.parametrize(
    ("extra", "ctype", "name"),
    [
        (b'; filename="setup.exe"', b"application/octet-stream", "setup.exe"),
        (b'; filename="photo.jpg"', b"application/x-msdownload", "photo.jpg"),
    ],
    ids=["exe", "exe-type"],
)
async def test_refused_name_or_type_answers_before_the_body_is_read(
    client, cfg, extra, ctype, name
):
    """The extension and type checks ran after the whole body had arrived (a 50 MB .exe was read
    and written to a temp file in full before its 415)."""
    body = CountingBody(part_head(extra, ctype), chunks=400)  # 3.2 MB
    res = await post(client, body.__aiter__())
    failure = assert_error_shape(res, 415)
    assert body.sent <= 2, f"{body.sent} chunks of a refused file were read"
    assert_recorded(cfg, failure, name)


# -- a full disk: 507 ----------------------------------------------------------------------------


def fail_with(monkeypatch: pytest.MonkeyPatch, where: str, media: Path, err: int) -> None:
    """OSError(err) from one OS call on files under MEDIA_DIR, as a full disk there gives; the
    same calls on other files (the database, the event loop's) are left alone. "write" is the
    upload's temp file under MEDIA_DIR/tmp, which every engine pair writes as the body arrives;
    the others are the local media store's own steps in putting an original under originals/."""

    def in_media(target: int | str | os.PathLike) -> bool:
        path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        return os.fspath(path).startswith(str(media))

    def failing(real, only_directories: bool = False):
        def call(target, *args: Any, **kwargs: Any) -> Any:
            if in_media(target) and (
                not only_directories or os.path.isdir(f"/proc/self/fd/{target}")
            ):
                raise OSError(err, os.strerror(err))
            return real(target, *args, **kwargs)

        return call

    name, patched = {
        "write": ("write", failing(os.write)),  # the temp file, as the body arrives
        "fsync": ("fsync", failing(os.fsync)),  # the temp file before its rename
        "rename": ("replace", failing(os.replace)),
        "directory fsync": ("fsync", failing(os.fsync, only_directories=True)),
    }[where]
    monkeypatch.setattr(os, name, patched)


async def full_disk_is_507_and_recorded(client, cfg, monkeypatch, where: str, err: int) -> None:
    fail_with(monkeypatch, where, Path(cfg.media_dir).resolve(), err)
    res = await post(client, form(b'; filename="full.jpg"', jpeg_bytes()))
    body = assert_error_shape(res, 507)
    assert body["error"] == NO_SPACE
    assert_recorded(cfg, body, "full.jpg")
    monkeypatch.undo()
    res = await post(client, form(b'; filename="room.jpg"', jpeg_bytes()))
    assert res.status == 201, res.text


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
async def test_full_disk_under_the_upload_temp_folder_is_507_and_recorded(
    client, cfg, monkeypatch, err
):
    """A full disk under MEDIA_DIR was a 500 "internal server error", and not recorded. The
    upload's temp folder (MEDIA_DIR/tmp) is on local disk whichever store keeps the originals."""
    await full_disk_is_507_and_recorded(client, cfg, monkeypatch, "write", err)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("where", ["fsync", "rename", "directory fsync"])
@pytest.mark.local_engines(
    "a full file system (ENOSPC, EDQUOT) under the media folder while an original is put under"
    " originals/: S3 stores originals with no local file system to fill"
)
async def test_full_disk_is_507_and_recorded(client, cfg, monkeypatch, where, err):
    """A full disk under MEDIA_DIR was a 500 "internal server error", and not recorded."""
    await full_disk_is_507_and_recorded(client, cfg, monkeypatch, where, err)


def database_full_error(cfg: settings_mod.Settings) -> Exception:
    """What the engine's driver raises when the database's own disk is full."""
    if cfg.database_url:
        return asyncpg.exceptions.DiskFullError(
            'could not extend file "base/16384/16385": No space left on device'
        )
    return sqlite3.OperationalError("database or disk is full")


async def test_full_disk_is_507_even_when_the_record_cannot_be_written(
    app: Sanic, client, cfg, monkeypatch
):
    """The database may sit on the same full disk: the client still gets its 507, not a 500."""
    fail_with(monkeypatch, "write", Path(cfg.media_dir).resolve(), errno.ENOSPC)

    async def database_full(**kwargs: Any) -> None:
        raise database_full_error(cfg)

    monkeypatch.setattr(app.ctx.store, "record_failure", database_full)
    res = await post(client, form(b'; filename="full.jpg"', jpeg_bytes()))
    body = assert_error_shape(res, 507)
    assert body["error"] == NO_SPACE
    assert db_rows(cfg, "SELECT count(*) FROM images") == [(0,)]
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


async def other_os_errors_are_not_a_full_disk(client, cfg, monkeypatch, where: str) -> None:
    fail_with(monkeypatch, where, Path(cfg.media_dir).resolve(), errno.EIO)
    res = await post(client, form(b'; filename="eio.jpg"', jpeg_bytes()))
    body = assert_error_shape(res, 500)
    assert body["error"] == "internal server error"
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


async def test_other_os_errors_are_not_reported_as_a_full_disk(client, cfg, monkeypatch):
    """A failing disk (EIO) is the server's fault and stays a 500; only ENOSPC and EDQUOT are
    the 507 "no space". Here the upload's temp file, on local disk with either store."""
    await other_os_errors_are_not_a_full_disk(client, cfg, monkeypatch, "write")


@pytest.mark.local_engines(
    "EIO from the media folder's file system while an original is put under originals/:"
    " S3 stores originals with no local file system to fail"
)
async def test_other_os_errors_of_the_media_folder_are_not_reported_as_a_full_disk(
    client, cfg, monkeypatch
):
    """A failing disk (EIO) under the media folder is the server's fault and stays a 500."""
    await other_os_errors_are_not_a_full_disk(client, cfg, monkeypatch, "fsync")


# -- interrupted uploads: by the client or by a shutdown -----------------------------------------


async def interrupted_upload(app: Sanic, cfg, *, shutdown: bool) -> str:
    """An upload whose body stalls halfway, cancelled as Sanic cancels a handler: returns the
    error it was recorded with."""
    halfway = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield part_head(b'; filename="half.jpg"') + jpeg_bytes()[:100]
        halfway.set()
        await asyncio.Event().wait()
        yield b""

    pipeline: pipeline_mod.Pipeline = app.ctx.pipeline
    task = asyncio.create_task(pipeline.ingest(stalled(), MULTIPART_TYPE))
    await halfway.wait()
    if shutdown:
        pipeline.begin_shutdown()  # what the app's before_server_stop listener does
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = db_rows(cfg, "SELECT original_name, error FROM images")
    assert len(rows) == 1 and rows[0][0] == "half.jpg", rows
    assert db_rows(cfg, "SELECT status FROM stats") == [(0,)]
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []
    return rows[0][1]


async def test_upload_cut_by_a_shutdown_is_recorded_as_such(app: Sanic, cfg):
    error = await interrupted_upload(app, cfg, shutdown=True)
    assert error == "upload interrupted: the server was shutting down"


async def test_upload_cut_by_its_client_is_recorded_as_such(app: Sanic, cfg):
    assert not app.ctx.pipeline.shutting_down
    error = await interrupted_upload(app, cfg, shutdown=False)
    assert error == "upload interrupted: the client closed the connection"


async def test_drain_lets_cancelled_uploads_record_before_the_store_closes(app: Sanic, cfg):
    """On shutdown Sanic cancels the uploads still running, then runs after_server_stop, which
    closes the store: a record written after the cancellation was refused by the closed store
    or dropped by it (in about one SIGTERM in eight, nothing was recorded)."""
    halfway = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield part_head(b'; filename="late.jpg"') + jpeg_bytes()[:100]
        halfway.set()
        await asyncio.Event().wait()
        yield b""

    pipeline: pipeline_mod.Pipeline = app.ctx.pipeline
    task = asyncio.create_task(pipeline.ingest(stalled(), MULTIPART_TYPE))
    await halfway.wait()
    pipeline.begin_shutdown()
    task.cancel()  # as Sanic's abort of the connection does; the task has not run since
    await pipeline.drain()  # what close_resources is to do before closing the store
    await app.ctx.store.close()
    assert task.cancelled()
    assert db_rows(cfg, "SELECT original_name, error FROM images") == [
        ("late.jpg", "upload interrupted: the server was shutting down")
    ]
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


@pytest.mark.parametrize("step", ["stage_file", "record_success"])
# No job runner: a thumbnail job on S3 downloads the original to a temp file of its own, which
# would be taken for one the upload left behind.
@pytest.mark.parametrize("cfg", [{"WORKER": "off"}], indirect=True, ids=["WORKER=off"])
async def test_a_client_leaving_while_its_upload_is_stored_and_recorded(
    app: Sanic, cfg, monkeypatch: pytest.MonkeyPatch, step: str
):
    """Once the bytes are whole and valid, storing and recording them is one unit: a cancellation
    in the middle (the client left) neither splits it (an original removed under a committed
    record, or a record of an interruption next to the stored image) nor loses the upload."""
    pipeline: pipeline_mod.Pipeline = app.ctx.pipeline
    target = app.ctx.media if step == "stage_file" else app.ctx.store
    real = getattr(target, step)
    entered, go_on = asyncio.Event(), asyncio.Event()

    async def held(*args: Any) -> Any:
        entered.set()
        await go_on.wait()
        return await real(*args)

    monkeypatch.setattr(target, step, held)

    async def body() -> AsyncIterator[bytes]:
        yield form(b'; filename="kept.jpg"', jpeg_bytes())

    task = asyncio.create_task(pipeline.ingest(body(), MULTIPART_TYPE))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    go_on.set()
    await pipeline.drain()
    rows = db_rows(cfg, "SELECT image_id, original_name, error, image_path FROM images")
    assert len(rows) == 1, rows
    image_id, name, error, key = rows[0]
    assert (name, error) == ("kept.jpg", None)
    assert media_view.keys(cfg, "originals/") == [key]
    assert media_view.read(cfg, key) == jpeg_bytes()
    assert media_view.leftovers(cfg) == []
    assert db_rows(cfg, "SELECT status FROM stats WHERE image_id = ?", image_id) == [(1,)]
