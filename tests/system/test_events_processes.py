"""Events and wait across real processes: two `python imgapi.py` API processes and a separate
`arq jobs.WorkerSettings` worker on one database and a private Redis. What the worker and the other
API process commit reaches a stream and a waiter (through the Redis channel on SQLite, through
LISTEN/NOTIFY on PostgreSQL: each test runs on both engine pairs); a client that reconnects with
Last-Event-ID gets what it missed; an idle stream gets heartbeats."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import seeded_jpeg
from procs import (
    REPO,
    Proc,
    RedisServer,
    run_command,
    settings_for,
    start_api,
)
from procs import start_worker as start_arq_worker

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.both_engines]

# Liveness bounds for a stream or a waiter: far above the milliseconds they take.
WITHIN_S = 30


@dataclass
class Stack:
    a: Proc  # the API the stream and the waiters talk to
    b: Proc  # another API process: uploads sent here are seen through Redis
    worker: Proc


@pytest.fixture
def stack(tmp_path: Path, private_redis: RedisServer, engines: dict[str, str]) -> Iterator[Stack]:
    env = settings_for(
        tmp_path,
        REDIS_URL=private_redis.url,
        WORKER="off",
        EVENTS_HEARTBEAT_SECONDS="0.5",
        **engines,
    )
    started: list[Proc] = []
    try:
        started.append(start_api(env, tmp_path / "a.log"))
        started.append(start_api(env, tmp_path / "b.log"))
        started.append(start_arq_worker(env, tmp_path / "worker.log"))
        yield Stack(*started)
    finally:
        for proc in started:
            proc.kill()
    for proc in started:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


@dataclass
class Received:
    id: int | None
    type: str | None
    data: dict | None
    comment: str | None = None


async def read_stream(response: httpx.Response) -> AsyncIterator[Received]:
    """The events (and comments) of an SSE stream, as a client parses them."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield Received(None, None, None, comment=line[1:].strip())
        elif line == "":
            if "data" in fields:
                yield Received(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event"),
                    json.loads(fields["data"]),
                )
            fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def events_until(
    stream: AsyncIterator[Received], done: Callable[[Received], bool], within: float = WITHIN_S
) -> list[Received]:
    seen: list[Received] = []

    async def collect() -> None:
        async for item in stream:
            if item.type is not None:
                seen.append(item)
                if done(item):
                    return

    await asyncio.wait_for(collect(), within)
    return seen


def upload(api: Proc, data: bytes, query: str = "") -> dict:
    res = httpx.post(
        f"{api.url}/api/images{query}",
        files={"file": ("photo.jpg", data, "image/jpeg")},
        timeout=WITHIN_S + 10,
    )
    assert res.status_code == 201, res.text
    return res.json()["data"]


