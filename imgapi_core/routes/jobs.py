"""Jobs: run a failed or skipped job again, one image's or every one of a kind."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request

from imgapi_core.access.scopes import ADMIN, requires
from imgapi_core.errors import ClientError
from imgapi_core.routes import json_response
from imgapi_core.store import JOB_KINDS

# What a retry takes back to queued: a job that ended without its result.
RETRYABLE = ("failed", "skipped")

bp = Blueprint("jobs")


def _kind(kind: str | None) -> str:
    if kind not in JOB_KINDS:
        raise ClientError(400, f"kind must be one of {', '.join(JOB_KINDS)}")
    return kind


@bp.post("/api/images/<image_id:str>/jobs/<kind:str>/retry", name="retry_job")
@requires(ADMIN)
async def retry_job(request: Request, image_id: str, kind: str) -> HTTPResponse:
    """202: the job is queued again with its attempts reset, and runs through the normal path."""
    kind = _kind(kind)
    store = request.app.ctx.store
    record = await store.get_record(image_id)
    if record is None or record.sha256 is None:
        raise ClientError(404, f"no stored image with id {image_id!r}")
    requeued = await store.requeue_jobs(kind, RETRYABLE, record.sha256)
    if not requeued:
        current = await store.job_state(record.sha256, kind)
        state = current.state if current else "absent"
        raise ClientError(
            409, f"the {kind} job is {state}: only failed or skipped jobs are retried"
        )
    request.app.ctx.jobs.submit(record.sha256)
    job = requeued[0]
    return json_response(
        {"image_id": image_id, "kind": kind, "state": "queued", "attempts": job.attempts},
        status=202,
    )


@bp.post("/api/jobs/retry", name="retry_jobs")
@requires(ADMIN)
async def retry_jobs(request: Request) -> HTTPResponse:
    """Every failed (or skipped) job of a kind queued again, e.g. once a caption model is there."""
    kind = _kind(request.args.get("kind"))
    state = request.args.get("state", "failed")
    if state not in RETRYABLE:
        raise ClientError(400, f"state must be one of {', '.join(RETRYABLE)}")
    requeued = await request.app.ctx.store.requeue_jobs(kind, (state,))
    for sha256 in dict.fromkeys(job.sha256 for job in requeued):
        request.app.ctx.jobs.submit(sha256)
    return json_response({"kind": kind, "state": state, "retried": len(requeued)})
