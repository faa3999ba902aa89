"""An image's bytes: its thumbnails (made on demand when their job has not run yet) and the
original as uploaded, with HTTP validators, conditional requests and byte ranges (RFC 9110)."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.response import raw

from imgapi_core import imaging, records
from imgapi_core.errors import ClientError
from imgapi_core.routes import json_response
from imgapi_core.settings import Settings

THUMB_CACHE = "public, max-age=31536000, immutable"
# Originals are sent in pieces of this size, so memory per download stays flat whatever the file.
CHUNK_BYTES = 256 * 1024

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
    if none_match(header_value(request, "if-none-match"), etag):
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


# -- the original -------------------------------------------------------------------------------


@bp.get("/api/images/<image_id:str>/original", name="get_original")
async def get_original(request: Request, image_id: str) -> HTTPResponse | None:
    """200 (whole), 206 (one byte range), 304, 412 or 416; the body is streamed in chunks.

    Sanic's own file_stream/ContentRangeHandler are not used: they send no Content-Length, answer
    a malformed or multi-range header with 416 instead of ignoring it, do not clamp a last-pos past
    the end or a suffix longer than the file, and stream past the end of a range longer than
    their chunk size.
    """
    row = await load_record(request, image_id)
    if row["error"] is not None:
        raise ClientError(404, f"image {image_id!r} failed to upload: nothing was stored")
    try:
        # Opened once and measured with fstat: the headers describe exactly the bytes this handle
        # reads, even if a DELETE unlinks the file while it is being sent.
        handle: BinaryIO = await asyncio.to_thread(open, row["image_path"], "rb")
    except FileNotFoundError:
        raise ClientError(404, "the original of this image is gone") from None
    try:
        stat = os.fstat(handle.fileno())
        size = stat.st_size
        etag = f'"{row["sha256"]}"'
        modified = last_modified(row["processed_at"], stat.st_mtime)
        headers = {
            "ETag": etag,
            "Last-Modified": format_datetime(modified, usegmt=True),
            "Cache-Control": THUMB_CACHE,
            "Accept-Ranges": "bytes",
        }
        precondition_check(request, etag, modified)
        if not_modified(request, etag, modified):
            return HTTPResponse(status=304, headers=headers)
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
        content_type = imaging.image_info(row["format"], row["width"], row["height"]).content_type
        response = await request.respond(status=status, headers=headers, content_type=content_type)
        # sanic-ext answers HEAD with this GET handler; Sanic would drop the body, so skip
        # reading it. The headers (Content-Length included) are the GET's.
        if request.method != "HEAD":
            await send_file(response, handle, start, length)
        await response.eof()
        return None
    finally:
        handle.close()


async def send_file(response: HTTPResponse, handle: BinaryIO, start: int, length: int) -> None:
    """`length` bytes from `start`, one chunk in memory at a time, read in a thread."""
    loop = asyncio.get_running_loop()
    fd = handle.fileno()
    offset, end = start, start + length
    while offset < end:
        chunk = await loop.run_in_executor(
            None, os.pread, fd, min(CHUNK_BYTES, end - offset), offset
        )
        if not chunk:
            # Content-Length is already sent: failing cuts the connection, so the client cannot
            # take a short body for the whole file.
            raise OSError(f"original ended at byte {offset} of {end}")
        await response.send(chunk)
        offset += len(chunk)


def last_modified(processed_at: str | None, mtime: float) -> datetime:
    """The record's processed_at, to the second (HTTP dates have no fractions).

    processed_at rather than the file's mtime: it is stamped after the file is renamed into place,
    so it is never earlier than the bytes; it is the same in every process and survives copying
    the media folder (or moving it to object storage), where mtimes are reset or absent. The
    mtime is the fallback for a row whose processed_at does not parse.
    """
    try:
        moment = datetime.fromisoformat(processed_at or "")
    except ValueError:
        moment = datetime.fromtimestamp(mtime, UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


# -- conditional requests (RFC 9110 section 13) -------------------------------------------------

# One member of an entity-tag list: optional W/, a quoted opaque tag, then a comma or the end.
# Empty members (",,") are allowed, as in every HTTP list.
_LIST_MEMBER = re.compile(
    r'[ \t]*(?:(?P<weak>W/)?(?P<tag>"[\x21\x23-\x7e\x80-\xff]*"))?[ \t]*(?:,|\Z)'
)


def header_value(request: Request, name: str) -> str | None:
    """All field lines of a list header, joined with commas (RFC 9110 section 5.3); None if none."""
    values = request.headers.getall(name, [])
    return ", ".join(values) if values else None


def parse_entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """[(weak, opaque-tag)] of an If-None-Match / If-Match / If-Range value; None when malformed."""
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        member = _LIST_MEMBER.match(value, pos)
        if member is None:
            return None
        if member["tag"] is not None:
            tags.append((member["weak"] is not None, member["tag"]))
        pos = member.end()
    return tags


def _matches(value: str, etag: str, *, strong: bool) -> bool:
    """Whether the list holds `etag` (or is `*`), by strong or weak comparison (section 8.8.3.2)."""
    if value.strip() == "*":
        return True
    our_weak, ours = etag.startswith("W/"), etag.removeprefix("W/")
    for weak, tag in parse_entity_tags(value) or []:
        if tag == ours and not (strong and (weak or our_weak)):
            return True
    return False


def none_match(value: str | None, etag: str) -> bool:
    """If-None-Match is satisfied by a match (weak comparison): the client's copy is current."""
    return value is not None and _matches(value, etag, strong=False)


