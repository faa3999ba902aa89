"""/api/webhooks/deliveries: what was sent where and how it went; failed deliveries sent again.
Admin only: a delivery shows the receivers' URLs. Neither the body sent nor the secret is shown."""

from __future__ import annotations

from typing import Any

import orjson
from sanic import Blueprint, HTTPResponse, Request

from imgapi_core import records
from imgapi_core.access.scopes import ADMIN, requires
from imgapi_core.errors import ClientError
from imgapi_core.numbers import whole_number
from imgapi_core.routes import base_url, json_response
from imgapi_core.store import DELIVERY_STATES, Delivery
from imgapi_core.timestamps import iso_of

MAX_LIST_LIMIT = 1000

bp = Blueprint("webhooks")


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    d = delivery
    next_attempt_at = None
    if d.state == "pending":
        # Due "at 0" (new, or retried by hand) means due since it was last changed.
        next_attempt_at = iso_of(d.next_attempt_at) if d.next_attempt_at > 0 else d.updated_at
    return {
        "delivery_id": d.delivery_id,
        "event": orjson.loads(d.event_json),
        "url": d.url,
        "state": d.state,
        "attempts": d.attempts,
        "next_attempt_at": next_attempt_at,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": d.created_at,
        "delivered_at": d.delivered_at,
    }


@bp.get("/api/webhooks/deliveries", name="list_deliveries")
@requires(ADMIN)
async def list_deliveries(request: Request) -> HTTPResponse:
    args = request.args
    limit = whole_number(args.get("limit", "100"))
    if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ClientError(400, f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}")
    state = args.get("state")
    if state is not None and state not in DELIVERY_STATES:
        raise ClientError(400, f"state must be one of {', '.join(DELIVERY_STATES)}")
    before = None
    if "cursor" in args:
        before = records.decode_cursor(args.get("cursor", ""))
        if before is None:
            raise ClientError(400, "cursor is not valid: use the Link header of the previous page")
    rows = await request.app.ctx.store.deliveries(state=state, limit=limit + 1, before=before)
    more = len(rows) > limit
    rows = rows[:limit]
    headers = {}
    if more:
        last = rows[-1]
        query = f"limit={limit}&cursor={records.encode_cursor(last.created_at, last.delivery_id)}"
        if state:
            query += f"&state={state}"
        headers["Link"] = f'<{base_url(request)}/api/webhooks/deliveries?{query}>; rel="next"'
    return json_response([delivery_json(d) for d in rows], headers=headers)


@bp.post("/api/webhooks/deliveries/retry", name="retry_deliveries")
@requires(ADMIN)
async def retry_deliveries(request: Request) -> HTTPResponse:
    """Every failed delivery due again at once, attempts reset (e.g. once a receiver is fixed)."""
    retried = await request.app.ctx.store.requeue_deliveries("failed")
    # Only where webhooks are configured; other processes find them at their next poll.
    sender = getattr(request.app.ctx, "webhooks", None)
    if sender is not None and retried:
        sender.wake()
    return json_response({"retried": retried})
