"""Formats through the API: every accepted format uploads with its true format, size, frames and
shown size; thumbnails are served as JPEG, WebP or AVIF by the Accept header (or ?format=), with
their own ETags and Vary: Accept; the content decides the stored format; deletes take every
format's thumbnails."""

from __future__ import annotations

import io
from pathlib import Path

import media_view
import pytest
from conftest import multipart, running_app, wait_for
from format_samples import (
    SHOWN,
    STILLS,
    huge_heic,
    huge_tiff,
    make_samples,
    top_left_is_red,
    two_sized_heic,
)
from PIL import Image
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import formats
from imgapi_core.media import thumbnail_key


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_samples(tmp_path_factory.mktemp("formats"))


async def upload(client, path: Path, name: str | None = None, ctype: str = "") -> dict:
    _, res = await client.post(
        "/api/images", files=multipart(path.read_bytes(), name or path.name, ctype)
    )
    assert res.status == 201, res.text
    return res.json


async def jobs_done(client, image_id: str) -> bool:
    _, res = await client.get(f"/api/images/{image_id}")
    return all(j["state"] in ("done", "skipped") for j in res.json["data"]["jobs"].values())


@pytest.mark.parametrize("name", list(STILLS))
async def test_each_format_uploads_and_is_served(client, samples, name):
    body = await upload(client, samples[name])
    meta = body["data"]["metadata"]
    assert meta["format"] == name and meta["frames"] == 1
    assert (meta["display_width"], meta["display_height"]) == SHOWN
    image_id = body["data"]["image_id"]
    _, original = await client.get(f"/api/images/{image_id}/original")
    assert original.status == 200 and original.body == samples[name].read_bytes()
    assert original.headers["content-type"] == formats.by_name(name).content_type
    await wait_for(lambda: jobs_done(client, image_id))
    for fmt, content_type in (("jpeg", "image/jpeg"), ("webp", "image/webp")):
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/medium?format={fmt}")
        assert res.status == 200 and res.headers["content-type"] == content_type
        thumb = Image.open(io.BytesIO(res.body))
        assert thumb.height > thumb.width and top_left_is_red(thumb), (name, fmt)


async def test_an_animation_is_recorded_with_its_frames(client, samples):
    body = await upload(client, samples["animated-gif"])
    assert body["data"]["metadata"]["frames"] == 4


@pytest.mark.parametrize(
    ("accept", "served"),
    [
        ("image/avif,image/webp,*/*", "image/webp"),  # AVIF is not made by default
        ("image/webp,*/*;q=0.8", "image/webp"),
        ("image/webp;q=0", "image/jpeg"),
        ("*/*", "image/jpeg"),
        ("image/*", "image/jpeg"),
        ("", "image/jpeg"),
    ],
)
async def test_the_accept_header_picks_the_thumbnail_format(client, samples, accept, served):
    image_id = (await upload(client, samples["jpeg"]))["data"]["image_id"]
    headers = {"Accept": accept} if accept else {}
    _, res = await client.get(f"/api/images/{image_id}/thumbnails/small", headers=headers)
    assert res.status == 200 and res.headers["content-type"] == served
    assert res.headers["vary"] == "Accept"


async def test_each_format_has_its_own_etag(client, samples):
    image_id = (await upload(client, samples["jpeg"]))["data"]["image_id"]
    tags = set()
    for fmt in ("jpeg", "webp"):
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/small?format={fmt}")
        tags.add(res.headers["etag"])
        _, again = await client.get(
            f"/api/images/{image_id}/thumbnails/small?format={fmt}",
            headers={"If-None-Match": res.headers["etag"]},
        )
        assert again.status == 304
    assert len(tags) == 2


async def test_avif_thumbnails_when_enabled(make_settings, samples):
    cfg = make_settings(THUMB_FORMATS="jpeg,webp,avif")
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        data = (await upload(client, samples["heic"]))["data"]
        image_id, sha256 = data["image_id"], data["metadata"]["sha256"]
        _, res = await client.get(
            f"/api/images/{image_id}/thumbnails/small", headers={"Accept": "image/avif,*/*"}
        )
        assert res.status == 200 and res.headers["content-type"] == "image/avif"
        assert top_left_is_red(Image.open(io.BytesIO(res.body)))
        await wait_for(lambda: jobs_done(client, image_id))
        # 2 sizes x 3 formats, from the job's one decode
        assert media_view.keys(cfg, "thumbnails/") == sorted(
            thumbnail_key(size, sha256, fmt)
            for size in ("small", "medium")
            for fmt in ("jpeg", "webp", "avif")
        )
        _, res = await client.delete(f"/api/images/{image_id}")
        assert res.status == 204
        assert media_view.keys(cfg) == []


