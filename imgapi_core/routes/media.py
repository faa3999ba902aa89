"""An image's bytes: its thumbnails (made on demand when their job has not run yet) and the
original as uploaded, with HTTP validators, conditional requests and byte ranges (RFC 9110)."""

from __future__ import annotations

import asyncio
from email.utils import format_datetime

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.response import raw

from imgapi_core import formats, imaging, records
from imgapi_core.access.scopes import READ, requires
from imgapi_core.errors import ClientError
from imgapi_core.media import MediaMissing, Reader, thumbnail_key
from imgapi_core.routes import json_response
from imgapi_core.routes.conditional import (
    RangeNotSatisfiable,
    header_value,
    last_modified,
    none_match,
    not_modified,
    precondition_check,
    requested_range,
)
from imgapi_core.settings import Settings
from imgapi_core.store import Record
from imgapi_core.thumbnails import OriginalGone, make_thumbnails

bp = Blueprint("media")


async def load_record(request: Request, image_id: str) -> Record:
    record = await request.app.ctx.store.get_record(image_id)
    if record is None:
        raise ClientError(404, f"no image with id {image_id!r}")
    return record


@bp.get("/api/images/<image_id:str>/thumbnails/<size:str>", name="get_thumbnail")
@requires(READ)
async def get_thumbnail(request: Request, image_id: str, size: str) -> HTTPResponse:
    cfg: Settings = request.app.ctx.settings
    if size not in imaging.THUMB_SIZES:
        raise ClientError(400, f"size must be one of {', '.join(imaging.THUMB_SIZES)}")
    fmt = thumbnail_format(request, cfg.thumb_formats)
    record = await load_record(request, image_id)
    if record.error is not None or record.sha256 is None:
        raise ClientError(404, f"image {image_id!r} failed to upload: it has no thumbnails")
    sha256 = record.sha256
    # The JPEG's tag is what it was before other formats existed: caches keep what they hold.
    etag = f'"{sha256}-{size}"' if fmt == "jpeg" else f'"{sha256}-{size}-{fmt}"'
    headers = {
        "ETag": etag,
        "Cache-Control": request.app.ctx.guard.cache_control(request),
        # The format follows the Accept header: a cache must keep one copy per Accept.
        "Vary": "Accept",
    }
    if none_match(header_value(request, "if-none-match"), etag):
        return HTTPResponse(status=304, headers=headers)
    media = request.app.ctx.media
    key = thumbnail_key(size, sha256, fmt)
    content_type = formats.THUMB_CONTENT_TYPES[fmt]
    if redirects(request):
        if await media.stat(key) is None:
            await render_on_demand(request.app, sha256)
            if await media.stat(key) is None:
                raise ClientError(404, f"no image with id {image_id!r}")
        moved = await redirect_to(request, key, content_type, vary="Accept")
        if moved is not None:
            return moved
    try:
        data = await media.read_bytes(key)
    except MediaMissing:
        await render_on_demand(request.app, sha256)
        try:
            data = await media.read_bytes(key)
        except MediaMissing:
            # Rendered, then removed by a delete of the image that ran meanwhile.
            raise ClientError(404, f"no image with id {image_id!r}") from None
    return raw(data, content_type=content_type, headers=headers)


def thumbnail_format(request: Request, enabled: tuple[str, ...]) -> str:
    """?format= when given (one of THUMB_FORMATS); else AVIF when the Accept header names it
    and it is made, else WebP likewise, else JPEG. `*/*` and `image/*` alone mean JPEG: a client
    that names no modern format gets the one every client reads."""
    asked = request.args.get("format")
    if asked is not None:
        if asked not in enabled:
            raise ClientError(400, f"format must be one of {', '.join(enabled)}")
        return asked
    named = accepted_types(request.headers.get("accept", ""))
    for fmt in ("avif", "webp"):
        if fmt in enabled and f"image/{fmt}" in named:
            return fmt
    return "jpeg"


