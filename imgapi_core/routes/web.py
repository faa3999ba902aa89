"""The gallery: its page at / and its static files at /web/..., read from the web/ folder beside
the package (no build step: plain HTML, CSS and JavaScript modules).

These are not API operations: they are left out of the OpenAPI document, and they are public (the
page holds no data; every call it makes to /api needs a key in keys mode).

Caching: the files keep their names from one release to the next (no build step, so no hashed
names), so every answer says `Cache-Control: no-cache` with a strong ETag. A browser revalidates
each file on each load and gets a body-less 304 while it is unchanged: a new release is picked up
at once, and no one runs a stale page against a newer API.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import raw
from sanic_ext import openapi

from imgapi_core.access.scopes import public
from imgapi_core.errors import ClientError
from imgapi_core.routes.conditional import header_value, none_match

bp = Blueprint("web")

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
INDEX = "index.html"

# Only these kinds of file are served: a stray editor backup or a README dropped into web/ is a
# 404 rather than something a browser might guess a type for.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

# The page's policy: nothing but this origin, no inline script or style (the page has none), no
# framing (clickjacking of the delete button). base-uri and form-action are not covered by
# default-src, so they are pinned too.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    # The page's URL says which image is open: other sites need not learn it from a link.
    "Referrer-Policy": "same-origin",
}
REVALIDATE = "no-cache"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    etag: str
    content_type: str
    stamp: tuple[int, int]  # (mtime_ns, size) of the file it was read from


# Read once per change of the file (checked by its stat on each request); bounded by web/ itself.
_cache: dict[Path, StaticFile] = {}


def locate(relative: str) -> Path | None:
    """The file under WEB_DIR that `relative` names, or None: no dotfile or dot-folder (".."
    included), nothing outside WEB_DIR once symlinks are resolved, only regular files of a type
    in CONTENT_TYPES."""
    parts = PurePosixPath(relative).parts
    if not parts or any(p.startswith((".", "/")) or "\\" in p or "\x00" in p for p in parts):
        return None
    root = WEB_DIR.resolve()
    try:
        path = root.joinpath(*parts).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
    except (OSError, ValueError):  # a name the filesystem refuses (too long, bad bytes)
        return None
    if path.suffix.lower() not in CONTENT_TYPES:
        return None
    return path


def load(relative: str) -> StaticFile | None:
    """The file's bytes and validators, or None where locate() refuses it (or it went away)."""
    path = locate(relative)
    if path is None:
        return None
    try:
        return _read(path)
    except OSError:  # removed or made unreadable between locate() and the read
        return None


def _read(path: Path) -> StaticFile:
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(path)
    if cached is not None and cached.stamp == stamp:
        return cached
    body = path.read_bytes()
    # Strong: the tag is the bytes' own hash, the same in every process and after a restart.
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    loaded = StaticFile(body, etag, CONTENT_TYPES[path.suffix.lower()], stamp)
    _cache[path] = loaded
    return loaded


async def serve(request: Request, relative: str) -> HTTPResponse:
    # In a thread: resolving symlinks, stat and a cold read are file system calls, which must
    # not hold up other requests on a slow disk.
    item = await asyncio.to_thread(load, relative)
    if item is None:
        # The same answer as an unknown route: the one JSON error shape, nothing about why.
        raise ClientError(404, f"no route for {request.method} {request.path}")
    headers = {"ETag": item.etag, "Cache-Control": REVALIDATE}
    if item.content_type.startswith("text/html"):
        # Any page, also when opened as /web/index.html, runs under the page's policy.
        headers.update(PAGE_HEADERS)
    if none_match(header_value(request, "if-none-match"), item.etag):
        return HTTPResponse(status=304, headers=headers)
    body = b"" if request.method == "HEAD" else item.body
    response = raw(body, headers=headers, content_type=item.content_type)
    if request.method == "HEAD":
        response.headers["Content-Length"] = str(len(item.body))
    return response


@bp.route("/", methods=["GET", "HEAD"], name="gallery")
@openapi.exclude()
@public
async def gallery(request: Request) -> HTTPResponse:
    return await serve(request, INDEX)


@bp.route("/web/<relative:path>", methods=["GET", "HEAD"], name="web_file")
@openapi.exclude()
@public
async def web_file(request: Request, relative: str) -> HTTPResponse:
    return await serve(request, relative)