def http_date(value: str | None) -> datetime | None:
    """An HTTP-date as aware UTC; None when absent or invalid (such a header is ignored)."""
    if value is None:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


def precondition_check(request: Request, etag: str, modified: datetime) -> None:
    """If-Match, else If-Unmodified-Since: 412 when the client's version is not this one."""
    if_match = header_value(request, "if-match")
    if if_match is not None:
        if not _matches(if_match, etag, strong=True):
            raise ClientError(412, "precondition failed: If-Match does not match the ETag")
        return
    since = http_date(request.headers.get("if-unmodified-since"))
    if since is not None and modified > since:
        raise ClientError(412, "precondition failed: modified after If-Unmodified-Since")


def not_modified(request: Request, etag: str, modified: datetime) -> bool:
    """304 by If-None-Match when present (If-Modified-Since is then ignored), else by the date."""
    if_none_match = header_value(request, "if-none-match")
    if if_none_match is not None:
        return none_match(if_none_match, etag)
    since = http_date(request.headers.get("if-modified-since"))
    return since is not None and modified <= since


# -- byte ranges (RFC 9110 section 14) ----------------------------------------------------------

_BYTE_RANGE = re.compile(r"(\d*)-(\d*)", re.ASCII)
# Past any file's size; longer digit strings are capped to it rather than given to int(), which
# refuses more than 4300 digits (a 500) and would spend time on a hostile header.
_FAR = 10**18


class RangeNotSatisfiable(Exception):
    """A well-formed single byte range that starts past the end, or the last zero bytes."""


def requested_range(
    request: Request, size: int, etag: str, modified: datetime
) -> tuple[int, int] | None:
    """The inclusive (first, last) byte to send, or None for the whole original.

    None, per RFC 9110, for: no Range, a unit other than bytes, a malformed range set, an If-Range
    that does not match (the client's partial copy is stale: it needs all of it), and several
    ranges (served whole rather than as multipart/byteranges).
    """
    value = request.headers.get("range")
    if value is None or size == 0:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and not _if_range_matches(if_range, etag, modified):
        return None
    unit, equals, spec = value.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    members = [member.strip() for member in spec.split(",") if member.strip()]
    if len(members) != 1:
        return None
    parts = _BYTE_RANGE.fullmatch(members[0])
    if parts is None or parts[0] == "-":
        return None
    first, last = _position(parts[1]), _position(parts[2])
    if first is None:  # bytes=-N: the last N bytes, all of them when N exceeds the size
        suffix = last or 0
        if suffix == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size - 1
    if last is not None and last < first:
        return None  # invalid, so ignored (section 14.1.1)
    if first >= size:
        raise RangeNotSatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


def _position(digits: str) -> int | None:
    """A byte position of a range-spec; None when absent."""
    if not digits:
        return None
    digits = digits.lstrip("0") or "0"
    return _FAR if len(digits) > len(str(_FAR)) else int(digits)


def _if_range_matches(value: str, etag: str, modified: datetime) -> bool:
    """If-Range holds one validator: an entity tag compared strongly, or exactly Last-Modified."""
    value = value.strip()
    if value.startswith(('"', "W/")):
        return parse_entity_tags(value) == [(False, etag)]
    return http_date(value) == modified