async def test_a_format_that_is_not_made_is_400(client, samples):
    image_id = (await upload(client, samples["jpeg"]))["data"]["image_id"]
    _, res = await client.get(f"/api/images/{image_id}/thumbnails/small?format=avif")
    assert res.status == 400 and "jpeg, webp" in res.json["error"]


async def test_the_content_decides_jpeg_bytes_named_png(client, samples, cfg):
    body = await upload(client, samples["jpeg"], "really-a-jpeg.png", "image/png")
    assert body["data"]["metadata"]["format"] == "jpeg"
    image_id = body["data"]["image_id"]
    assert media_view.keys(cfg, "originals/") == [f"originals/{image_id}.jpg"]
    _, res = await client.get(f"/api/images/{image_id}/original")
    assert res.headers["content-type"] == "image/jpeg"


async def test_the_same_heic_twice_shares_its_metadata(client, samples):
    first = await upload(client, samples["heic"], "one.heic")
    second = await upload(client, samples["heic"], "two.HEIC")
    assert first["data"]["metadata"]["sha256"] == second["data"]["metadata"]["sha256"]
    assert second["data"]["metadata"]["frames"] == 1
    assert second["data"]["metadata"]["display_width"] == SHOWN[0]


async def test_allowed_formats_narrow_uploads(make_settings, samples):
    async with running_app(make_settings(ALLOWED_FORMATS="jpeg,png")) as app:
        client = SanicASGITestClient(app)
        _, res = await client.post(
            "/api/images", files=multipart(samples["heic"].read_bytes(), "a.heic")
        )
        assert res.status == 415 and "(allowed: .jpeg, .jpg, .png)" in res.json["error"]
        # HEIC bytes under a .jpg name: the content is refused too.
        _, res = await client.post(
            "/api/images", files=multipart(samples["heic"].read_bytes(), "a.jpg", "image/jpeg")
        )
        assert res.status == 415 and "JPEG or PNG" in res.json["error"]


@pytest.mark.parametrize("name", ["heic", "avif", "webp", "tiff", "animated-gif"])
async def test_a_broken_file_of_each_format_is_recorded_and_leaves_nothing(
    client, cfg, samples, name
):
    data = samples[name].read_bytes()
    cut = data[: len(data) // 2]
    _, res = await client.post(
        "/api/images",
        files=multipart(cut, f"broken.{formats.by_name(name.split('-')[-1]).stored_ext}"),
    )
    assert res.status in (400, 413), res.text
    assert res.json["status"] == "failed" and res.json["error"]
    _, again = await client.get(f"/api/images/{res.json['data']['image_id']}")
    assert again.status == 200 and again.json["error"] == res.json["error"]  # recorded
    assert media_view.keys(cfg) == []  # no original, no thumbnail
    assert media_view.leftovers(cfg) == []  # no temp file, no open S3 multipart upload


BOMBS = {
    # name: (file name, bytes maker, MAX_PIXELS)
    "gif-frames-sum": ("frames.gif", lambda s: s["animated-gif"].read_bytes(), 150 * 225 * 3),
    "tiff-declared-huge": ("scan.tif", lambda s: huge_tiff(), 50_000_000),
    "heic-declared-huge": ("phone.heic", huge_heic, 50_000_000),
    "heic-large-second-image": ("two.heic", lambda s: two_sized_heic(), 100_000),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
async def test_a_bomb_of_each_kind_is_refused_recorded_and_leaves_nothing(
    make_settings, samples, bomb
):
    """Files that hold or declare more pixels than MAX_PIXELS: the frames of an animation summed,
    a header's declared size, a HEIF's second image. A clear 4xx, recorded like any refusal."""
    name, make, max_pixels = BOMBS[bomb]
    cfg = make_settings(MAX_PIXELS=str(max_pixels))
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        _, res = await client.post("/api/images", files=multipart(make(samples), name))
        assert res.status in (400, 413), res.text
        assert res.json["status"] == "failed" and "pixels" in res.json["error"], res.text
        _, again = await client.get(f"/api/images/{res.json['data']['image_id']}")
        assert again.status == 200 and again.json["error"] == res.json["error"]  # recorded
        _, stats = await client.get("/api/stats")
        assert stats.json["failed"] == 1
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []
