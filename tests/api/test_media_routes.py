"""GET /api/images/{id}/thumbnails/{size} and /original, through sanic-testing's ASGI client:
thumbnails made on demand, upright and clean, their ETags; the original's bytes. (Conditional
requests and byte ranges: test_media_http.py.)"""

from __future__ import annotations

import media_view
from api_helpers import (
    THUMB_BOXES,
    THUMB_CACHE,
    assert_error_shape,
    assert_no_server_path,
    corrupt_jpeg,
    exif_jpeg,
    jpeg_bytes,
    mean_difference,
    no_worker,
    open_jpeg,
    path_of,
    png_bytes,
    upload,
    upload_ok,
)
from PIL import Image

from imgapi_core.media import thumbnail_key

# Mean absolute difference (0-255 per channel) between an upright thumbnail and orient1's: measured
# 0.5-2.5 for orient2..8, 70-87 for a mirrored or rotated orient1.
UPRIGHT_MAX_DIFF = 10.0


# -- thumbnails on demand -----------------------------------------------------------------------


async def test_thumbnail_size_other_than_small_or_medium_is_400(client):
    body = await upload_ok(client, jpeg_bytes())
    image_id = body["data"]["image_id"]
    for size in ("large", "SMALL", "256", "..%2F..%2Fetc"):
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/{size}")
        err = assert_error_shape(res, 400)
        assert "small" in err["error"] and "medium" in err["error"]


@no_worker
async def test_thumbnails_are_made_on_demand_upright_and_clean(client, cfg, photos):
    thumbs: dict[tuple[int, str], Image.Image] = {}
    ids: dict[int, str] = {}
    digests: set[str] = set()
    for n in range(1, 9):
        data = (photos / f"orient{n}.jpg").read_bytes()
        body = await upload_ok(client, data, f"orient{n}.jpg")
        ids[n] = body["data"]["image_id"]
        digests.add(body["data"]["metadata"]["sha256"])
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
    # 8 images x 2 sizes, in each format of THUMB_FORMATS (jpeg, webp), from one decode each.
    expected = sorted(
        thumbnail_key(size_name, digest, fmt)
        for digest in digests
        for size_name in THUMB_BOXES
        for fmt in cfg.thumb_formats
    )
    assert len(expected) == 8 * 2 * len(cfg.thumb_formats)
    assert media_view.keys(cfg, "thumbnails/") == expected


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
