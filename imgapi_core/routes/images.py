"""/api/images: upload, list, read one, delete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlencode

from sanic import Blueprint, HTTPResponse, Request

from imgapi_core import records
from imgapi_core.access import tokens
from imgapi_core.access.scopes import DELETE, READ, UPLOAD, requires
from imgapi_core.errors import ClientError
from imgapi_core.events.wait import until_ready, wait_seconds
from imgapi_core.numbers import whole_number
from imgapi_core.routes import base_url, json_response, listing, url_maker
from imgapi_core.settings import Settings
from imgapi_core.thumbnails import thumbnail_keys

MAX_LIST_LIMIT = 1000

bp = Blueprint("images")


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The upload body as it arrives. Sanic's REQUEST_TIMEOUT stops applying once a streaming
    handler runs, so silence (REQUEST_TIMEOUT) and the whole body (UPLOAD_TIMEOUT) are timed here:
    a stalled or trickling client gets a 408 instead of holding the connection."""
    cfg: Settings = request.app.ctx.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.upload_timeout
    while True:
        wait = min(cfg.request_timeout, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0)):
                chunk = await request.stream.read()
        except TimeoutError:
            if loop.time() >= deadline:
                message = f"upload not received within UPLOAD_TIMEOUT ({cfg.upload_timeout:g} s)"
            else:
                message = f"no data from the client for {cfg.request_timeout:g} s"
            raise ClientError(408, message) from None
        if chunk is None:
            return
        yield chunk


@bp.post("/api/images", stream=True, name="upload")
@requires(UPLOAD)
async def upload(request: Request) -> HTTPResponse:
    # Checked before the body is read: a bad parameter costs the client no upload.
    wait = wait_seconds(request.args.get("wait"))
    outcome = await request.app.ctx.pipeline.ingest(
        body_chunks(request),
        request.headers.get("content-type"),
        request.headers.get("content-length"),
    )
    if outcome.error is not None:
        if outcome.error.status == 408:
            # Do not wait for the rest of a body that is not coming: close after the answer.
            request.stream.request_max_size = 0
            request.stream.keep_alive = False
        elif getattr(request.stream, "expecting_continue", False):
            refuse_unread_body(request)
        body = records.failure(
            outcome.error.message,
            image_id=outcome.image_id,
            original_name=outcome.original_name,
            processed_at=outcome.processed_at,
        )
        retry_after = getattr(outcome.error, "retry_after_s", None)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return json_response(body, status=outcome.error.status, headers=headers)
    record, jobs = await until_ready(
        request.app.ctx.store, request.app.ctx.events, outcome.image_id, wait
    )
    if record is None:  # deleted by another request before this answer was written
        raise ClientError(404, f"image {outcome.image_id!r} was deleted right after its upload")
    body = records.record(record, jobs, url_maker(request))
    # Shown once: only its hash is kept. With it the uploader may delete this upload without a
    # delete-scoped key.
    body["delete_token"] = outcome.delete_token
    return json_response(body, status=201, headers={"Location": f"/api/images/{outcome.image_id}"})


def refuse_unread_body(request: Request) -> None:
    """The client sent `Expect: 100-continue` and its body has not been read (a declared length
    over the cap, a body that is not multipart): it waits for our go-ahead. Sanic's HTTP/1 sends
    `100 Continue` on the first read of the body, or else in front of the final answer (unless
    that is a 417); neither must happen here. So the go-ahead is withdrawn, and as the client may
    send its body anyway (RFC 9110, 10.1.1), the connection closes after the answer instead of
    reading that body as the next request."""
    stream = request.stream
    stream.expecting_continue = False
    stream.keep_alive = False
    stream.request_body = None  # nothing to drain: the client was never told to send it


@bp.get("/api/images", name="list_images")
@requires(READ)
async def list_images(request: Request) -> HTTPResponse:
    store = request.app.ctx.store
    args = request.args
    limit = whole_number(args.get("limit", "100"))
    if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ClientError(400, f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    query = listing.image_query(request)
    after = None
    if "cursor" in args:
        after = listing.decode_cursor(args.get("cursor", ""), query)
    rows, jobs, keys = await store.search_with_jobs(query, limit=limit + 1, after=after)
    more = len(rows) > limit
    rows = rows[:limit]
    url = url_maker(request)
    body = [records.record(r, jobs.get(r.sha256 or "", {}), url) for r in rows]
    headers = {}
    if more:
        # The same query, from where this page ends.
        kept = [(name, value) for name, value in request.query_args if name in listing.FILTERS]
        kept += [("limit", str(limit)), ("cursor", listing.encode_cursor(query, keys[limit - 1]))]
        headers["Link"] = f'<{base_url(request)}/api/images?{urlencode(kept)}>; rel="next"'
    return json_response(body, headers=headers)


@bp.get("/api/images/<image_id:str>", name="get_image")
@requires(READ)
async def get_image(request: Request, image_id: str) -> HTTPResponse:
    wait = wait_seconds(request.args.get("wait"))
    record, jobs = await until_ready(request.app.ctx.store, request.app.ctx.events, image_id, wait)
    if record is None:
        raise ClientError(404, f"no image with id {image_id!r}")
    return json_response(records.record(record, jobs, url_maker(request)))


@bp.delete("/api/images/<image_id:str>", name="delete_image")
@requires(DELETE)
async def delete_image(request: Request, image_id: str) -> HTTPResponse:
    store = request.app.ctx.store
    if not request.app.ctx.guard.may_delete(request):
        # The guard let it through for its X-Delete-Token: the upload's own token, or nothing.
        token = request.headers.get("x-delete-token", "")
        stored = await store.delete_token_hash(image_id)
        # The same answer for an unknown id: a caller without a key learns nothing of which
        # ids exist.
        if stored is None or not tokens.matches(token, stored):
            raise ClientError(403, "the delete token does not match this image")
    deleted = await store.delete_image(image_id)
    if deleted is None:
        raise ClientError(404, f"no image with id {image_id!r}")
    # After the commit: a crash between the two leaves files without a record, which the start-up
    # sweep removes, never a record without its file.
    keys = [deleted.original_key] if deleted.original_key else []
    if deleted.last_reference and deleted.sha256:
        keys += thumbnail_keys(deleted.sha256)
    await request.app.ctx.media.delete(keys)
    return HTTPResponse(status=204)
