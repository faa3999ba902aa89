"""An image's bytes: its thumbnails (made on demand when their job has not run yet) and the
original as uploaded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.response import file_stream, raw

from imgapi_core import imaging
from imgapi_core.errors import ClientError
from imgapi_core.settings import Settings

THUMB_CACHE = "public, max-age=31536000, immutable"

bp = Blueprint("media")


async def load_record(request: Request, image_id: str) -> Any:
    row = await request.app.ctx.store.get_record(image_id)
    if row is None:
        raise ClientError(404, f"no image with id {image_id!r}")
    return row


@bp.get("/api/images/<image_id:str>/thumbnails/<size:str>", name="get_thumbnail")
async def get_thumbnail(request: Request, image_id: str, size: str) -> HTTPResponse:
    if size not in imaging.THUMB_SIZES:
        raise ClientError(400, f"size must be one of {', '.join(imaging.THUMB_SIZES)}")
    row = await load_record(request, image_id)
    if row["error"] is not None:
        raise ClientError(404, f"image {image_id!r} failed to upload: it has no thumbnails")
    sha256 = row["sha256"]
    etag = f'"{sha256}-{size}"'
    headers = {"ETag": etag, "Cache-Control": THUMB_CACHE}
    if etag in request.headers.get("if-none-match", ""):
        return HTTPResponse(status=304, headers=headers)
    cfg: Settings = request.app.ctx.settings
    path = imaging.thumbnail_path(cfg.thumbnails_dir, size, sha256)
    if not _has_content(path):
        await render_on_demand(request.app, sha256)
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(None, path.read_bytes)
    return raw(data, content_type="image/jpeg", headers=headers)


def _has_content(path: Path) -> bool:
    """False for a missing file, and for the empty one a crash can leave of an unsynced write."""
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


async def render_on_demand(app: Sanic, sha256: str) -> None:
    """The thumbnail job's own function, run now; concurrent requests share one rendering."""
    pending: dict[str, asyncio.Future] = app.ctx.rendering
    task = pending.get(sha256)
    if task is None:
        task = asyncio.ensure_future(_render(app, sha256))
        pending[sha256] = task
        task.add_done_callback(lambda _t: pending.pop(sha256, None))
    await asyncio.shield(task)


async def _render(app: Sanic, sha256: str) -> None:
    cfg: Settings = app.ctx.settings
    source = await app.ctx.store.original_of(sha256)
    if source is None or not Path(source).exists():
        raise ClientError(404, "the original of this image is gone")
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(
            app.ctx.cpu, imaging.write_thumbnails, source, cfg.thumbnails_dir, sha256
        )
    except ClientError as exc:
        raise ClientError(422, f"thumbnail cannot be made: {exc.message}") from None


@bp.get("/api/images/<image_id:str>/original", name="get_original")
async def get_original(request: Request, image_id: str) -> HTTPResponse:
    row = await load_record(request, image_id)
    if row["error"] is not None:
        raise ClientError(404, f"image {image_id!r} failed to upload: nothing was stored")
    path = Path(row["image_path"])
    if not path.exists():
        raise ClientError(404, "the original of this image is gone")
    return await file_stream(
        path,
        mime_type=imaging.image_info(row["format"], row["width"], row["height"]).content_type,
        headers={"Cache-Control": THUMB_CACHE},
    )
