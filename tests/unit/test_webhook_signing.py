"""Webhook signing and the request of one attempt, without the app: the signature against HMAC
computed independently (and a published test vector), the headers as they go out, and what each
kind of answer comes to (delivered, retried, failed), through httpx's mock transport and a store
that keeps what it is told."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from imgapi_core import settings as settings_mod
from imgapi_core import webhooks
from imgapi_core.store import Delivery, Event

SECRET = "s3cret-for-tests"
URL = "http://receiver.test/hooks"
EVENT = {
    "id": 7,
    "type": "image.ready",
    "image_id": "img1",
    "kind": None,
    "state": "ready",
    "error": None,
    "at": "2026-01-01T00:00:00.000Z",
}


def delivery(**changes: Any) -> Delivery:
    base = Delivery(
        delivery_id="d-1",
        event_id=7,
        event_type="image.ready",
        image_id="img1",
        url=URL,
        state="pending",
        attempts=0,
        next_attempt_at=0.0,
        last_status=None,
        last_error=None,
        event_json=json.dumps(EVENT),
        body=None,
        created_at="2026-01-01T00:00:00.000Z",
        updated_at="2026-01-01T00:00:00.000Z",
        delivered_at=None,
    )
    return dataclasses.replace(base, **changes)


def test_the_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"event":{"id":1},"record":null}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert webhooks.sign(SECRET, body) == f"sha256={expected}"
    # RFC 4231, test case 2: a known answer that does not come from the code under test.
    assert webhooks.sign("Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_the_signature_changes_with_any_byte_or_another_secret() -> None:
    body = b'{"a":1}'
    assert webhooks.sign(SECRET, body) != webhooks.sign(SECRET, b'{"a":2}')
    assert webhooks.sign(SECRET, body) != webhooks.sign(SECRET + "x", body)


def test_the_headers_name_the_event_and_the_delivery_and_sign_the_body() -> None:
    body = b'{"x":1}'
    headers = webhooks.headers(delivery(), body, SECRET)
    assert headers == {
        "Content-Type": "application/json",
        "User-Agent": "imgapi-webhooks",
        "X-Imgapi-Event": "image.ready",
        "X-Imgapi-Delivery": "d-1",
        "X-Imgapi-Signature": webhooks.sign(SECRET, body),
    }


def test_the_backoff_doubles_with_jitter_and_stays_under_five_minutes() -> None:
    for attempts in range(1, 8):
        delay = webhooks.backoff_s(attempts)
        assert 0.75 * 2**attempts <= delay <= 2**attempts
    assert all(webhooks.backoff_s(n) <= 300 for n in (9, 20, 10_000))


# -- one sender against a mock receiver ---------------------------------------------------------


class KeepingStore:
    """Hands out the deliveries it was given, once each, and keeps how each one finished."""

    def __init__(self, *deliveries: Delivery) -> None:
        self.due = list(deliveries)
        self.finished: dict[str, dict[str, Any]] = {}
        self.bodies: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def claim_deliveries(self, runner: str, limit: int, lease_s: float) -> list[Delivery]:
        taken, self.due = self.due[:limit], self.due[limit:]
        return [dataclasses.replace(d, state="delivering", attempts=d.attempts + 1) for d in taken]

    async def keep_delivery_body(self, delivery_id: str, runner: str, body: str) -> str:
        return self.bodies.setdefault(delivery_id, body)

    async def finish_delivery(self, delivery_id: str, runner: str, **outcome: Any) -> bool:
        self.finished[delivery_id] = outcome
        self.changed.set()
        return True

    async def record_with_jobs(self, image_id: str) -> tuple[None, dict]:
        return None, {}  # deleted meanwhile: the body's record is null


class Hub:
    def on_event(self, listener: Callable[[Event], None]) -> None:
        self.listener = listener


def make_settings(**env: str) -> settings_mod.Settings:
    values = {"WEBHOOK_URL": URL, "WEBHOOK_SECRET": SECRET, "WEBHOOK_MAX_ATTEMPTS": "3", **env}
    return settings_mod.load(env=values, dotenv=None)


async def send(
    store: KeepingStore,
    answer: Callable[[httpx.Request], Any],
    settings: settings_mod.Settings | None = None,
) -> dict[str, Any]:
    """Runs a sender until the store has heard of one finished delivery; returns its outcome."""
    sender = webhooks.WebhookSender(
        settings or make_settings(),
        store,  # type: ignore[arg-type]
        Hub(),  # type: ignore[arg-type]
        lambda path: "http://imgapi.test" + path,
        "runner-1",
        backoff=lambda attempts: 30.0,
        transport=httpx.MockTransport(answer),
    )
    await sender.start()
    try:
        await asyncio.wait_for(store.changed.wait(), 10)
    finally:
        await sender.close()
    (outcome,) = store.finished.values()
    return outcome


async def test_a_delivery_is_posted_signed_with_its_headers_and_body() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    outcome = await send(KeepingStore(delivery()), answer)
    (request,) = seen
    body = request.content
    assert request.method == "POST" and str(request.url) == URL
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "imgapi-webhooks"
    assert request.headers["x-imgapi-event"] == "image.ready"
    assert request.headers["x-imgapi-delivery"] == "d-1"
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert request.headers["x-imgapi-signature"] == f"sha256={expected}"
    assert json.loads(body) == {"event": EVENT, "record": None}
    assert outcome["state"] == "delivered" and outcome["status"] == 204
    # The body sent is handed to the store, which keeps it for any later retry.
    assert outcome["body"].encode() == body


async def test_a_retry_sends_the_body_the_store_kept() -> None:
    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200)

    kept = '{"event":{"id":7},"record":{"as":"first sent"}}'
    await send(KeepingStore(delivery(body=kept, attempts=1)), answer)
    assert seen == [kept.encode()]


async def test_a_redirect_is_a_failed_attempt_and_is_not_followed() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://elsewhere.test/"})

    outcome = await send(KeepingStore(delivery()), answer)
    assert seen == [URL]
    assert outcome["state"] == "pending" and outcome["status"] == 302
    assert "redirect" in outcome["error"]
    assert outcome["retry_at"] > 0


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (lambda r: httpx.Response(500), 500, "HTTP 500"),
        (lambda r: httpx.Response(404), 404, "HTTP 404"),
        (lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused")), None, "ConnectError"),
    ],
)
async def test_the_last_failed_attempt_fails_the_delivery_with_its_reason(
    answer: Callable[[httpx.Request], httpx.Response], status: int | None, error: str
) -> None:
    # Claimed for the third time, of WEBHOOK_MAX_ATTEMPTS=3.
    outcome = await send(KeepingStore(delivery(attempts=2)), answer)
    assert outcome["state"] == "failed"
    assert outcome["status"] == status and error in outcome["error"]


async def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200)

    outcome = await send(KeepingStore(delivery()), answer, make_settings(WEBHOOK_TIMEOUT="0.1"))
    assert outcome["state"] == "pending" and outcome["status"] is None
    assert "WEBHOOK_TIMEOUT" in outcome["error"]


async def test_a_url_no_longer_configured_fails_without_a_request() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    gone = delivery(url="http://old-receiver.test/hooks")
    outcome = await send(KeepingStore(gone), answer)
    assert seen == []
    assert outcome["state"] == "failed" and outcome["error"] == "URL no longer configured"


async def test_a_shutdown_mid_send_hands_the_delivery_back_to_pending() -> None:
    started = asyncio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(60)
        return httpx.Response(200)

    store = KeepingStore(delivery())
    sender = webhooks.WebhookSender(
        make_settings(WEBHOOK_TIMEOUT="120"),
        store,  # type: ignore[arg-type]
        Hub(),  # type: ignore[arg-type]
        lambda path: path,
        "runner-1",
        transport=httpx.MockTransport(answer),
    )
    await sender.start()
    await asyncio.wait_for(started.wait(), 10)
    await sender.close()
    outcome = store.finished["d-1"]
    assert outcome["state"] == "pending" and outcome["retry_at"] == 0.0
    assert "shutdown" in outcome["error"]
