"""The HTTP routes, one blueprint per resource, and the small helpers they share."""

from __future__ import annotations

from typing import Any

from sanic import HTTPResponse, Request
from sanic.response import raw

from imgapi_core import records


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
