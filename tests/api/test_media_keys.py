"""The database holds storage keys, not server paths (moving MEDIA_DIR just works), and no
derivative of a deleted image remains: not after a job that ran during the delete, not after a
crash (the start-up sweep)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import running_app, wait_for
from job_helpers import upload, wait_jobs
from PIL import Image
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import imaging
from imgapi_core.media import thumbnail_key


def jpeg(size: tuple[int, int] = (640, 480)) -> bytes:
    """A photo-like JPEG of its own (noise: new bytes every call)."""
    out = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def db_rows(db_path: str, sql: str, *params: object) -> list[tuple]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.local_engines
async def test_originals_are_found_after_the_media_folder_moves(make_settings, tmp_path):
    old = make_settings(MEDIA_DIR=str(tmp_path / "small-disk" / "media"))
    async with running_app(old) as app:
        client = SanicASGITestClient(app)
        body = await upload(client, jpeg(), "moved.jpg")
        image_id = body["data"]["image_id"]
        await wait_jobs(client, image_id)
        _, original = await client.get(f"/api/images/{image_id}/original")
    (key,) = db_rows(old.db_path, "SELECT image_path FROM images WHERE image_id = ?", image_id)
    assert key == (f"originals/{image_id}.jpg",)  # a key, no server path
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


@pytest.mark.local_engines
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
    thumbs = Path(cfg.media_dir) / "thumbnails"
    assert [p for p in files_under(thumbs) if sha256 in p.name] == []


@pytest.mark.local_engines
async def test_the_start_up_sweep_removes_orphan_thumbnails_and_originals(make_settings):
    cfg = make_settings()
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        body = await upload(client, jpeg(), "kept.jpg")
        await wait_jobs(client, body["data"]["image_id"])
        kept = files_under(Path(cfg.media_dir) / "thumbnails")
    media = Path(cfg.media_dir)
    orphans = [
        media / thumbnail_key("small", "cd" * 32),
        media / "originals" / "deadbeef.jpg",
    ]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a crash")
        old = time.time() - 3600
        os.utime(path, (old, old))
    async with running_app(cfg):
        pass
    assert [p for p in orphans if p.exists()] == []
    assert files_under(media / "thumbnails") == kept


@pytest.mark.local_engines
async def test_a_delete_leaves_no_file_of_the_image(client, cfg):
    body = await upload(client, jpeg(), "bye.jpg")
    image_id = body["data"]["image_id"]
    await wait_jobs(client, image_id)
    assert files_under(Path(cfg.media_dir) / "originals")
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204
    media = Path(cfg.media_dir)
    assert files_under(media / "originals") == [] and files_under(media / "thumbnails") == []
