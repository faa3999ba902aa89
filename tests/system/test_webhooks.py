"""Webhooks against a real HTTP receiver on a loopback port: every image.ready arrives signed with
its record; a receiver that was down gets what it missed, each once; a 500 is retried with the same
delivery id and body; a redirect is not followed, and after WEBHOOK_MAX_ATTEMPTS the delivery is
failed, listed for an admin and sent again on request. The app runs in-process (jobs too) with its
own WebhookSender; one test runs the API as a real `python imgapi.py` process across a restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import procs
import pytest
from conftest import multipart, running_app, seeded_jpeg, wait_for
from procs import free_port
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core.access import scopes, tokens
from imgapi_core.settings import Settings
from imgapi_core.store import ApiKey, Delivery
from imgapi_core.timestamps import now_iso

# The in-process tests run on both engine pairs (PostgreSQL's deliveries claim with SKIP LOCKED).
pytestmark = [pytest.mark.both_engines]

SECRET = "webhook-test-secret"
ITEM_KEYS = {
    "delivery_id",
    "event",
    "url",
    "state",
    "attempts",
    "next_attempt_at",
    "last_status",
    "last_error",
    "created_at",
    "delivered_at",
}


def quick_backoff(attempts: int) -> float:
    return 0.05


# -- a receiver ---------------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def delivery_id(self) -> str:
        return self.headers["x-imgapi-delivery"]


Answer = Callable[[Received], tuple[int, dict[str, str]]]


def ok(_: Received) -> tuple[int, dict[str, str]]:
    return 200, {}


@dataclass
class Receiver:
    """A webhook receiver on a loopback port: keeps each request, answers what `answer` says, and
    closes the connection after each answer. Its port is chosen before it starts, so that a URL
    can name a receiver that is not listening yet."""

    answer: Answer = ok
    port: int = field(default_factory=free_port)
    received: list[Received] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _version = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            got = Received(method, path, headers, body)
            self.received.append(got)
            status, extra = self.answer(got)
            lines = [f"HTTP/1.1 {status} Answer", "Content-Length: 0", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in extra.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def listening(*receivers: Receiver) -> AsyncIterator[None]:
    for receiver in receivers:
        await receiver.start()
    try:
        yield
    finally:
        for receiver in receivers:
            await receiver.stop()


def assert_signed(got: Received) -> None:
    expected = hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-imgapi-signature"] == f"sha256={expected}"


# -- the app ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def hooked_app(
    make_settings: Callable[..., Settings], *urls: str, **env: str
) -> AsyncIterator[Sanic]:
    """The app with WEBHOOK_URL set, its WebhookSender retrying after 50 ms instead of seconds."""
    cfg = make_settings(WEBHOOK_URL=",".join(urls), WEBHOOK_SECRET=SECRET, **env)
    async with running_app(cfg) as application:
        application.ctx.webhooks.backoff = quick_backoff
        yield application


async def upload(
    client: SanicASGITestClient, seed: int, headers: dict[str, str] | None = None
) -> str:
    _, res = await client.post(
        "/api/images", files=multipart(seeded_jpeg(seed)), headers=headers or {}
    )
    assert res.status == 201, res.text
    return res.json["data"]["image_id"]


async def deliveries(app: Sanic, state: str | None = None) -> list[Delivery]:
    return await app.ctx.store.deliveries(state=state, limit=1000)


async def all_in(app: Sanic, state: str, count: int) -> bool:
    found = await deliveries(app)
    return len(found) == count and all(d.state == state for d in found)


def path_of(link: str) -> str:
    """The path and query of a Link header's URL."""
    url = urlsplit(link.split(";")[0].strip("<> "))
    return f"{url.path}?{url.query}"


# -- the tests ----------------------------------------------------------------------------------


