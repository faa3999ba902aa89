"""What every route shares, through sanic-testing's ASGI client: 404s for unknown ids and routes,
the one error shape for every client error, and no server path in any answer."""

from __future__ import annotations

import media_view
from api_helpers import (
    assert_error_shape,
    assert_no_server_path,
    corrupt_jpeg,
    exif_jpeg,
    jobs_finished,
    jpeg_bytes,
    upload,
    upload_ok,
)
from conftest import multipart, wait_for

# -- 404s ---------------------------------------------------------------------------------------


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
    # The one upload's original is all that was stored, and no refusal left anything behind
    # (temp files, S3 multipart uploads). Its jobs first: on S3 the thumbnail job reads the
    # original through a temp file of its own.
    await wait_for(lambda: jobs_finished(client, image_id))
    (stored,) = media_view.keys(cfg, "originals/")
    assert stored.startswith(f"originals/{image_id}."), stored
    assert media_view.leftovers(cfg) == []


# -- no server path in any answer ---------------------------------------------------------------


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
