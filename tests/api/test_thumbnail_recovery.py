"""Thumbnails are derived data (written without fsync on a local folder): what a crash or a lost
disk leaves of them is re-rendered."""

from __future__ import annotations

import io
from pathlib import Path

import media_view
import pytest
from conftest import multipart
from PIL import Image
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import settings as settings_mod
from imgapi_core.media import thumbnail_key

# No runner: the thumbnail route alone makes thumbnails.
pytestmark = pytest.mark.parametrize("cfg", [{"WORKER": "off"}], indirect=True, ids=["WORKER=off"])


async def upload_orient6(client: SanicASGITestClient, photos: Path) -> tuple[str, str]:
    body = (photos / "orient6.jpg").read_bytes()
    _, res = await client.post("/api/images", files=multipart(body, "orient6.jpg"))
    assert res.status == 201, res.text
    return res.json["data"]["image_id"], res.json["data"]["metadata"]["sha256"]


async def rendered_small(client: SanicASGITestClient, image_id: str) -> bytes:
    _, res = await client.get(f"/api/images/{image_id}/thumbnails/small")
    assert res.status == 200, res.text
    # Stored 1200x1800 with orientation 6: upright it is landscape.
    assert Image.open(io.BytesIO(res.body)).size == (256, 171)
    return res.body


@pytest.mark.local_engines(
    "an empty thumbnail file is what an unsynced write to a local folder leaves after a power"
    " loss; an S3 write is atomic, so a key never holds a cut-short object"
)
async def test_an_empty_thumbnail_left_by_a_crash_is_rendered_again(
    client, cfg: settings_mod.Settings, photos
) -> None:
    image_id, sha256 = await upload_orient6(client, photos)
    # What a power loss can leave of an unsynced write: the name, with no data behind it.
    key = thumbnail_key("small", sha256)
    path = Path(cfg.media_dir) / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    assert media_view.read(cfg, key) == b""
    body = await rendered_small(client, image_id)
    assert media_view.read(cfg, key) == body


async def test_a_lost_thumbnail_is_rendered_again(
    client, cfg: settings_mod.Settings, photos
) -> None:
    image_id, sha256 = await upload_orient6(client, photos)
    key = thumbnail_key("small", sha256)
    first = await rendered_small(client, image_id)
    assert media_view.read(cfg, key) == first
    media_view.remove(cfg, key)  # lost behind the app's back (a disk, a bucket policy)
    assert not media_view.exists(cfg, key)
    again = await rendered_small(client, image_id)
    assert media_view.read(cfg, key) == again
