"""Jobs: run a failed, skipped or unavailable job again, one image's or every one of a kind."""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request

from imgapi_core.access.scopes import ADMIN, requires
from imgapi_core.errors import ClientError
from imgapi_core.routes import json_response
from imgapi_core.store import JOB_KINDS

# What a retry takes back to queued: a job that ended without its result.
RETRYABLE = ("failed", "skipped", "unavailable")
# The bulk retry's default: jobs that something kept from their result. Skipped ones were
# skipped on purpose (CAPTION_MODEL=none) and are retried only when asked for by name.
DEFAULT_RETRY_STATES = ("failed", "unavailable")

bp = Blueprint("jobs")


def _kind(kind: str | None) -> str:
    if kind not in JOB_KINDS:
        raise ClientError(400, f"kind must be one of {', '.join(JOB_KINDS)}")
    return kind


def _states(request: Request) -> tuple[str, ...]:
    """`state`: one of RETRYABLE or a comma-separated list of them (repeating the parameter
    adds to the list), in the order given without repeats; DEFAULT_RETRY_STATES when absent."""
    # Blank values kept: `?state=` is a mistake to answer, not a request for the default.
    given = request.get_args(keep_blank_values=True).getlist("state")
    if not given:
        return DEFAULT_RETRY_STATES
    states = [part.strip() for value in given for part in value.split(",")]
    if any(state not in RETRYABLE for state in states):
        raise ClientError(
            400, f"state must be one of {', '.join(RETRYABLE)}, or several of them comma-separated"
        )
    return tuple(dict.fromkeys(states))


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
            409, f"the {kind} job is {state}: only failed, skipped or unavailable jobs are retried"
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
    """Every job of a kind in the given states queued again, e.g. once a caption model is there:
    by default the failed and unavailable ones."""
    kind = _kind(request.args.get("kind"))
    states = _states(request)
    requeued = await request.app.ctx.store.requeue_jobs(kind, states)
    for sha256 in dict.fromkeys(job.sha256 for job in requeued):
        request.app.ctx.jobs.submit(sha256)
    return json_response({"kind": kind, "state": ",".join(states), "retried": len(requeued)})
