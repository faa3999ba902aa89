"""Every corpus file through POST /api/images under its own name: real photos come back with
their true size and format; hostile files get a clean 201 or a clear 4xx, never a 5xx, and are
recorded."""

from __future__ import annotations

import io
import re
from pathlib import Path

import db_query
import media_view
import pytest
from api_helpers import server_details
from conftest import manifest, multipart
from PIL import Image

from imgapi_core import formats
from imgapi_core import settings as settings_mod

ALLOWED_EXTENSIONS = set(formats.all_extensions())
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".avif": "image/avif",
}
PILLOW_OK = re.compile(r"ok: (?P<format>\w+) (?P<mode>\S+) (?P<width>\d+)x(?P<height>\d+)\b")
MAX_ERROR_CHARS = 300


@pytest.fixture
def cfg(make_settings) -> settings_mod.Settings:
    # No job runner: only the upload path and on-demand thumbnails are under test here.
    return make_settings(WORKER="off")


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def expected_image(row: dict[str, str]) -> tuple[str, int, int] | None:
    """(format, width, height) as Pillow 13 decoded the file, or None when it did not."""
    match = PILLOW_OK.match(row["pillow13"])
    if match is None:
        return None
    return match["format"].lower(), int(match["width"]), int(match["height"])


def image_rows(cfg: settings_mod.Settings) -> dict[str, tuple[str | None, str | None]]:
    """image_id: (error, image_path) of every images row."""
    rows = db_query.fetch(cfg, "SELECT image_id, error, image_path FROM images")
    return {row[0]: (row[1], row[2]) for row in rows}


async def test_every_photo_uploads_with_its_true_size_and_format(client, cfg, photos):
    rows = manifest("photos")
    assert len(rows) >= 20
    problems: list[str] = []
    for row in rows:
        name = row["file"]
        data = (photos / name).read_bytes()
        expected = expected_image(row)
        assert expected is not None, f"manifest says {name} does not decode: {row['pillow13']}"
        _, res = await client.post("/api/images", files=multipart(data, name, content_type(name)))
        if res.status != 201:
            problems.append(f"{name}: {res.status} {res.text[:200]}")
            continue
        rec = res.json["data"]
        meta = rec["metadata"]
        got = (meta["format"], meta["width"], meta["height"])
        if got != expected:
            problems.append(f"{name}: got {got}, manifest {expected}")
        if (meta["size_bytes"], meta["sha256"]) != (int(row["bytes"]), row["sha256"]):
            problems.append(f"{name}: size/sha256 {meta['size_bytes']} {meta['sha256']}")
        if rec["original_name"] != name:
            problems.append(f"{name}: original_name {rec['original_name']!r}")
    assert not problems, "\n".join(problems)
    _, res = await client.get("/api/stats")
    assert (res.json["total"], res.json["failed"]) == (len(rows), 0)
    # One stored original per upload, under the key its record holds; nothing left behind.
    recorded = image_rows(cfg)
    assert len(recorded) == len(rows)
    assert all(error is None for error, _ in recorded.values())
    assert media_view.keys(cfg, "originals/") == sorted(key for _, key in recorded.values())
    assert media_view.leftovers(cfg) == []