async def test_events_and_waits_reach_one_api_from_another_and_from_the_worker(
    stack: Stack,
) -> None:
    async with (
        httpx.AsyncClient(timeout=WITHIN_S) as client,
        client.stream("GET", f"{stack.a.url}/api/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        stream = read_stream(response)

        record = await asyncio.to_thread(upload, stack.b, seeded_jpeg(1))  # the other API process
        image_id = record["image_id"]
        seen = await events_until(
            stream, lambda e: e.type == "image.ready" and e.data["image_id"] == image_id
        )

    mine = [e for e in seen if e.data["image_id"] == image_id]
    assert mine[0].type == "image.uploaded" and mine[0].data["state"] == "success"
    assert mine[-1].type == "image.ready"
    for kind in ("thumbnail", "exif"):
        kinds = [e.type for e in mine if e.data["kind"] == kind]
        assert kinds == ["job.started", "job.done"], mine
    ids = [e.id for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for event in seen:
        assert event.id == event.data["id"] and event.type == event.data["type"]

    # A waiter on A for an upload sent to B, whose jobs the worker runs.
    other = await asyncio.to_thread(upload, stack.b, seeded_jpeg(2))
    res = await asyncio.to_thread(
        httpx.get, f"{stack.a.url}/api/images/{other['image_id']}?wait=60", timeout=WITHIN_S
    )
    assert res.status_code == 200 and res.json()["data"]["ready"] is True
    assert res.json()["data"]["jobs"]["thumbnail"]["state"] == "done"

    # And an upload that waits for its own jobs.
    waited = await asyncio.to_thread(upload, stack.a, seeded_jpeg(3), "?wait=60")
    assert waited["ready"] is True and waited["jobs"]["exif"]["state"] == "done"


async def test_a_client_that_reconnects_with_last_event_id_gets_what_it_missed(
    stack: Stack,
) -> None:
    url = f"{stack.a.url}/api/events"
    async with httpx.AsyncClient(timeout=WITHIN_S) as client:
        async with client.stream("GET", url) as response:
            first = await asyncio.to_thread(upload, stack.a, seeded_jpeg(10))
            seen = await events_until(read_stream(response), lambda e: e.type == "image.uploaded")
        last_id = seen[-1].id

        # Disconnected: these happen while nobody listens.
        missed = [
            await asyncio.to_thread(upload, stack.b, seeded_jpeg(11 + i), "?wait=60")
            for i in (0, 1)
        ]

        headers = {"Last-Event-ID": str(last_id)}
        async with client.stream("GET", url, headers=headers) as response:
            resumed = await events_until(
                read_stream(response),
                lambda e: e.type == "image.ready" and e.data["image_id"] == missed[-1]["image_id"],
            )
    ids = [e.id for e in resumed]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and min(ids) > last_id
    for record in (first, *missed):
        assert any(
            e.type == "image.ready" and e.data["image_id"] == record["image_id"] for e in resumed
        ), record["image_id"]


async def test_an_idle_stream_gets_heartbeat_comments(stack: Stack) -> None:
    async with (
        httpx.AsyncClient(timeout=WITHIN_S) as client,
        client.stream("GET", f"{stack.a.url}/api/events") as response,
    ):
        comments = 0
        async for item in read_stream(response):
            if item.comment is not None:
                assert item.comment == "keep-alive"
                comments += 1
                if comments == 2:
                    break


def make_key(env: dict[str, str], name: str, scopes: str) -> str:
    made = run_command(
        [sys.executable, "imgapi.py", "keys", "create", name, "--scopes", scopes], env, REPO
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]


def test_the_stream_needs_the_read_scope_in_keys_mode(
    tmp_path: Path, engines: dict[str, str]
) -> None:
    env = settings_for(tmp_path, AUTH="keys", **engines)
    reader, uploader = make_key(env, "reader", "read"), make_key(env, "uploader", "upload")
    api = start_api(env, tmp_path / "api.log")
    try:
        url = f"{api.url}/api/events"
        res = httpx.get(url, timeout=10)
        assert res.status_code == 401 and res.headers["www-authenticate"].startswith("Bearer")
        assert res.json() == {"status": "failed", "data": None, "error": res.json()["error"]}
        res = httpx.get(url, headers={"Authorization": f"Bearer {uploader}"}, timeout=10)
        assert res.status_code == 403 and "read" in res.json()["error"]
        for bad in ("abc", "-1", "²", "1.5"):
            headers = {"X-API-Key": reader, "Last-Event-ID": bad.encode()}
            res = httpx.get(url, headers=headers, timeout=10)
            assert res.status_code == 400 and "Last-Event-ID" in res.json()["error"], bad
            res = httpx.get(url, params={"after": bad}, headers={"X-API-Key": reader}, timeout=10)
            assert res.status_code == 400 and "after" in res.json()["error"], bad
        with httpx.stream("GET", url, headers={"X-API-Key": reader}, timeout=10) as res:
            assert res.status_code == 200
            assert next(res.iter_lines()) == "retry: 2000"
    finally:
        api.kill()


async def test_a_shutdown_ends_open_streams_and_waiters_at_once(
    tmp_path: Path, private_redis: RedisServer, engines: dict[str, str]
) -> None:
    """Sanic waits up to its graceful-shutdown timeout (15 s) for open connections: a stream that
    never ends, or a waiter, would hold every restart that long."""
    # WORKER=off and no worker: the upload's jobs stay queued.
    env = settings_for(tmp_path, REDIS_URL=private_redis.url, WORKER="off", **engines)
    api = start_api(env, tmp_path / "api.log")
    try:
        record = await asyncio.to_thread(upload, api, seeded_jpeg(30))
        async with httpx.AsyncClient(timeout=WITHIN_S) as client:
            waiter = asyncio.create_task(
                client.get(f"{api.url}/api/images/{record['image_id']}?wait=60")
            )
            async with client.stream("GET", f"{api.url}/api/events") as response:
                lines = response.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                await asyncio.sleep(0.3)  # the waiter is waiting
                stopped = asyncio.create_task(asyncio.to_thread(api.stop, 10))
                rest = [line async for line in lines]  # the stream ends
            assert all(line == "" or line.startswith(":") for line in rest), rest
            res = await waiter
            assert res.status_code == 200 and res.json()["data"]["ready"] is False
            assert await stopped == 0, api.output()[-3000:]
    finally:
        api.kill()
