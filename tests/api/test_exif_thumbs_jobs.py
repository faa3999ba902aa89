"""What the jobs produce from the corpus: upright thumbnails, GPS in decimal degrees, JSON-safe
EXIF, and a runner that survives every hostile file the upload lets through."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import media_view
import pytest
from conftest import manifest, multipart
from job_helpers import FINISHED, db_rows, thumbnail_keys, upload, wait_jobs
from PIL import Image, ImageChops, ImageStat
from sanic_testing.testing import SanicASGITestClient

from imgapi_core.settings import Settings

# A wrongly oriented thumbnail differs from the upright one by ~70 (mean absolute difference per
# channel, 0-255); the same picture through another orientation's decode path, by under 3.
UPRIGHT_MAX_DIFF = 8.0

# Hand-computed from each file's GPS (degrees, minutes, seconds) and N/S/E/W refs.
GPS = {
    "iphone6plus-8mp-gps.jpg": (51.482995, -3.185337),  # 51° 28.9797' N, 3° 11.1202' W
    "nokia83-9mp-gps.jpg": (60.146706, 24.906772),  # 60° 8' 48.14" N, 24° 54' 24.38" E
    "nikon-p6000-gps.jpg": (43.467448, 11.885127),  # 43° 28' 2.814" N, 11° 53' 6.456" E
    "samsung-s7-12mp-gps-orient6.jpg": (
        37.786054,
        -122.390975,
    ),  # 37° 47' 9.80" N, 122° 23' 27.51" W
}
NAN_GPS = ("leica-t-16mp-orient8-nangps.jpg", "motog9plus-16mp-nangps.jpg")


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    channels = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean
    return sum(channels) / len(channels)


def load_rgb(cfg: Settings, key: str) -> Image.Image:
    with Image.open(io.BytesIO(media_view.read(cfg, key) or b"")) as im:
        assert im.format == "JPEG"
        return im.convert("RGB")


def no_nan(token: str) -> None:
    raise ValueError(f"not JSON: {token}")


async def upload_all(
    client: SanicASGITestClient, folder: Path, names: list[str]
) -> dict[str, dict]:
    bodies = {}
    for name in names:
        bodies[name] = await upload(client, (folder / name).read_bytes(), name)
    return bodies


async def test_every_orientation_gives_an_upright_thumbnail(
    client: SanicASGITestClient, cfg: Settings, photos: Path
) -> None:
    names = [f"orient{i}.jpg" for i in range(1, 9)]
    bodies = await upload_all(client, photos, names)
    thumbs: dict[str, dict[str, Image.Image]] = {}
    for name, body in bodies.items():
        record = await wait_jobs(client, body["data"]["image_id"], ["thumbnail"], ["done"])
        keys = thumbnail_keys(record["data"]["metadata"]["sha256"])
        thumbs[name] = {size: load_rgb(cfg, key) for size, key in keys.items()}

    reference = thumbs["orient1.jpg"]
    assert reference["small"].size == (256, 171) and reference["medium"].size == (768, 512)
    # The comparison can tell: orient1's own thumbnail mirrored is far from upright.
    mirrored = reference["small"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert mean_difference(mirrored, reference["small"]) > 4 * UPRIGHT_MAX_DIFF
    for name in names[1:]:
        for size, image in thumbs[name].items():
            assert image.size == reference[size].size, (name, size)
            assert mean_difference(image, reference[size]) < UPRIGHT_MAX_DIFF, (name, size)


async def test_gps_photos_give_decimal_coordinates(
    client: SanicASGITestClient, photos: Path
) -> None:
    bodies = await upload_all(client, photos, list(GPS))
    for name, (latitude, longitude) in GPS.items():
        record = await wait_jobs(client, bodies[name]["data"]["image_id"], ["exif"], ["done"])
        exif = record["data"]["metadata"]["exif"]
        assert exif["latitude"] == pytest.approx(latitude, abs=2e-5), name
        assert exif["longitude"] == pytest.approx(longitude, abs=2e-5), name
        assert isinstance(exif["GPSInfo"], dict)


async def test_nan_gps_photos_give_valid_json_without_coordinates(
    client: SanicASGITestClient, photos: Path
) -> None:
    bodies = await upload_all(client, photos, list(NAN_GPS))
    for name in NAN_GPS:
        image_id = bodies[name]["data"]["image_id"]
        await wait_jobs(client, image_id, ["exif"], ["done"])
        _, res = await client.get(f"/api/images/{image_id}")
        assert res.status == 200
        exif = json.loads(res.text, parse_constant=no_nan)["data"]["metadata"]["exif"]
        assert exif.get("Make"), name  # the rest of the EXIF is there
        assert "GPSInfo" in exif, name
        assert "latitude" not in exif and "longitude" not in exif, name
    _, res = await client.get("/api/images")
    assert len(json.loads(res.text, parse_constant=no_nan)) == len(NAN_GPS)


async def test_hostile_files_that_pass_validation_leave_the_runner_alive(
    app, client: SanicASGITestClient, cfg: Settings, hostile: Path, photos: Path
) -> None:
    accepted: dict[str, str] = {}
    for entry in manifest("hostile"):
        name = entry["file"]
        content_type = "image/png" if name.endswith(".png") else "image/jpeg"
        _, res = await client.post(
            "/api/images",
            files=multipart((hostile / name).read_bytes(), name, content_type),
        )
        assert res.status in (201, 400, 413, 415), (name, res.status, res.text)
        if res.status == 201:
            accepted[name] = res.json["data"]["image_id"]
    assert len(accepted) >= 10, sorted(accepted)  # the corpus's "valid" files, at least

    outcome: dict[str, dict] = {}
    for name, image_id in accepted.items():
        record = await wait_jobs(client, image_id, within=60)
        outcome[name] = record["data"]["jobs"]
    for name, job_states in outcome.items():
        for kind in ("thumbnail", "exif"):
            state = job_states[kind]
            assert state["state"] in ("done", "failed"), (name, kind, state)
            if state["state"] == "failed":
                assert state["error"], (name, state)
                # No server path (nor bucket) in what clients see.
                assert str(cfg.media_dir) not in state["error"], (name, state)
                assert "s3://" not in state["error"], (name, state)
                assert state["attempts"] < cfg.job_max_attempts or "gave up" in state["error"]
    running = [r for r in await asyncio.to_thread(_job_states, cfg) if r not in FINISHED]
    assert running == []

    # Still alive: a real photo uploaded after all of that is processed.
    assert app.ctx.jobs.local is not None
    body = await upload(client, (photos / "nikon-p6000-gps.jpg").read_bytes())
    record = await wait_jobs(client, body["data"]["image_id"], states=("done",))
    assert record["data"]["metadata"]["exif"]["latitude"] == pytest.approx(43.467448, abs=2e-5)


def _job_states(cfg: Settings) -> list[str]:
    return [row["state"] for row in db_rows(cfg, "SELECT state FROM jobs")]
