"""POST /api/images against the contract, through sanic-testing's ASGI client: the success
record, failures (type, corruption, size and pixel caps, streamed bodies over the cap), and
dedup of the same bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import media_view
from api_helpers import (
    THUMB_BOXES,
    XLSX,
    assert_error_shape,
    assert_no_server_path,
    assert_success_record,
    assert_upload_failure,
    corrupt_jpeg,
    db_count,
    db_rows,
    exif_jpeg,
    files_in,
    jobs_finished,
    jpeg_bytes,
    no_worker,
    path_of,
    png_bytes,
    sha256,
    upload,
    upload_ok,
    with_env,
)
from conftest import multipart, wait_for

from imgapi_core import runtime as jobs
from imgapi_core.media import original_key, thumbnail_key

BOUNDARY = "imgapi-test-boundary"


# -- upload success -----------------------------------------------------------------------------


@no_worker
async def test_upload_success_answers_201_with_the_contract_record(client, cfg):
    data = jpeg_bytes((64, 48))
    _, res = await client.post("/api/images", files=multipart(data, "holiday.jpg"))
    assert res.status == 201, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = dict(res.json)
    # Shown once, here: the record read later has no delete token.
    assert isinstance(body.pop("delete_token"), str)
    # Nothing runs jobs with WORKER=off: they are exactly queued.
    assert_success_record(
        body, data=data, name="holiday.jpg", size=(64, 48), fmt="jpeg", job_states={"queued"}
    )
    image_id = body["data"]["image_id"]
    assert body["data"]["metadata"]["exif"] is None and body["data"]["metadata"]["caption"] is None
    assert body["data"]["metadata"]["first_upload"] == body["data"]["processed_at"]
    location = res.headers["location"]
    assert urlsplit(location).path == f"/api/images/{image_id}"
    _, again = await client.get(path_of(location))
    assert again.status == 200 and again.json == body
    assert_no_server_path(res, cfg)


async def test_upload_stores_the_same_bytes_under_originals(client, cfg):
    data = png_bytes()
    body = await upload_ok(client, data, "diagram.PNG", "image/png")
    assert_success_record(body, data=data, name="diagram.PNG", size=(40, 30), fmt="png")
    image_id = body["data"]["image_id"]
    key = original_key(image_id, "png")
    assert media_view.keys(cfg, "originals/") == [key]
    assert db_rows(cfg, "SELECT image_path FROM images WHERE image_id = ?", image_id) == [(key,)]
    stored = media_view.read(cfg, key)
    assert stored is not None
    assert sha256(stored) == body["data"]["metadata"]["sha256"] == sha256(data)
    # The jobs finish first: on S3 a job reads the original through a temp file of its own.
    await wait_for(lambda: jobs_finished(client, image_id))
    assert media_view.leftovers(cfg) == []


async def test_finished_jobs_fill_in_exif_and_job_states(client, cfg):
    data = exif_jpeg()
    body = await upload_ok(client, data, "camera.jpeg")
    image_id = body["data"]["image_id"]
    await wait_for(lambda: jobs_finished(client, image_id))
    _, res = await client.get(f"/api/images/{image_id}")
    rec = res.json
    assert_success_record(
        rec, data=data, name="camera.jpeg", size=(300, 200), fmt="jpeg", job_states={"done"}
    )
    exif = rec["data"]["metadata"]["exif"]
    assert exif["Make"] == "ImgapiTestMake" and exif["Model"] == "ImgapiTestModel", exif
    assert rec["data"]["jobs"]["thumbnail"]["attempts"] == 1
    for size_name in THUMB_BOXES:
        assert media_view.exists(cfg, thumbnail_key(size_name, sha256(data), "jpeg")), size_name


async def test_client_file_name_is_never_a_path(client, cfg, tmp_path):
    data = jpeg_bytes()
    name = "../../../evil.jpg"
    body = await upload_ok(client, data, name)
    image_id = body["data"]["image_id"]
    assert body["data"]["original_name"] == name  # kept as text, shown back as it came
    await wait_for(lambda: jobs_finished(client, image_id))
    stored = media_view.keys(cfg) + media_view.leftovers(cfg)
    assert "evil" not in " ".join(stored), stored
    assert original_key(image_id, "jpg") in stored
    (key,) = db_rows(cfg, "SELECT image_path FROM images WHERE image_id = ?", image_id)
    assert key == (original_key(image_id, "jpg"),)
    # Nor any local file (the upload temp folder, the SQLite file's folder) of that name, on
    # either engine: everything the app writes locally is under the test's own folder.
    local = [p.relative_to(tmp_path).as_posix() for p in files_in(tmp_path)]
    assert "evil" not in " ".join(local), local


# -- failed uploads -----------------------------------------------------------------------------


async def assert_recorded_failure(client, cfg, body: dict) -> None:
    """GET by id shows the failure; stats count it; nothing is left in storage or behind it."""
    data = body["data"]
    _, res = await client.get(f"/api/images/{data['image_id']}")
    assert res.status == 200
    got = res.json
    assert got["status"] == "failed" and got["error"] == body["error"]
    assert got["thumbnails"] == {}
    for key in ("image_id", "original_name", "processed_at"):
        assert got["data"][key] == data[key]
    assert got["data"]["metadata"] == {} and got["data"]["thumbnails"] == {}
    _, res = await client.get("/api/stats")
    assert res.json["total"] >= 1 and res.json["failed"] >= 1
    assert db_rows(
        cfg, "SELECT status, end_time IS NOT NULL FROM stats WHERE image_id = ?", data["image_id"]
    ) == [(0, 1)]
    assert db_rows(
        cfg,
        "SELECT error, metadata_sha256, image_path FROM images WHERE image_id = ?",
        data["image_id"],
    ) == [(body["error"], None, None)]
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


async def test_xlsx_is_refused_with_415_and_recorded(client, cfg):
    mime = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    res = await upload(client, XLSX, "report.xlsx", mime)
    body = assert_upload_failure(res, 415, "report.xlsx")
    assert ".xlsx" in body["error"]
    await assert_recorded_failure(client, cfg, body)
    _, stats = await client.get("/api/stats")
    assert (stats.json["total"], stats.json["failed"]) == (1, 1)
    assert stats.json["success_rate"] == "0.00%"


async def test_spreadsheet_named_png_is_refused_by_content(client, cfg):
    res = await upload(client, XLSX, "sheet.png", "image/png")
    body = assert_upload_failure(res, 415, "sheet.png")
    await assert_recorded_failure(client, cfg, body)


async def test_corrupt_jpeg_is_refused_with_400_and_recorded(client, cfg):
    res = await upload(client, corrupt_jpeg(), "broken.jpg")
    body = assert_upload_failure(res, 400, "broken.jpg")
    assert "corrupt" in body["error"] or "truncated" in body["error"], body["error"]
    assert_no_server_path(res, cfg)
    await assert_recorded_failure(client, cfg, body)


@with_env(MAX_UPLOAD_BYTES="20000")
async def test_file_over_max_upload_bytes_is_413_and_recorded(client, cfg):
    data = jpeg_bytes((600, 600))
    data += b"\0" * max(0, 20_001 - len(data))  # bytes after EOI: still a valid JPEG
    res = await upload(client, data, "large.jpg")
    body = assert_upload_failure(res, 413, "large.jpg")
    assert "20000" in body["error"]
    await assert_recorded_failure(client, cfg, body)


@with_env(MAX_UPLOAD_BYTES="20000")
async def test_file_of_exactly_max_upload_bytes_is_accepted(client, cfg):
    data = jpeg_bytes((64, 64))
    data += b"\0" * (20_000 - len(data))
    body = await upload_ok(client, data, "exact.jpg")
    assert body["data"]["metadata"]["size_bytes"] == 20_000


@with_env(MAX_PIXELS="10000")
async def test_image_over_max_pixels_is_413_and_recorded(client, cfg):
    res = await upload(client, jpeg_bytes((101, 100)), "wide.jpg")
    body = assert_upload_failure(res, 413, "wide.jpg")
    assert "101x100" in body["error"], body["error"]
    await assert_recorded_failure(client, cfg, body)
    await upload_ok(client, jpeg_bytes((100, 100)), "fits.jpg")


def multipart_head(name: str = "big.jpg", field: str = "file") -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


MULTIPART_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


class CountingBody:
    """An async body of `chunks` chunks of 8 KiB after a head, counting what the server read."""

    def __init__(self, head: bytes, chunks: int, tail: bytes = MULTIPART_TAIL) -> None:
        self.head, self.chunks, self.tail = head, chunks, tail
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        for _ in range(self.chunks):
            self.sent += 1
            yield b"\xff" * 8192
        yield self.tail


@with_env(MAX_UPLOAD_BYTES="100000")
async def test_chunked_body_over_the_cap_is_413_mid_stream(client, cfg):
    body = CountingBody(multipart_head("stream.jpg"), chunks=200)  # 1.6 MB, no Content-Length
    _, res = await client.post(
        "/api/images", content=body.__aiter__(), headers={"content-type": MULTIPART_TYPE}
    )
    failure = assert_upload_failure(res, 413, "stream.jpg")
    assert "content-length" not in {k.lower() for k in res.request.headers}
    # Stopped at the cap: the rest of the body was never read.
    assert body.sent <= 100_000 // 8192 + 4, body.sent
    await assert_recorded_failure(client, cfg, failure)


@with_env(MAX_UPLOAD_BYTES="100000")
async def test_declared_content_length_over_the_cap_is_413_at_once(client, cfg):
    body = CountingBody(multipart_head("declared.jpg"), chunks=200)
    declared = str(len(body.head) + 200 * 8192 + len(MULTIPART_TAIL))
    _, res = await client.post(
        "/api/images",
        content=body.__aiter__(),
        headers={"content-type": MULTIPART_TYPE, "content-length": declared},
    )
    failure = assert_upload_failure(res, 413, "")
    assert body.sent == 0, "the body was read although its declared length is over the cap"
    await assert_recorded_failure(client, cfg, failure)


@with_env(MAX_UPLOAD_BYTES="100000")
async def test_chunked_body_with_a_huge_non_file_field_is_413(client, cfg):
    """The cap covers the whole body, not only the file part: a form field of megabytes sent
    without a Content-Length must not be read to its end."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\n'.encode()
    tail = b"\r\n" + multipart_head("small.jpg") + jpeg_bytes() + MULTIPART_TAIL
    body = CountingBody(head, chunks=400, tail=tail)  # 3.2 MB of form field
    _, res = await client.post(
        "/api/images", content=body.__aiter__(), headers={"content-type": MULTIPART_TYPE}
    )
    assert_error_shape(res, 413)
    assert body.sent < 400, "the whole oversized body was read"
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


