"""The HTTP API against its contract (/work/shared/design.md), through sanic-testing's ASGI client:
upload, failures, listing, reading, thumbnails, originals, delete, dedup, stats, error shape."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import multipart, originals_dir, thumbnails_dir, wait_for
from PIL import Image, ImageChops, ImageStat

from imgapi_core import runtime as jobs
from imgapi_core import settings as settings_mod

THUMB_BOXES = {"small": 256, "medium": 768}
THUMB_CACHE = "public, max-age=31536000, immutable"
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
RECORD_KEYS = {"status", "data", "thumbnails", "error"}
DATA_KEYS = {
    "image_id",
    "original_name",
    "processed_at",
    "metadata",
    "thumbnails",
    "original",
    "jobs",
}
FAILED_DATA_KEYS = {"image_id", "original_name", "processed_at", "metadata", "thumbnails"}
METADATA_KEYS = {
    "width",
    "height",
    "format",
    "size_bytes",
    "sha256",
    "first_upload",
    "exif",
    "caption",
}
# Mean absolute difference (0-255 per channel) between an upright thumbnail and orient1's: measured
# 0.5-2.5 for orient2..8, 70-87 for a mirrored or rotated orient1.
UPRIGHT_MAX_DIFF = 10.0
BOUNDARY = "imgapi-test-boundary"


# -- settings per test --------------------------------------------------------------------------


@pytest.fixture
def cfg(make_settings, request: pytest.FixtureRequest) -> settings_mod.Settings:
    """conftest's settings, with env values from `with_env(...)` when a test asks for them."""
    return make_settings(**getattr(request, "param", {}))


def with_env(**env: str) -> pytest.MarkDecorator:
    ids = ",".join(f"{k}={v}" for k, v in env.items())
    return pytest.mark.parametrize("cfg", [env], indirect=True, ids=[ids])


no_worker = with_env(WORKER="off")


# -- images -------------------------------------------------------------------------------------


def jpeg_bytes(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 40), **save: Any
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, ...] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def distinct_jpeg(i: int) -> bytes:
    return jpeg_bytes((16, 16), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))


def exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "ImgapiTestMake"  # Make
    exif[0x0110] = "ImgapiTestModel"  # Model
    exif[0x0112] = 1  # Orientation
    return jpeg_bytes((300, 200), (30, 160, 90), exif=exif)


