"""The HTTP routes, one blueprint per resource, and the small helpers they share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sanic import HTTPResponse, Request
from sanic.response import raw

from imgapi_core import records

if TYPE_CHECKING:
    from imgapi_core.access.guard import Guard


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> HTTPResponse:
    return raw(records.dumps(body), status=status, headers=headers, content_type="application/json")


def base_url(request: Request) -> str:
    """The base of the absolute URLs in answers: PUBLIC_URL, else the request's own."""
    configured: str = request.app.ctx.settings.public_url
    if configured:
        return configured
    return f"{request.scheme}://{request.host}"


def url_maker(request: Request) -> Callable[[str], str]:
    """Absolute URLs of this service's paths for answers; in keys mode (unless reads are public)
    image URLs are signed, so that they work in an <img> tag, which cannot send a key."""
    return urls_on(base_url(request), request.app.ctx.guard)


def urls_on(base: str, guard: Guard) -> Callable[[str], str]:
    if not guard.signs_urls:
        return lambda path: base + path
    return lambda path: f"{base}{path}?{guard.signer.query(path)}"