async def check_hostile(client, cfg, row: dict[str, str], data: bytes) -> tuple[str, list[str]]:
    """Uploads one hostile file; returns its image_id and what is wrong with the answer."""
    name = row["file"]
    ext = Path(name).suffix.lower()
    expected = expected_image(row)
    _, res = await client.post("/api/images", files=multipart(data, name, content_type(name)))
    problems: list[str] = []
    text = res.content.decode("utf-8", "replace")
    if res.status >= 500:
        return "", [f"{name}: {res.status} server error: {text[:200]}"]
    for secret in server_details(cfg):
        if secret in text:
            problems.append(f"{name}: server path in the answer: {text[:200]}")
    body = res.json
    image_id = body["data"]["image_id"]
    if body["data"]["original_name"] != name:
        problems.append(f"{name}: original_name {body['data']['original_name']!r}")

    if res.status == 201:
        meta = body["data"]["metadata"]
        got = (meta["format"], meta["width"], meta["height"])
        if expected is None or expected[0] not in formats.ALL_NAMES:
            problems.append(f"{name}: accepted {got} but Pillow 13 says {row['pillow13']!r}")
        elif got != expected:
            problems.append(f"{name}: accepted as {got}, Pillow 13 decodes {expected}")
        if ext not in ALLOWED_EXTENSIONS:
            problems.append(f"{name}: a {ext} file was accepted")
        problems += await check_stored(client, name, image_id, data)
        return image_id, problems

    # A refusal: the error shape with a clear, short, printable message.
    if res.status not in (400, 413, 415):
        problems.append(f"{name}: status {res.status}")
    error = body.get("error")
    if set(body) != {"status", "data", "error"} or body["status"] != "failed":
        problems.append(f"{name}: not the error shape: {body}")
    if body["data"]["metadata"] != {} or body["data"]["thumbnails"] != {}:
        problems.append(f"{name}: failure carries metadata or thumbnails: {body['data']}")
    if not isinstance(error, str) or not error.strip():
        problems.append(f"{name}: no error message: {body}")
    elif len(error) > MAX_ERROR_CHARS or not error.isprintable() or "Traceback" in error:
        problems.append(f"{name}: unclear error message: {error!r}")
    if ext not in ALLOWED_EXTENSIONS and res.status != 415:
        problems.append(f"{name}: a {ext} file got {res.status}, not 415")
    bomb = "DecompressionBombError" in row["pillow13"] and ext in ALLOWED_EXTENSIONS
    if bomb and res.status != 413:
        problems.append(f"{name}: a pixel bomb got {res.status}, not 413 ({error})")
    _, got = await client.get(f"/api/images/{image_id}")
    if got.status != 200 or got.json["status"] != "failed" or got.json["error"] != error:
        problems.append(f"{name}: GET by id after the failure: {got.status} {got.text[:200]}")
    return image_id, problems


async def check_stored(client, name: str, image_id: str, data: bytes) -> list[str]:
    """An accepted hostile file: recorded, stored as sent, and a thumbnail or a clean 4xx."""
    problems: list[str] = []
    _, got = await client.get(f"/api/images/{image_id}")
    if got.status != 200 or got.json["status"] != "success":
        problems.append(f"{name}: GET by id: {got.status} {got.text[:200]}")
    _, original = await client.get(f"/api/images/{image_id}/original")
    if original.status != 200 or original.content != data:
        problems.append(f"{name}: original download {original.status} differs")
    _, thumb = await client.get(f"/api/images/{image_id}/thumbnails/small")
    if thumb.status >= 500:
        problems.append(f"{name}: thumbnail {thumb.status}: {thumb.text[:200]}")
    elif thumb.status == 200:
        with Image.open(io.BytesIO(thumb.content)) as im:
            if im.format != "JPEG" or max(im.size) > 256 or len(im.getexif()):
                problems.append(f"{name}: thumbnail {im.format} {im.size}")
    elif set(thumb.json) != {"status", "data", "error"}:
        problems.append(f"{name}: thumbnail refusal not in the error shape: {thumb.text[:200]}")
    return problems


async def test_every_hostile_file_is_refused_clearly_or_accepted_cleanly(client, cfg, hostile):
    rows = manifest("hostile")
    assert len(rows) >= 40
    problems: list[str] = []
    outcomes: dict[str, str] = {}
    for row in rows:
        data = (hostile / row["file"]).read_bytes()
        image_id, found = await check_hostile(client, cfg, row, data)
        problems += found
        if image_id:
            outcomes[image_id] = row["file"]
    assert not problems, "\n".join(problems)

    # Every upload is recorded: one images row each, with the error when refused.
    recorded = image_rows(cfg)
    assert set(recorded) == set(outcomes), set(outcomes) ^ set(recorded)
    accepted = {i for i, (error, _) in recorded.items() if error is None}
    # An original for each accepted upload, under the key its record holds, and none for a
    # refused one; no temp file, no open S3 multipart upload left behind.
    stored = media_view.keys(cfg, "originals/")
    assert stored == sorted(recorded[i][1] for i in accepted)
    assert {Path(key).stem for key in stored} == accepted
    assert all(key is None for error, key in recorded.values() if error is not None)
    assert media_view.leftovers(cfg) == []
    _, res = await client.get("/api/stats")
    assert res.json["total"] == len(rows)
    assert res.json["failed"] == len(rows) - len(accepted)
    # Most of the hostile folder is meant to be refused: a validator that accepts everything
    # Pillow can open would let these through.
    refused_names = {outcomes[i] for i in set(outcomes) - accepted}
    for must_refuse in (
        "jpeg-truncated-10000b.jpg",
        "png-truncated-mid-idat.png",
        "bomb-lottapixel-64250x64250.jpg",
        "bomb-spark-225000x225000.png",
        "zero-length.jpeg",
        "notimage-xlsx-as.png",
    ):
        assert must_refuse in refused_names, must_refuse
