"""GET /metrics: the Prometheus exposition of every server process and of the jobs table."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import raw

from imgapi_core import metrics
from imgapi_core.access.scopes import ADMIN, public_when, requires

bp = Blueprint("metrics")


@bp.get("/metrics", name="metrics")
@requires(ADMIN)
@public_when("metrics_public")
async def scrape(request: Request) -> HTTPResponse:
    body = await metrics.exposition(request.app.ctx.store)
    # A scrape is a reading of now: no cache may answer the next one.
    return raw(body, content_type=metrics.CONTENT_TYPE, headers={"Cache-Control": "no-store"})
