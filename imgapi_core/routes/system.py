"""Service-wide answers: upload statistics and health."""

from __future__ import annotations

import asyncio

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


@bp.get("/healthz", name="healthz")
@public
async def healthz(request: Request) -> HTTPResponse:
    checks: dict[str, str] = {}
    healthy = True
    try:
        async with asyncio.timeout(2):
            await request.app.ctx.store.ping()
            # Readable is not enough: a read-only file or mount answers reads and fails every
            # upload.
            await request.app.ctx.store.check_writable()
        checks["database"] = "ok"
    except TimeoutError:
        healthy = False
        checks["database"] = "error: no answer within 2 s (locked by a long write?)"
    except Exception as exc:
        healthy = False
        checks["database"] = f"error: {exc}"
    if request.app.ctx.settings.storage_url:
        # A local folder fails with the database's own disk; an object store on its own.
        try:
            async with asyncio.timeout(2):
                await request.app.ctx.media.ping()
            checks["media"] = "ok"
        except TimeoutError:
            healthy = False
            checks["media"] = "error: no answer within 2 s"
        except Exception as exc:
            healthy = False
            checks["media"] = f"error: {exc}"
    redis_state = await request.app.ctx.jobs.ping()
    if redis_state is not None:
        checks["redis"] = redis_state
        healthy = healthy and redis_state == "ok"
    checks["status"] = "ok" if healthy else "unavailable"
    return json_response(checks, status=200 if healthy else 503)