def accepted_types(accept: str) -> set[str]:
    """The media types an Accept header names with a q-value above zero."""
    named: set[str] = set()
    for member in accept.split(","):
        kind, *params = (part.strip() for part in member.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if kind and q > 0:
            named.add(kind.lower())
    return named


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
    try:
        await make_thumbnails(
            app.ctx.store, app.ctx.media, app.ctx.cpu, sha256, app.ctx.settings.thumb_formats
        )
    except OriginalGone:
        raise ClientError(404, "the original of this image is gone") from None
    except ClientError as exc:
        raise ClientError(422, f"thumbnail cannot be made: {exc.message}") from None


# -- S3_REDIRECT --------------------------------------------------------------------------------

# The longest a presigned URL handed out in a redirect lives, whatever SIGNED_URL_TTL says: the
# client follows it at once, and a URL that leaks should not open the object for days.
REDIRECT_MAX_S = 24 * 3600
# A caller on a signed URL about to expire still gets time to follow the redirect.
REDIRECT_MIN_S = 10


def redirects(request: Request) -> bool:
    """S3_REDIRECT answers a GET with a 302 to the object. Not a HEAD: a presigned URL is signed
    for GET only, and S3 refuses a HEAD on it."""
    return request.app.ctx.settings.s3_redirect and request.method == "GET"


def presigned_seconds(request: Request) -> int:
    """SIGNED_URL_TTL, capped; no longer than the caller's own signed URL still has to live,
    so a redirect never extends the access the caller was given."""
    cfg: Settings = request.app.ctx.settings
    seconds = min(cfg.signed_url_ttl, REDIRECT_MAX_S)
    caller = getattr(request.ctx, "caller", None)
    if caller is not None and caller.signed_exp is not None:
        left = request.app.ctx.guard.signer.seconds_left(caller.signed_exp)
        seconds = min(seconds, max(left, REDIRECT_MIN_S))
    return seconds


async def redirect_to(
    request: Request,
    key: str,
    content_type: str,
    filename: str | None = None,
    vary: str | None = None,
) -> HTTPResponse | None:
    """A 302 to a presigned URL of the object, or None where the media store has none. Called
    only after the route's access checks: a refused request is never redirected."""
    seconds = presigned_seconds(request)
    url = await request.app.ctx.media.presigned_url(key, seconds, content_type, filename)
    if url is None:
        return None
    # The 302 may be reused only while its URL still has time to be followed; never by a shared
    # cache (the URL is a credential). No ETag: it would name the image, not this answer.
    headers = {"Location": url, "Cache-Control": f"private, max-age={seconds // 2}"}
    if vary:
        headers["Vary"] = vary
    return HTTPResponse(status=302, headers=headers)


# -- the original -------------------------------------------------------------------------------


@bp.get("/api/images/<image_id:str>/original", name="get_original")
@requires(READ)
async def get_original(request: Request, image_id: str) -> HTTPResponse | None:
    """200 (whole), 206 (one byte range), 304, 412 or 416; the body is streamed in chunks.

    Sanic's own file_stream/ContentRangeHandler are not used: they send no Content-Length, answer
    a malformed or multi-range header with 416 instead of ignoring it, do not clamp a last-pos past
    the end or a suffix longer than the file, and stream past the end of a range longer than
    their chunk size.
    """
    record = await load_record(request, image_id)
    if record.error is not None or record.original_key is None:
        raise ClientError(404, f"image {image_id!r} failed to upload: nothing was stored")
    try:
        # One opened version: the headers describe exactly the bytes sent, even if a DELETE
        # removes the original while it is being sent.
        async with request.app.ctx.media.reader(record.original_key) as reader:
            return await _send_original(request, record, reader)
    except MediaMissing:
        raise ClientError(404, "the original of this image is gone") from None


async def _send_original(request: Request, record: Record, reader: Reader) -> HTTPResponse | None:
    size = reader.stat.size
    etag = f'"{record.sha256}"'
    modified = last_modified(record.processed_at, reader.stat.mtime)
    headers = {
        "ETag": etag,
        "Last-Modified": format_datetime(modified, usegmt=True),
        "Cache-Control": request.app.ctx.guard.cache_control(request),
        "Accept-Ranges": "bytes",
    }
    precondition_check(request, etag, modified)
    if not_modified(request, etag, modified):
        return HTTPResponse(status=304, headers=headers)
    assert record.format and record.width and record.height and record.original_key
    content_type = imaging.image_info(record.format, record.width, record.height).content_type
    if redirects(request):
        # Conditions on this ETag were answered above; a Range goes on to S3 with the client.
        moved = await redirect_to(
            request, record.original_key, content_type, filename=record.original_name
        )
        if moved is not None:
            return moved
    try:
        span = requested_range(request, size, etag, modified)
    except RangeNotSatisfiable:
        # The one error shape, built here rather than raised: ClientError carries no headers,
        # and a 416 must say the current length (RFC 9110 section 15.5.17).
        headers["Content-Range"] = f"bytes */{size}"
        message = f"range not satisfiable: the original is {size} bytes"
        return json_response(records.failure(message), status=416, headers=headers)
    status, start, length = 200, 0, size
    if span is not None:
        status, start, length = 206, span[0], span[1] - span[0] + 1
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    # A known length: Sanic's HTTP/1 then frames the stream with it instead of chunking.
    headers["Content-Length"] = str(length)
    response = await request.respond(status=status, headers=headers, content_type=content_type)
    # sanic-ext answers HEAD with this GET handler; Sanic would drop the body, so skip reading
    # it. The headers (Content-Length included) are the GET's.
    if request.method != "HEAD":
        # A short read raises inside chunks(): Content-Length is already sent, so failing cuts
        # the connection and the client cannot take a short body for the whole file.
        async for chunk in reader.chunks(start, start + length):
            await response.send(chunk)
    await response.eof()
    return None
