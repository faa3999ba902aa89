"""/api/events: the event log as a Server-Sent Events stream."""

from __future__ import annotations

import asyncio

from sanic import Blueprint, HTTPResponse, Request

from imgapi_core.access.scopes import READ, requires
from imgapi_core.errors import ClientError
from imgapi_core.events import sse
from imgapi_core.events.hub import READ_BATCH
from imgapi_core.numbers import whole_number

bp = Blueprint("events")

RECONNECT_MS = 2000


def resume_point(request: Request) -> int | None:
    """The id of the last event the client has (Last-Event-ID, as a browser's EventSource sends
    it on a reconnect, or ?after=); None: only events from now on."""
    raw = request.headers.get("last-event-id")
    name = "Last-Event-ID"
    if raw is None:
        raw, name = request.args.get("after"), "after"
    if raw is None or raw == "":
        return None
    after = whole_number(raw)
    if after is None:
        raise ClientError(400, f"{name} must be the id of an event (a whole number)")
    return after


@bp.get("/api/events", name="events")
@requires(READ)
async def events(request: Request) -> HTTPResponse | None:
    after = resume_point(request)
    hub = request.app.ctx.events
    store = request.app.ctx.store
    heartbeat = request.app.ctx.settings.events_heartbeat_seconds
    # Subscribed before anything is read: no event falls between the backlog and the live part.
    with hub.subscribe() as live:
        last = hub.last_id if after is None else after
        response = await request.respond(
            content_type="text/event-stream; charset=utf-8",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        await response.send(sse.retry(RECONNECT_MS))
        while after is not None:
            backlog = await store.events_after(last, READ_BATCH)
            for event in backlog:
                await response.send(sse.frame(event))
                last = event.id
            if len(backlog) < READ_BATCH:
                break
        while True:
            try:
                # Not wait_for: on Python 3.11 it makes a task per call, per stream, per event.
                async with asyncio.timeout(heartbeat):
                    event = await live.get()
            except TimeoutError:
                await response.send(sse.comment("keep-alive"))
                continue
            if event is None:
                # Too far behind (the client resumes from its last id) or a shutdown: the
                # connection closes with the stream rather than idle on, holding a shutdown.
                request.stream.keep_alive = False
                break
            if event.id > last:
                await response.send(sse.frame(event))
                last = event.id
        await response.eof()
    return None