# -- dedup --------------------------------------------------------------------------------------


@no_worker
async def test_same_bytes_twice_share_metadata_and_jobs(app, client, cfg):
    data = exif_jpeg()
    first = (await upload_ok(client, data, "a.jpg"))["data"]
    assert db_count(cfg, "jobs") == 3
    second = (await upload_ok(client, data, "b.jpg"))["data"]
    assert first["image_id"] != second["image_id"]
    assert second["original_name"] == "b.jpg"
    assert second["metadata"]["sha256"] == first["metadata"]["sha256"] == sha256(data)
    assert second["metadata"]["first_upload"] == first["metadata"]["first_upload"]
    assert second["processed_at"] >= first["processed_at"]
    assert db_count(cfg, "metadata") == 1
    assert db_count(cfg, "jobs") == 3  # no new jobs for the second upload
    assert db_count(cfg, "images") == 2
    originals = [original_key(first["image_id"], "jpg"), original_key(second["image_id"], "jpg")]
    assert media_view.keys(cfg, "originals/") == sorted(originals)
    open_rows = "SELECT count(*) FROM stats WHERE end_time IS NULL"
    assert db_rows(cfg, open_rows) == [(2,)]

    # The first upload's jobs finish (run here: WORKER=off has no runner): both are complete.
    runtime = jobs.Runtime(app.ctx.settings, app.ctx.store, app.ctx.media)
    try:
        assert await runtime.run("thumbnail", sha256(data)) == "done"
        assert db_rows(cfg, open_rows) == [(2,)]
        assert await runtime.run("exif", sha256(data)) == "done"
    finally:
        await runtime.close()
    assert db_rows(cfg, open_rows) == [(0,)]
    _, res = await client.get(f"/api/images/{second['image_id']}")
    assert res.json["data"]["metadata"]["exif"]["Make"] == "ImgapiTestMake"
    assert {j["state"] for j in res.json["data"]["jobs"].values()} == {"done", "skipped"}

    # Bytes whose jobs are finished: a third upload is complete at once.
    third = (await upload_ok(client, data, "c.jpg"))["data"]
    assert db_count(cfg, "jobs") == 3
    assert db_rows(cfg, open_rows) == [(0,)]
    assert third["metadata"]["exif"]["Make"] == "ImgapiTestMake"
    assert third["jobs"]["thumbnail"] == {"state": "done", "attempts": 1}