async def test_every_image_ready_arrives_signed_with_its_record(make_settings):
    receiver = Receiver()
    async with listening(receiver), hooked_app(make_settings, receiver.url) as app:
        client = SanicASGITestClient(app)
        ids = {await upload(client, seed) for seed in range(3)}
        await wait_for(lambda: all_in(app, "delivered", 3))

        assert len(receiver.received) == 3
        for got in receiver.received:
            assert got.method == "POST" and got.path == "/hook"
            assert got.headers["content-type"] == "application/json"
            assert got.headers["user-agent"] == "imgapi-webhooks"
            assert got.headers["x-imgapi-event"] == "image.ready"
            assert_signed(got)
            event, record = got.json["event"], got.json["record"]
            assert set(got.json) == {"event", "record"}
            assert event["type"] == "image.ready" and event["image_id"] in ids
            # The record as it was once every job had finished.
            assert record["data"]["image_id"] == event["image_id"]
            jobs = record["data"]["jobs"]
            assert jobs["thumbnail"]["state"] == jobs["exif"]["state"] == "done"
            assert jobs["caption"]["state"] == "skipped"
            _, res = await client.get(f"/api/images/{event['image_id']}")
            assert record["data"]["metadata"] == res.json["data"]["metadata"]
        assert {got.json["event"]["image_id"] for got in receiver.received} == ids
        assert len({got.delivery_id for got in receiver.received}) == 3

        # The listing, a page at a time.
        _, first = await client.get("/api/webhooks/deliveries?limit=2")
        assert first.status == 200, first.text
        assert len(first.json) == 2 and 'rel="next"' in first.headers["link"]
        _, rest = await client.get(path_of(first.headers["link"]))
        assert len(rest.json) == 1 and "link" not in rest.headers
        items = first.json + rest.json
        assert {i["delivery_id"] for i in items} == {g.delivery_id for g in receiver.received}
        for item in items:
            assert set(item) == ITEM_KEYS  # never the body sent, never the secret
            assert (item["state"], item["attempts"], item["last_status"]) == ("delivered", 1, 200)
            assert item["url"] == receiver.url and item["event"]["type"] == "image.ready"
            assert item["next_attempt_at"] is None and item["delivered_at"]
        assert SECRET not in first.text + rest.text


