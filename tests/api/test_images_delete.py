"""DELETE /api/images/{id}, through sanic-testing's ASGI client: records, originals and
thumbnails go; bytes shared by another upload stay until the last one goes."""

from __future__ import annotations

import media_view
from api_helpers import (
    THUMB_BOXES,
    XLSX,
    assert_error_shape,
    db_count,
    exif_jpeg,
    jpeg_bytes,
    no_worker,
    open_jpeg,
    sha256,
    upload,
    upload_ok,
)

from imgapi_core.media import original_key, thumbnail_key

# -- delete -------------------------------------------------------------------------------------


@no_worker
async def test_delete_removes_record_and_original(client, cfg):
    body = await upload_ok(client, jpeg_bytes(), "gone.jpg")
    image_id = body["data"]["image_id"]
    assert media_view.keys(cfg) == [original_key(image_id, "jpg")]
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204 and res.content == b""
    for suffix in ("", "/original", "/thumbnails/small"):
        _, res = await client.get(f"/api/images/{image_id}{suffix}")
        assert_error_shape(res, 404)
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []
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
    for size_name in THUMB_BOXES:  # made on demand: the thumbnails are now stored
        _, res = await client.get(f"/api/images/{first}/thumbnails/{size_name}")
        assert res.status == 200
    thumb_keys = [thumbnail_key(s, digest, "jpeg") for s in THUMB_BOXES]
    assert all(media_view.exists(cfg, key) for key in thumb_keys)
    originals = sorted(original_key(image_id, "jpg") for image_id in (first, second))
    assert media_view.keys(cfg, "originals/") == originals

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
    assert all(media_view.exists(cfg, key) for key in thumb_keys)
    assert media_view.keys(cfg, "originals/") == [original_key(second, "jpg")]
    assert db_count(cfg, "metadata") == 1 and db_count(cfg, "jobs") == 3

    _, res = await client.delete(f"/api/images/{second}")
    assert res.status == 204
    assert not any(media_view.exists(cfg, key) for key in thumb_keys)
    assert media_view.keys(cfg) == []  # no original, no thumbnail in any format
    assert media_view.leftovers(cfg) == []
    assert db_count(cfg, "metadata") == 0
    assert db_count(cfg, "jobs") == 0
    assert db_count(cfg, "images") == 0 and db_count(cfg, "stats") == 0
