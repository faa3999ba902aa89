"""Shared by the tests of the HTTP API against its contract (/work/shared/design.md), through
sanic-testing's ASGI client: the records' shapes, test images, uploads, the error shape, and
`with_env(...)` / `no_worker` (settings per test, through conftest's `cfg`)."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import db_query
import pytest
from conftest import multipart
from PIL import Image, ImageChops, ImageStat

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
    "ready",
}
FAILED_DATA_KEYS = {"image_id", "original_name", "processed_at", "metadata", "thumbnails"}
METADATA_KEYS = {
    "width",
    "height",
    "display_width",
    "display_height",
    "orientation",
    "frames",
    "format",
    "size_bytes",
    "sha256",
    "first_upload",
    "exif",
    "caption",
    "taken_at",
}


# -- settings per test --------------------------------------------------------------------------


def with_env(**env: str) -> pytest.MarkDecorator:
    """Runs the test on conftest's `cfg` with these env values (indirect parametrization)."""
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
    return [tuple(row) for row in db_query.fetch(cfg, sql, params)]


def db_count(cfg: settings_mod.Settings, table: str, where: str = "true", *params: Any) -> int:
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
    finished = ("done", "failed", "skipped", "unavailable")
    assert rec["ready"] is all(job["state"] in finished for job in rec["jobs"].values()), rec
    for kind in ("thumbnail", "exif"):
        assert rec["jobs"][kind]["state"] in states, rec["jobs"]
    caption = rec["jobs"]["caption"]  # CAPTION_MODEL=none in tests
    assert caption["state"] == "skipped" and "CAPTION_MODEL" in caption["error"], caption


def server_details(cfg: settings_mod.Settings) -> set[str]:
    """Where the server keeps its data, which no answer may show: the folders and the database
    file and, on PostgreSQL + S3, the database's URL, address and name, the bucket and the S3
    endpoint."""
    media = Path(cfg.media_dir).resolve()
    found = {str(media.parent), str(media), cfg.media_dir, cfg.db_path}
    if cfg.database_url:
        db = urlsplit(cfg.database_url)
        found |= {cfg.database_url, f"{db.hostname}:{db.port}", db.path.strip("/")}
    if cfg.storage_url:
        bucket = urlsplit(cfg.storage_url)
        found |= {cfg.storage_url, bucket.netloc, f"{bucket.netloc}{bucket.path}"}
    if cfg.s3_endpoint_url:
        found |= {cfg.s3_endpoint_url, urlsplit(cfg.s3_endpoint_url).netloc}
    return {detail for detail in found if detail}


def assert_no_server_path(res, cfg: settings_mod.Settings) -> None:
    """No server_details in the answer, body or headers."""
    texts = [res.content.decode("latin-1")]
    texts += [f"{k}: {v}" for k, v in res.headers.items()]
    for text in texts:
        for secret in server_details(cfg):
            assert secret not in text, f"server detail {secret!r} in response: {text[:300]!r}"
        assert "/originals/" not in text and ".part" not in text, text[:300]


async def jobs_finished(client, image_id: str) -> bool:
    _, res = await client.get(f"/api/images/{image_id}")
    states = {job["state"] for job in res.json["data"]["jobs"].values()}
    return bool(states) and states <= {"done", "failed", "skipped"}


def open_jpeg(content: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(content))
    assert im.format == "JPEG"
    im.load()
    return im


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    stat = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
    return sum(stat.mean) / 3