async def test_bad_listing_parameters_are_400_naming_the_parameter(make_settings):
    async with hooked_app(make_settings, "http://127.0.0.1:9/hook") as app:
        client = SanicASGITestClient(app)
        for query, name in (
            ("state=sent", "state"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("cursor=!!!", "cursor"),
        ):
            _, res = await client.get(f"/api/webhooks/deliveries?{query}")
            assert res.status == 400, query
            assert res.json["status"] == "failed" and res.json["data"] is None
            assert res.json["error"].startswith(name), res.json


async def test_a_receiver_that_was_down_gets_every_missed_delivery_once(make_settings):
    receiver = Receiver()  # its port chosen, nothing listening yet
    async with hooked_app(make_settings, receiver.url, WEBHOOK_MAX_ATTEMPTS="1000") as app:
        app.ctx.webhooks.backoff = lambda attempts: 0.1
        client = SanicASGITestClient(app)
        for seed in range(3):
            await upload(client, seed)

        async def all_tried_twice() -> bool:
            found = await deliveries(app)
            return len(found) == 3 and all(d.attempts >= 2 and d.last_error for d in found)

        await wait_for(all_tried_twice)
        assert all(d.state in ("pending", "delivering") for d in await deliveries(app))
        async with listening(receiver):
            await wait_for(lambda: all_in(app, "delivered", 3))
        ids = sorted(d.delivery_id for d in await deliveries(app))
        assert sorted(got.delivery_id for got in receiver.received) == ids
        for got in receiver.received:
            assert_signed(got)


async def test_a_500_is_retried_with_the_same_delivery_id_and_body(make_settings):
    def fail_first(got: Received) -> tuple[int, dict[str, str]]:
        seen = [g for g in receiver.received if g.delivery_id == got.delivery_id]
        return (500, {}) if len(seen) == 1 else (200, {})

    receiver = Receiver(fail_first)
    async with listening(receiver), hooked_app(make_settings, receiver.url) as app:
        client = SanicASGITestClient(app)
        await upload(client, 1)
        await wait_for(lambda: all_in(app, "delivered", 1))
        first, second = receiver.received
        assert first.delivery_id == second.delivery_id
        assert first.body == second.body  # the same bytes, the same signature
        assert_signed(first)
        assert_signed(second)
        _, res = await client.get("/api/webhooks/deliveries")
        (item,) = res.json
        assert (item["attempts"], item["last_status"], item["last_error"]) == (2, 200, None)


async def test_a_redirect_is_not_followed_and_gives_up_then_an_admin_retry_sends_it(
    make_settings,
):
    target = Receiver()
    redirecting = {"on": True}

    def redirect(got: Received) -> tuple[int, dict[str, str]]:
        return (302, {"Location": target.url}) if redirecting["on"] else (200, {})

    receiver = Receiver(redirect)
    async with (
        listening(receiver, target),
        hooked_app(make_settings, receiver.url, WEBHOOK_MAX_ATTEMPTS="2") as app,
    ):
        client = SanicASGITestClient(app)
        await upload(client, 1)
        await wait_for(lambda: all_in(app, "failed", 1))
        assert len(receiver.received) == 2 and target.received == []

        _, res = await client.get("/api/webhooks/deliveries?state=failed")
        assert res.status == 200, res.text
        (item,) = res.json
        assert (item["attempts"], item["last_status"]) == (2, 302)
        assert "redirect" in item["last_error"]
        assert item["next_attempt_at"] is None and item["delivered_at"] is None
        _, res = await client.get("/api/webhooks/deliveries?state=pending")
        assert res.json == []

        redirecting["on"] = False  # the receiver is fixed
        _, res = await client.post("/api/webhooks/deliveries/retry")
        assert res.status == 200 and res.json == {"retried": 1}
        await wait_for(lambda: all_in(app, "delivered", 1))
        assert len(receiver.received) == 3 and target.received == []
        assert len({got.delivery_id for got in receiver.received}) == 1
        assert len({got.body for got in receiver.received}) == 1
        _, res = await client.get("/api/webhooks/deliveries")
        (item,) = res.json
        assert (item["state"], item["attempts"], item["last_status"]) == ("delivered", 1, 200)
        _, res = await client.post("/api/webhooks/deliveries/retry")
        assert res.json == {"retried": 0}


async def test_deliveries_are_for_admins_only_in_keys_mode(make_settings):
    receiver = Receiver()
    async with (
        listening(receiver),
        hooked_app(make_settings, receiver.url, AUTH="keys") as app,
    ):
        client = SanicASGITestClient(app)
        made = {}
        for scope in (scopes.READ, scopes.UPLOAD, scopes.ADMIN):
            key_id, token = tokens.new_key_token()
            key = ApiKey(scope, key_id, tokens.hash_token(token), (scope,), now_iso())
            await app.ctx.store.create_key(key)
            made[scope] = {"Authorization": f"Bearer {token}"}
        await app.ctx.guard.keys.reload()
        await upload(client, 1, made[scopes.UPLOAD])
        await wait_for(lambda: all_in(app, "delivered", 1))
        # The record in the body has signed URLs, as in the API: a receiver may fetch them.
        (got,) = receiver.received
        assert "sig=" in got.json["record"]["data"]["thumbnails"]["small"]

        for method, path in (
            ("GET", "/api/webhooks/deliveries?state=failed"),
            ("POST", "/api/webhooks/deliveries/retry"),
        ):
            for headers, status in (
                ({}, 401),
                (made[scopes.READ], 403),
                (made[scopes.UPLOAD], 403),
                (made[scopes.ADMIN], 200),
            ):
                _, res = await client.request(method, path, headers=headers)
                assert res.status == status, (method, path, headers, res.text)


# -- real processes -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_deliveries_missed_before_a_restart_go_out_after_it(tmp_path: Path):
    receiver = Receiver()  # down while the first API process runs
    env = procs.settings_for(tmp_path, WEBHOOK_URL=receiver.url, WEBHOOK_SECRET=SECRET)
    db = env["DB_PATH"]

    def tried() -> bool:
        rows = procs.db_rows(db, "SELECT attempts, last_error FROM webhook_deliveries")
        return len(rows) == 2 and all(r["attempts"] >= 1 and r["last_error"] for r in rows)

    api = await asyncio.to_thread(procs.start_api, env, tmp_path / "api1.log")
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=15) as http:
            for seed in range(2):
                res = await http.post("/api/images", files=multipart(seeded_jpeg(seed)))
                assert res.status_code == 201, res.text
            await wait_for(tried, within=30)
    finally:
        assert await asyncio.to_thread(api.stop) == 0, api.output()[-3000:]

    async with listening(receiver):
        api = await asyncio.to_thread(procs.start_api, env, tmp_path / "api2.log")
        try:
            await wait_for(lambda: len(receiver.received) == 2, within=30)
            async with httpx.AsyncClient(base_url=api.url, timeout=15) as http:

                async def delivered() -> bool:
                    res = await http.get("/api/webhooks/deliveries?state=delivered")
                    return len(res.json()) == 2

                await wait_for(delivered)
        finally:
            await asyncio.to_thread(api.stop)
    assert len({got.delivery_id for got in receiver.received}) == 2  # each once
    for got in receiver.received:
        assert_signed(got)
        # Built from the address the API listens on (no PUBLIC_URL): one the receiver can reach.
        original = got.json["record"]["data"]["original"]
        assert original.startswith("http://127.0.0.1:"), original
