"""Thumbnails are written without fsync (derived data): what a crash can leave is re-rendered."""

from __future__ import annotations

import io

import pytest
from conftest import multipart, thumbnail_file
from PIL import Image
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import app as imgapi_app


@pytest.mark.local_engines
async def test_an_empty_thumbnail_left_by_a_crash_is_rendered_again(make_settings, photos) -> None:
    cfg = make_settings(WORKER="off")  # no runner: the route alone makes thumbnails
    app = imgapi_app.create_app(cfg, own_resources=False)
    await imgapi_app.open_resources(app)
    try:
        client = SanicASGITestClient(app)
        body = (photos / "orient6.jpg").read_bytes()
        _, res = await client.post("/api/images", files=multipart(body, "orient6.jpg"))
        assert res.status == 201
        image_id, sha256 = res.json["data"]["image_id"], res.json["data"]["metadata"]["sha256"]
        # What a power loss can leave of an unsynced write: the name, with no data behind it.
        path = thumbnail_file(cfg, "small", sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/small")
        assert res.status == 200
        # Stored 1200x1800 with orientation 6: upright it is landscape.
        assert Image.open(io.BytesIO(res.body)).size == (256, 171)
        assert path.stat().st_size == len(res.body) > 0
    finally:
        await imgapi_app.close_resources(app)
