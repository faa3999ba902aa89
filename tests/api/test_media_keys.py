"""The database holds storage keys, not server paths (moving MEDIA_DIR just works), and no
derivative of a deleted image remains: not after a job that ran during the delete, not after a
crash (the start-up sweep)."""

from __future__ import annotations

import asyncio
import io
import shutil
import threading

import db_query
import media_view
import pytest
from conftest import running_app, wait_for
from job_helpers import original_key, thumbnail_keys, upload, wait_jobs
from PIL import Image
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import housekeeping, imaging
from imgapi_core.media import thumbnail_key
from imgapi_core.settings import Settings


def jpeg(size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-like JPEG of its own (noise: new bytes every call)."""
    out = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def image_path(cfg: Settings, image_id: str) -> str:
    (row,) = db_query.fetch(cfg, "SELECT image_path FROM images WHERE image_id = ?", (image_id,))
    return row[0]


async def test_the_database_holds_storage_keys_not_server_paths(client, cfg):
    body = await upload(client, jpeg(), "keyed.jpg")
    image_id, sha256 = body["data"]["image_id"], body["data"]["metadata"]["sha256"]
    await wait_jobs(client, image_id)
    key = image_path(cfg, image_id)
    assert key == f"originals/{image_id}.jpg" == original_key(cfg, image_id)
    # What the key names is what is stored (a file under MEDIA_DIR, an object in the bucket).
    _, original = await client.get(f"/api/images/{image_id}/original")
    assert original.status == 200 and media_view.read(cfg, key) == original.body
    for thumb in thumbnail_keys(sha256).values():
        assert media_view.exists(cfg, thumb), thumb


@pytest.mark.local_engines("a media folder moved on disk: S3 has no folder")
async def test_originals_are_found_after_the_media_folder_moves(make_settings, tmp_path):
    old = make_settings(MEDIA_DIR=str(tmp_path / "small-disk" / "media"))
    async with running_app(old) as app:
        client = SanicASGITestClient(app)
        body = await upload(client, jpeg(), "moved.jpg")
        image_id = body["data"]["image_id"]
        await wait_jobs(client, image_id)
        _, original = await client.get(f"/api/images/{image_id}/original")
    assert image_path(old, image_id) == f"originals/{image_id}.jpg"  # a key, no server path
    new_dir = tmp_path / "big-disk" / "media"
    new_dir.parent.mkdir()
    shutil.move(old.media_dir, new_dir)
    new = make_settings(MEDIA_DIR=str(new_dir))
    async with running_app(new) as app:
        client = SanicASGITestClient(app)
        _, res = await client.get(f"/api/images/{image_id}/original")
        assert res.status == 200 and res.body == original.body
        for size in ("small", "medium"):
            _, res = await client.get(f"/api/images/{image_id}/thumbnails/{size}")
            assert res.status == 200


async def test_no_thumbnail_of_an_image_deleted_while_its_job_runs(app, client, cfg, monkeypatch):
    rendering, go_on = threading.Event(), threading.Event()
    real_render = imaging.render_thumbnail_set

    def slow_render(*args, **kwargs):
        # Decoded and rendered while the original exists; held before the thumbnails are written.
        rendered = real_render(*args, **kwargs)
        rendering.set()
        go_on.wait(10)
        return rendered

    monkeypatch.setattr(imaging, "render_thumbnail_set", slow_render)
    body = await upload(client, jpeg(), "gone-soon.jpg")
    image_id, sha256 = body["data"]["image_id"], body["data"]["metadata"]["sha256"]
    assert await asyncio.to_thread(rendering.wait, 10)
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204
    go_on.set()  # the job writes its thumbnails now, after the delete
    local = app.ctx.jobs.local
    await wait_for(lambda: not local._tasks)
    assert [key for key in media_view.keys(cfg, "thumbnails/") if sha256 in key] == []
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []


async def test_the_start_up_sweep_removes_orphan_thumbnails_and_originals(
    make_settings, monkeypatch
):
    # Orphans count as old at once: an S3 object's LastModified cannot be set back, as a file's
    # mtime can. Everything stored is then past the grace period, the kept files too: they stay
    # only because records refer to them.
    monkeypatch.setattr(housekeeping, "ORPHAN_GRACE_S", -3600.0)
    cfg = make_settings()
    orphans = [thumbnail_key("small", "cd" * 32), "originals/deadbeef.jpg"]
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        body = await upload(client, jpeg(), "kept.jpg")
        image_id, sha256 = body["data"]["image_id"], body["data"]["metadata"]["sha256"]
        await wait_jobs(client, image_id)
        kept = media_view.keys(cfg)
        # Left by a crash: written as the app writes media, then never committed.
        for key in orphans:
            await app.ctx.media.put_bytes(key, b"left by a crash")
    assert original_key(cfg, image_id) in kept
    assert set(thumbnail_keys(sha256).values()) <= set(kept)
    assert media_view.keys(cfg) == sorted(kept + orphans)
    async with running_app(cfg):
        pass
    assert [key for key in orphans if media_view.exists(cfg, key)] == []
    assert media_view.keys(cfg) == kept
    assert media_view.leftovers(cfg) == []


async def test_a_delete_leaves_no_file_of_the_image(client, cfg):
    body = await upload(client, jpeg(), "bye.jpg")
    image_id = body["data"]["image_id"]
    await wait_jobs(client, image_id)
    assert media_view.keys(cfg, "originals/") and media_view.keys(cfg, "thumbnails/")
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204
    assert media_view.keys(cfg) == []
    assert media_view.leftovers(cfg) == []
