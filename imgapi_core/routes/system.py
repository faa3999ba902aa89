"""Service-wide answers: upload statistics and health."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sanic import Blueprint, HTTPResponse, Request

from imgapi_core.access.scopes import READ, public, requires
from imgapi_core.routes import json_response
from imgapi_core.store import JOB_STATES

bp = Blueprint("system")


@bp.get("/api/stats", name="stats")
@requires(READ)
async def stats(request: Request) -> HTTPResponse:
    counts = await request.app.ctx.store.stats()
    total, failed = counts.total, counts.failed
    rate = (total - failed) / total * 100 if total else 0.0
    average = counts.average_processing_time_seconds
    jobs = counts.jobs
    return json_response(
        {
            "total": total,
            "failed": failed,
            "success_rate": f"{rate:.2f}%",
            "average_processing_time_seconds": round(average, 3) if average is not None else 0,
            "processing": counts.processing,
            "queued_jobs": jobs.get("queued", 0) + jobs.get("running", 0),
            "failed_jobs": jobs.get("failed", 0),
            "jobs": {state: jobs.get(state, 0) for state in JOB_STATES},
        }
    )


async def _probe(check: Callable[[], Awaitable[None]], slow_hint: str) -> str:
    """ "ok", or "error: ..." for a dependency that fails or takes over 2 s to answer."""
    try:
        async with asyncio.timeout(2):
            await check()
    except TimeoutError:
        return f"error: no answer within 2 s ({slow_hint})"
    except Exception as exc:
        return f"error: {exc}"
    return "ok"


@bp.get("/healthz", name="healthz")
@public
async def healthz(request: Request) -> HTTPResponse:
    store, media = request.app.ctx.store, request.app.ctx.media

    async def database() -> None:
        await store.ping()
        # Readable is not enough: a read-only file or mount answers reads and fails every upload.
        await store.check_writable()

    checks = {"database": await _probe(database, "locked by a long write?")}
    if request.app.ctx.settings.storage_url:
        # A local folder fails with the database's own disk; an object store on its own.
        checks["media"] = await _probe(media.ping, "the object store is slow or unreachable")
    healthy = all(state == "ok" for state in checks.values())
    redis_state = await request.app.ctx.jobs.ping()
    if redis_state is not None:
        checks["redis"] = redis_state
        healthy = healthy and redis_state == "ok"
    checks["status"] = "ok" if healthy else "unavailable"
    return json_response(checks, status=200 if healthy else 503)