def corrupt_jpeg() -> bytes:
    """A real JPEG cut off in the middle of its scan: the header reads, the decode fails."""
    im = Image.effect_noise((400, 300), 80).convert("RGB")
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    return data[: len(data) // 2]


XLSX = b"PK\x03\x04\x14\x00\x06\x00" + b"[Content_Types].xml" + bytes(200)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- helpers ------------------------------------------------------------------------------------


async def upload(client, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg"):
    _, res = await client.post("/api/images", files=multipart(data, name, ctype))
    return res


async def upload_ok(client, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg"):
    """The upload's record, as GET /api/images/{id} gives it too: the one-time delete token of the
    upload answer is checked and taken off."""
    res = await upload(client, data, name, ctype)
    assert res.status == 201, res.text
    body = dict(res.json)
    token = body.pop("delete_token")
    assert isinstance(token, str) and len(token) >= 40
    return body


def db_rows(cfg: settings_mod.Settings, sql: str, *params: Any) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(cfg.db_path)) as conn:
        return conn.execute(sql, params).fetchall()


def db_count(cfg: settings_mod.Settings, table: str, where: str = "1", *params: Any) -> int:
    return db_rows(cfg, f"SELECT count(*) FROM {table} WHERE {where}", *params)[0][0]


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def path_of(url: str) -> str:
    """The path and query of an absolute URL from a response, for the test client."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def next_link(res) -> str | None:
    header = res.headers.get("link")
    if header is None:
        return None
    match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', header.strip())
    assert match, f'Link header is not <url>; rel="next": {header!r}'
    return match.group(1)


def assert_rfc3339_utc(value: str, near: datetime | None = None) -> datetime:
    assert isinstance(value, str) and RFC3339_UTC.fullmatch(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    if near is not None:
        assert abs(parsed - near) < timedelta(minutes=2), (value, near)
    return parsed


def assert_error_shape(res, status: int) -> dict:
    assert res.status == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = res.json
    assert set(body) == {"status", "data", "error"}, body
    assert body["status"] == "failed"
    assert isinstance(body["error"], str) and body["error"].strip(), body
    assert body["data"] is None or isinstance(body["data"], dict)
    return body


def assert_upload_failure(res, status: int, original_name: str) -> dict:
    body = assert_error_shape(res, status)
    data = body["data"]
    assert set(data) == FAILED_DATA_KEYS, data
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", data["image_id"]), data["image_id"]
    assert data["original_name"] == original_name
    assert data["metadata"] == {} and data["thumbnails"] == {}
    assert_rfc3339_utc(data["processed_at"], near=datetime.now(UTC))
    return body


def assert_success_record(
    body: dict,
    *,
    data: bytes,
    name: str,
    size: tuple[int, int],
    fmt: str,
    job_states: Iterable[str] = ("queued", "running", "done"),
) -> None:
    assert set(body) == RECORD_KEYS, body
    assert body["status"] == "success" and body["error"] is None
    rec = body["data"]
    assert set(rec) == DATA_KEYS, rec
    image_id = rec["image_id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", image_id), image_id
    assert rec["original_name"] == name
    assert_rfc3339_utc(rec["processed_at"], near=datetime.now(UTC))
    meta = rec["metadata"]
    assert set(meta) == METADATA_KEYS, meta
    assert (meta["width"], meta["height"]) == size
    assert meta["format"] == fmt
    assert meta["size_bytes"] == len(data)
    assert meta["sha256"] == sha256(data)
    assert_rfc3339_utc(meta["first_upload"])
    assert meta["exif"] is None or isinstance(meta["exif"], dict)
    assert meta["caption"] is None or isinstance(meta["caption"], str)
    for size_name in THUMB_BOXES:
        url = rec["thumbnails"][size_name]
        parts = urlsplit(url)
        assert parts.scheme in ("http", "https") and parts.netloc, url
        assert parts.path == f"/api/images/{image_id}/thumbnails/{size_name}"
    assert set(rec["thumbnails"]) == set(THUMB_BOXES)
    assert body["thumbnails"] == rec["thumbnails"]
    states = set(job_states)
    assert set(rec["jobs"]) == {"thumbnail", "exif", "caption"}, rec["jobs"]
    for kind in ("thumbnail", "exif"):
        assert rec["jobs"][kind]["state"] in states, rec["jobs"]
    caption = rec["jobs"]["caption"]  # CAPTION_MODEL=none in tests
    assert caption["state"] == "skipped" and "CAPTION_MODEL" in caption["error"], caption


def assert_no_server_path(res, cfg: settings_mod.Settings) -> None:
    root = str(Path(cfg.media_dir).resolve().parent)
    secrets = {root, str(Path(cfg.media_dir).resolve()), cfg.media_dir, cfg.db_path}
    texts = [res.content.decode("latin-1")]
    texts += [f"{k}: {v}" for k, v in res.headers.items()]
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"server path {secret!r} in response: {text[:300]!r}"
        assert "/originals/" not in text and ".part" not in text, text[:300]


async def jobs_finished(client, image_id: str) -> bool:
    _, res = await client.get(f"/api/images/{image_id}")
    states = {job["state"] for job in res.json["data"]["jobs"].values()}
    return bool(states) and states <= {"done", "failed", "skipped"}


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
    stored = files_in(originals_dir(cfg))
    assert [p.name for p in stored] == [f"{image_id}.png"]
    assert sha256(stored[0].read_bytes()) == body["data"]["metadata"]["sha256"] == sha256(data)
    assert files_in(cfg.tmp_dir) == []


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
        assert (thumbnails_dir(cfg) / size_name / f"{sha256(data)}.jpeg").is_file()


async def test_client_file_name_is_never_a_path(client, cfg):
    data = jpeg_bytes()
    name = "../../../evil.jpg"
    body = await upload_ok(client, data, name)
    image_id = body["data"]["image_id"]
    assert body["data"]["original_name"] == name  # kept as text, shown back as it came
    root = Path(cfg.media_dir).parent
    everything = [p.relative_to(root).as_posix() for p in files_in(root)]
    assert "evil.jpg" not in " ".join(everything)
    assert f"media/originals/{image_id}.jpg" in everything


# -- failed uploads -----------------------------------------------------------------------------


async def assert_recorded_failure(client, cfg, body: dict) -> None:
    """GET by id shows the failure; stats count it; nothing is left on disk."""
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
    assert files_in(originals_dir(cfg)) == []
    assert files_in(cfg.tmp_dir) == []


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
    assert files_in(cfg.tmp_dir) == []


# -- listing ------------------------------------------------------------------------------------


async def walk_pages(client, first: str) -> tuple[list[dict], list]:
    """Follows Link rel=next from `first`; returns every record seen and every response."""
    seen: list[dict] = []
    responses = []
    url: str | None = first
    while url is not None:
        _, res = await client.get(url)
        assert res.status == 200, res.text
        responses.append(res)
        seen.extend(res.json)
        link = next_link(res)
        url = path_of(link) if link else None
        assert len(responses) < 50, "pagination does not end"
    return seen, responses


@no_worker
async def test_list_paginates_newest_first_with_link_and_status_filter(client, cfg):
    uploaded: list[tuple[str, str]] = []  # (image_id, status) in upload order
    for i in range(25):
        if i % 3 == 2:
            res = await upload(client, XLSX, f"sheet-{i}.xlsx", "application/octet-stream")
            assert res.status == 415
            uploaded.append((res.json["data"]["image_id"], "failed"))
        else:
            body = await upload_ok(client, distinct_jpeg(i), f"pic-{i}.jpg")
            uploaded.append((body["data"]["image_id"], "success"))

    _, res = await client.get("/api/images")
    assert res.status == 200 and next_link(res) is None
    everything = res.json
    assert [r["data"]["image_id"] for r in everything] == [i for i, _ in reversed(uploaded)]
    keys = [(r["data"]["processed_at"], r["data"]["image_id"]) for r in everything]
    assert keys == sorted(keys, reverse=True)
    for rec in everything:
        assert set(rec) == RECORD_KEYS

    seen, pages = await walk_pages(client, "/api/images?limit=10")
    assert [len(p.json) for p in pages] == [10, 10, 5]
    assert [next_link(p) is not None for p in pages] == [True, True, False]
    assert [r["data"]["image_id"] for r in seen] == [r["data"]["image_id"] for r in everything]
    assert seen == everything
    link = next_link(pages[0])
    assert link is not None and urlsplit(link).scheme in ("http", "https")
    assert parse_qs(urlsplit(link).query)["limit"] == ["10"]

    for status in ("success", "failed"):
        expected = [i for i, s in reversed(uploaded) if s == status]
        seen, pages = await walk_pages(client, f"/api/images?status={status}&limit=3")
        assert [r["data"]["image_id"] for r in seen] == expected
        assert {r["status"] for r in seen} == {status}
        for page in pages[:-1]:
            assert parse_qs(urlsplit(next_link(page)).query)["status"] == [status]
        assert next_link(pages[-1]) is None
    _, res = await client.get("/api/images?limit=9&status=failed")
    assert len(res.json) == 8 and next_link(res) is None  # exactly all: no next page


async def test_list_with_equal_timestamps_visits_every_record_once(app, client):
    store = app.ctx.store
    stamp = "2026-03-01T12:00:00.000Z"
    ids = [f"{i:024x}" for i in range(25)]
    for image_id in ids:
        await store.record_failure(
            image_id=image_id,
            original_name="x.xlsx",
            processed_at=stamp,
            start_time=stamp,
            error="file type not allowed",
        )
    seen, pages = await walk_pages(client, "/api/images?limit=10")
    assert len(pages) == 3
    assert [r["data"]["image_id"] for r in seen] == sorted(ids, reverse=True)


async def test_list_limit_default_is_100_and_max_is_1000(app, client):
    store = app.ctx.store
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(101):
        stamp = (base + timedelta(seconds=i)).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        await store.record_failure(
            image_id=f"{i:024x}",
            original_name=f"f{i}.xlsx",
            processed_at=stamp,
            start_time=stamp,
            error="nope",
        )
    _, res = await client.get("/api/images")
    assert res.status == 200 and len(res.json) == 100
    assert res.json[0]["data"]["image_id"] == f"{100:024x}"
    link = next_link(res)
    assert link is not None
    _, rest = await client.get(path_of(link))
    assert [r["data"]["image_id"] for r in rest.json] == [f"{0:024x}"]
    assert next_link(rest) is None
    _, res = await client.get("/api/images?limit=1000")
    assert res.status == 200 and len(res.json) == 101 and next_link(res) is None


async def test_list_bad_query_is_400_in_the_error_shape(client):
    await upload_ok(client, jpeg_bytes())
    for query in ("limit=0", "limit=1001", "limit=abc", "limit=-5", "limit=1.5", "status=done"):
        _, res = await client.get(f"/api/images?{query}")
        body = assert_error_shape(res, 400)
        assert body["data"] is None
    # A cursor that is not one this API wrote.
    for cursor in ("!!!", "abc", "bm90LWEtY3Vyc29y", "%00%ff", "fA"):
        _, res = await client.get(f"/api/images?cursor={cursor}")
        body = assert_error_shape(res, 400)
        assert "cursor" in body["error"], (cursor, body)


# -- reading one, 404s --------------------------------------------------------------------------


@no_worker
async def test_get_by_id_returns_the_upload_record(client, cfg):
    data = jpeg_bytes((50, 70))
    body = await upload_ok(client, data, "portrait.jpg")
    image_id = body["data"]["image_id"]
    _, res = await client.get(f"/api/images/{image_id}")
    assert res.status == 200
    assert res.json == body
    assert_no_server_path(res, cfg)


async def test_unknown_image_id_is_404_in_the_error_shape(client):
    await upload_ok(client, jpeg_bytes())
    unknown = "0123456789abcdef01234567"
    for method, suffix in (
        ("get", ""),
        ("get", "/thumbnails/small"),
        ("get", "/original"),
        ("delete", ""),
    ):
        _, res = await getattr(client, method)(f"/api/images/{unknown}{suffix}")
        body = assert_error_shape(res, 404)
        assert unknown in body["error"], (method, suffix, body)


async def test_unknown_route_is_404_in_the_error_shape(client):
    for path in ("/nope", "/api/images/x/y/z", "/api"):
        _, res = await client.get(path)
        assert_error_shape(res, 404)


async def test_thumbnail_size_other_than_small_or_medium_is_400(client):
    body = await upload_ok(client, jpeg_bytes())
    image_id = body["data"]["image_id"]
    for size in ("large", "SMALL", "256", "..%2F..%2Fetc"):
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/{size}")
        err = assert_error_shape(res, 400)
        assert "small" in err["error"] and "medium" in err["error"]


# -- thumbnails on demand -----------------------------------------------------------------------


def open_jpeg(content: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(content))
    assert im.format == "JPEG"
    im.load()
    return im


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    stat = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
    return sum(stat.mean) / 3


@no_worker
async def test_thumbnails_are_made_on_demand_upright_and_clean(client, cfg, photos):
    thumbs: dict[tuple[int, str], Image.Image] = {}
    ids: dict[int, str] = {}
    for n in range(1, 9):
        data = (photos / f"orient{n}.jpg").read_bytes()
        body = await upload_ok(client, data, f"orient{n}.jpg")
        ids[n] = body["data"]["image_id"]
        for size_name, box in THUMB_BOXES.items():
            _, res = await client.get(path_of(body["thumbnails"][size_name]))
            assert res.status == 200, res.text
            assert res.headers["content-type"] == "image/jpeg"
            assert res.headers["cache-control"] == THUMB_CACHE
            assert res.headers.get("etag")
            assert b"Exif\x00\x00" not in res.content  # no APP1 EXIF segment
            im = open_jpeg(res.content)
            assert max(im.size) == box and min(im.size) < box, (n, size_name, im.size)
            assert len(im.getexif()) == 0 and "exif" not in im.info
            assert "icc_profile" not in im.info
            thumbs[n, size_name] = im
    for size_name in THUMB_BOXES:
        reference = thumbs[1, size_name]
        assert reference.width > reference.height  # orient1 is a landscape, stored upright
        # The comparison can fail: orient1 mirrored or turned is far from itself.
        for turn in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180):
            assert mean_difference(reference, reference.transpose(turn)) > 4 * UPRIGHT_MAX_DIFF
        for n in range(2, 9):
            im = thumbs[n, size_name]
            assert im.size == reference.size, (n, size_name, im.size)
            diff = mean_difference(reference, im)
            assert diff < UPRIGHT_MAX_DIFF, f"orient{n} {size_name} is not upright ({diff:.1f})"
    # Made by the request, not by a job: with WORKER=off nothing ran them.
    _, res = await client.get(f"/api/images/{ids[6]}")
    assert res.json["data"]["jobs"]["thumbnail"]["state"] == "queued"
    assert len(files_in(thumbnails_dir(cfg))) == 16


@no_worker
async def test_thumbnail_etag_answers_304_on_if_none_match(client):
    body = await upload_ok(client, jpeg_bytes((900, 500)))
    url = path_of(body["thumbnails"]["medium"])
    _, first = await client.get(url)
    assert first.status == 200
    etag = first.headers["etag"]
    _, again = await client.get(url, headers={"if-none-match": etag})
    assert again.status == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert again.headers["cache-control"] == THUMB_CACHE
    _, other = await client.get(url, headers={"if-none-match": '"something-else"'})
    assert other.status == 200 and other.content == first.content
    _, small = await client.get(path_of(body["thumbnails"]["small"]))
    assert small.headers["etag"] != etag
    assert open_jpeg(small.content).size == (256, 142)
    assert open_jpeg(first.content).size == (768, 427)


async def test_thumbnails_of_a_failed_upload_are_404(client):
    res = await upload(client, corrupt_jpeg(), "bad.jpg")
    image_id = res.json["data"]["image_id"]
    for size_name in THUMB_BOXES:
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/{size_name}")
        assert_error_shape(res, 404)
    _, res = await client.get(f"/api/images/{image_id}/original")
    assert_error_shape(res, 404)


# -- originals ----------------------------------------------------------------------------------


async def test_original_download_is_the_same_bytes_with_its_content_type(client, cfg):
    for data, name, ctype in (
        (exif_jpeg(), "camera.jpg", "image/jpeg"),
        (png_bytes(), "drawing.png", "image/png"),
    ):
        body = await upload_ok(client, data, name, ctype)
        _, res = await client.get(f"/api/images/{body['data']['image_id']}/original")
        assert res.status == 200
        assert res.headers["content-type"] == ctype
        assert res.content == data
        assert_no_server_path(res, cfg)


# -- delete -------------------------------------------------------------------------------------


@no_worker
async def test_delete_removes_record_and_original(client, cfg):
    body = await upload_ok(client, jpeg_bytes(), "gone.jpg")
    image_id = body["data"]["image_id"]
    assert len(files_in(originals_dir(cfg))) == 1
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204 and res.content == b""
    for suffix in ("", "/original", "/thumbnails/small"):
        _, res = await client.get(f"/api/images/{image_id}{suffix}")
        assert_error_shape(res, 404)
    assert files_in(originals_dir(cfg)) == []
    _, res = await client.get("/api/images")
    assert res.json == []
    _, res = await client.delete(f"/api/images/{image_id}")
    assert_error_shape(res, 404)


async def test_delete_of_a_failed_upload(client, cfg):
    res = await upload(client, XLSX, "a.xlsx", "application/octet-stream")
    image_id = res.json["data"]["image_id"]
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204
    _, res = await client.get(f"/api/images/{image_id}")
    assert_error_shape(res, 404)
    assert db_count(cfg, "stats") == 0


@no_worker
async def test_delete_keeps_shared_bytes_until_the_last_upload_goes(client, cfg):
    data = exif_jpeg()
    digest = sha256(data)
    first = (await upload_ok(client, data, "one.jpg"))["data"]["image_id"]
    second = (await upload_ok(client, data, "two.jpg"))["data"]["image_id"]
    for size_name in THUMB_BOXES:  # made on demand: the thumbnail files now exist
        _, res = await client.get(f"/api/images/{first}/thumbnails/{size_name}")
        assert res.status == 200
    thumb_files = [thumbnails_dir(cfg) / s / f"{digest}.jpeg" for s in THUMB_BOXES]
    assert all(p.is_file() for p in thumb_files)

    _, res = await client.delete(f"/api/images/{first}")
    assert res.status == 204
    _, res = await client.get(f"/api/images/{second}")
    assert res.status == 200
    assert res.json["data"]["metadata"]["sha256"] == digest
    assert (res.json["data"]["metadata"]["width"], res.json["data"]["metadata"]["height"]) == (
        300,
        200,
    )
    for size_name, box in THUMB_BOXES.items():
        _, res = await client.get(f"/api/images/{second}/thumbnails/{size_name}")
        assert res.status == 200 and max(open_jpeg(res.content).size) == min(box, 300)
    _, res = await client.get(f"/api/images/{second}/original")
    assert res.status == 200 and res.content == data
    assert all(p.is_file() for p in thumb_files)
    assert db_count(cfg, "metadata") == 1 and db_count(cfg, "jobs") == 3

    _, res = await client.delete(f"/api/images/{second}")
    assert res.status == 204
    assert not any(p.exists() for p in thumb_files)
    assert files_in(originals_dir(cfg)) == []
    assert db_count(cfg, "metadata") == 0
    assert db_count(cfg, "jobs") == 0
    assert db_count(cfg, "images") == 0 and db_count(cfg, "stats") == 0


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
    assert len(files_in(originals_dir(cfg))) == 2
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


# -- stats --------------------------------------------------------------------------------------


async def test_stats_counts_rate_and_average_time(client, cfg):
    _, res = await client.get("/api/stats")
    assert res.status == 200
    assert (res.json["total"], res.json["failed"]) == (0, 0)
    ids = []
    for i in range(3):
        ids.append((await upload_ok(client, distinct_jpeg(i), f"{i}.jpg"))["data"]["image_id"])
    res = await upload(client, XLSX, "x.xlsx", "application/octet-stream")
    assert res.status == 415
    for image_id in ids:
        await wait_for(lambda image_id=image_id: jobs_finished(client, image_id))
    _, res = await client.get("/api/stats")
    stats = res.json
    assert stats["total"] == 4
    assert stats["failed"] == 1
    assert stats["success_rate"] == "75.00%"
    average = stats["average_processing_time_seconds"]
    assert isinstance(average, (int, float)) and not isinstance(average, bool)
    assert 0 < average < 60
    assert round(average, 3) == average  # milliseconds, not more
    assert stats["queued_jobs"] == 0 and stats["failed_jobs"] == 0
    assert stats["jobs"]["done"] == 6 and stats["jobs"]["skipped"] == 3
    assert stats["jobs"]["queued"] == 0 and stats["jobs"]["failed"] == 0
    assert_no_server_path(res, cfg)


@no_worker
async def test_stats_show_queued_jobs(client):
    await upload_ok(client, jpeg_bytes())
    _, res = await client.get("/api/stats")
    assert res.json["queued_jobs"] == 2 and res.json["jobs"]["queued"] == 2
    assert res.json["average_processing_time_seconds"] == 0  # nothing finished yet


# -- the error shape everywhere -----------------------------------------------------------------


async def test_every_client_error_has_the_error_shape(client, cfg):
    body = await upload_ok(client, jpeg_bytes())
    image_id = body["data"]["image_id"]
    cases: list[tuple[str, str, dict, int]] = [
        ("get", "/nope", {}, 404),
        ("get", "/api/images/unknown", {}, 404),
        ("get", "/api/images/unknown/original", {}, 404),
        ("get", "/api/images/unknown/thumbnails/small", {}, 404),
        ("delete", "/api/images/unknown", {}, 404),
        ("get", f"/api/images/{image_id}/thumbnails/huge", {}, 400),
        ("get", "/api/images?limit=0", {}, 400),
        ("get", "/api/images?status=maybe", {}, 400),
        ("get", "/api/images?cursor=@@", {}, 400),
        ("put", "/api/images", {}, 405),
        ("patch", f"/api/images/{image_id}", {}, 405),
        ("post", "/api/stats", {}, 405),
        ("post", "/api/images", {"content": b"{}", "headers": {"content-type": "text/json"}}, 415),
        ("post", "/api/images", {"content": b"x"}, 415),
        (
            "post",
            "/api/images",
            {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
            400,
        ),
        (
            "post",
            "/api/images",
            {"content": b"--b\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}},
            400,
        ),
        ("post", "/api/images", {"files": multipart(b"hello", "a.txt", "text/plain")}, 415),
        ("post", "/api/images", {"files": multipart(b"hello", "a.jpg", "image/jpeg")}, 415),
        ("post", "/api/images", {"files": multipart(b"\xff\xd8\xff\xe0", "a.jpg")}, 400),
        ("post", "/api/images", {"files": {"other": ("a.jpg", b"x", "image/jpeg")}}, 400),
    ]
    for method, url, kwargs, status in cases:
        _, res = await getattr(client, method)(url, **kwargs)
        assert res.status == status, (method, url, res.status, res.text)
        assert_error_shape(res, status)
        assert_no_server_path(res, cfg)
    assert files_in(cfg.tmp_dir) == []


# -- health and docs ----------------------------------------------------------------------------


async def test_healthz_reports_the_database(client):
    _, res = await client.get("/healthz")
    assert res.status == 200
    assert res.json["database"] == "ok" and res.json["status"] == "ok"
    assert "redis" not in res.json  # no REDIS_URL: nothing to check


async def test_healthz_is_503_when_the_database_cannot_be_written(app, client, monkeypatch):
    """Readable is not healthy: a read-only database answers reads and fails every upload.
    (The store's own test makes a file read-only for real; this one checks the route.)"""
    from imgapi_core.store import NotWritable

    async def read_only() -> None:
        raise NotWritable("the database is read-only: attempt to write a readonly database")

    monkeypatch.setattr(app.ctx.store, "check_writable", read_only)
    _, res = await client.get("/healthz")
    assert res.status == 503
    assert res.json["status"] == "unavailable"
    assert "read-only" in res.json["database"]


async def test_openapi_document_lists_every_contract_path(client):
    _, res = await client.get("/docs/openapi.json")
    assert res.status == 200
    doc = res.json
    assert doc["openapi"].startswith("3.")
    # path -> method -> the answers the contract gives (at least these are documented)
    expected = {
        "/api/images": {"get": {"200", "400"}, "post": {"201", "400", "413", "415"}},
        "/api/images/{image_id}": {"get": {"200", "404"}, "delete": {"204", "404"}},
        "/api/images/{image_id}/thumbnails/{size}": {"get": {"200", "304", "400", "404"}},
        "/api/images/{image_id}/original": {"get": {"200", "404"}},
        "/api/stats": {"get": {"200"}},
        "/healthz": {"get": {"200"}},
    }
    for path, methods in expected.items():
        assert path in doc["paths"], path
        for method, codes in methods.items():
            operation = doc["paths"][path].get(method)
            assert operation is not None, (path, method)
            documented = set(operation.get("responses", {}))
            assert codes <= documented, (path, method, sorted(documented))
    _, ui = await client.get("/docs")
    assert ui.status == 200 and ui.headers["content-type"].startswith("text/html")


async def test_no_server_path_in_any_response(client, cfg):
    ok = await upload_ok(client, exif_jpeg(), "x.jpg")
    image_id = ok["data"]["image_id"]
    await wait_for(lambda: jobs_finished(client, image_id))
    bad = await upload(client, corrupt_jpeg(), "y.jpg")
    requests = [
        f"/api/images/{image_id}",
        "/api/images",
        f"/api/images/{image_id}/thumbnails/small",
        f"/api/images/{image_id}/original",
        f"/api/images/{bad.json['data']['image_id']}",
        "/api/stats",
        "/healthz",
    ]
    assert_no_server_path(bad, cfg)
    for url in requests:
        _, res = await client.get(url)
        assert res.status == 200, url
        assert_no_server_path(res, cfg)
    _, res = await client.delete(f"/api/images/{image_id}")
    assert_no_server_path(res, cfg)
