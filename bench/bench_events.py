"""How fast the service tells a client that an image is ready, and what open event streams cost.

Run (~30 s on 2 idle cores; under the shared lock when others may be benchmarking):
    flock /tmp/imgapi-bench.lock python bench/bench_events.py [--uploads N] [--clients N]
        [--only latency|memory] [--json-out FILE]

Parts (--only picks one; default both):
- latency, in two setups, one after the other:
  (a) in-process: one `python imgapi.py` running its jobs itself (WORKER=inline), no Redis;
  (b) across processes: `python imgapi.py` with WORKER=off plus one `arq jobs.WorkerSettings`
      worker, on a private redis-server (the worker's commits reach the API through the Redis
      event channel).
  One SSE client stays connected to /api/events for the whole setup. --uploads distinct JPEGs
  (made with Pillow, --size pixels, noise so that the thumbnail job takes a few ms) are uploaded,
  --concurrency at a time, after --warmup uploads that are not counted; right after each 201 a
  waiter `GET /api/images/{id}?wait=60` is sent. For each image:
    waiter latency = arrival of the waiter's answer - `at` of the image's `image.ready` event,
    SSE latency    = arrival of the `image.ready` frame - its `at`.
  `at` is written by the server in the transaction of the last job's finish, as RFC 3339 UTC
  with milliseconds, truncated (datetime.isoformat): both latencies are wall-clock differences
  on one machine at 1 ms resolution, and read up to 1 ms high (0.5 ms on average); they include
  that transaction's commit. Waiters sent after `image.ready` was written were not woken (they
  found the image ready): they are counted apart and left out of the waiter percentiles (all
  waiters are reported too). Waiters answered with ready=false (woken too early, or not woken
  within 60 s) and image.ready events the stream never delivered are counted; both should be 0.
  Goals: p99 under 50 ms in-process, under 100 ms across processes, for waiters and SSE.
- memory: one `python imgapi.py --workers 1` (WORKER=inline, no Redis). RSS is VmRSS summed over
  the API's process group (with --workers 1 imgapi.py serves in one process, Sanic.serve_single;
  the sum also covers a Sanic manager + worker process if there were any), read after a warm-up
  and --settle seconds, then again --settle seconds after --clients SSE clients have connected
  (raw asyncio sockets, each has read the stream's first `retry:` frame); the delta between the
  two is judged. Then one upload (the bytes of a warm-up image again, so that no job runs and
  adds its own buffers) whose `image.uploaded` event every client must receive: counted, with
  its fan-out latency (arrival - `at`, as above; an upper bound: the arrival stamps of 500
  streams are taken in this one client event loop, one after the other), and RSS read again.
  Goal: RSS delta under 50 MiB with 500 clients (not judged for fewer: noise outweighs them).
  The server's open fds are shown too (each stream is one).

Prints JSON, then markdown tables. The soft RLIMIT_NOFILE of this process is raised (if needed)
before the API starts, so the API (which inherits it) can hold the streams as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

import httpx  # noqa: E402
import procs  # noqa: E402  (tests/procs.py: real API, worker and redis-server processes)

GOAL_P99_MS = {"in-process": 50.0, "across-processes": 100.0}
GOAL_RSS_MIB = 50.0
GOAL_CLIENTS = 500
# Ready answers and events are bounded by this, far above the milliseconds they should take.
WITHIN_S = 30.0
# Clients connect this many at a time: Sanic's listen backlog is 100, and a dropped SYN would
# only come back after a 1 s retransmit.
CONNECT_BATCH = 50
# The API runs 4 jobs at once by default (JOB_CONCURRENCY).
WARM_UPLOADS = 4


# -- bodies --------------------------------------------------------------------------------------


def make_jpegs(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """`count` distinct JPEGs: a noise image (so that decoding and thumbnails do some work) with a
    different solid band per image, so that every upload has new bytes and so new jobs."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    base = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    out = []
    for i in range(count):
        image = base.copy()
        band = (i * 7) % max(1, size[1] - 16)
        ImageDraw.Draw(image).rectangle(
            (0, band, size[0], band + 16), fill=(i % 256, (i // 256) % 256, rng.randrange(256))
        )
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def multipart(jpeg: bytes, name: str) -> tuple[bytes, str]:
    form = common.Multipart(name)
    return b"".join(form.pieces([jpeg])), form.content_type


def at_seconds(at: str) -> float:
    """An event's RFC 3339 `at` ("2026-12-03T03:00:00.120Z") as Unix seconds."""
    return datetime.fromisoformat(at).timestamp()


# -- a raw SSE client ----------------------------------------------------------------------------


@dataclass
class Frame:
    fields: dict[str, str]
    arrived: float  # time.time() when the bytes that ended the frame had been read

    @property
    def type(self) -> str | None:
        return self.fields.get("event")

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.fields.get("data", "null") or "null")


class SseClient:
    """/api/events over one asyncio socket: no HTTP library, so that hundreds of them cost the
    benchmark little. Handles chunked and unframed bodies; the service ends lines with LF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._chunked = False
        self._buffer = bytearray()
        self._arrived = 0.0
        self._body: AsyncIterator[bytes] | None = None

    @classmethod
    async def open(cls, host: str, port: int, within: float = WITHIN_S) -> SseClient:
        """Connected, with the response head and the first `retry:` frame read."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._start(host, port), within)
        except BaseException:
            client.close()
            raise
        return client

    async def _start(self, host: str, port: int) -> None:
        self.writer.write(
            f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n".encode()
        )
        await self.writer.drain()
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = head.split("\r\n", 1)[0]
        if " 200 " not in status + " ":
            raise RuntimeError(f"/api/events answered {status!r}")
        self._chunked = "transfer-encoding: chunked" in head
        self._body = self._chunks()
        first = await self.next_frame()
        if first is None or "retry" not in first.fields:
            raise RuntimeError(f"/api/events did not start with retry: {first!r}")

    async def _chunks(self) -> AsyncIterator[bytes]:
        if not self._chunked:
            while data := await self.reader.read(65536):
                yield data
            return
        while True:
            line = await self.reader.readline()
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await self.reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]

    async def next_frame(self) -> Frame | None:
        """The next event, comment or retry frame; None once the stream ended."""
        assert self._body is not None
        while True:
            end = self._buffer.find(b"\n\n")
            if end >= 0:
                raw = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                fields: dict[str, str] = {}
                for line in raw.decode().split("\n"):
                    if line.startswith(":"):
                        continue  # a comment (keep-alive)
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                return Frame(fields, self._arrived)
            chunk = await anext(self._body, None)
            if chunk is None:
                return None
            # Taken at once: the frame that this chunk completes arrived now.
            self._arrived = time.time()
            self._buffer += chunk

    async def events(self) -> AsyncIterator[Frame]:
        while (frame := await self.next_frame()) is not None:
            if frame.type is not None:
                yield frame

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# -- processes and limits ------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(root: Path | None, label: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"imgapi-bench-events-{label}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def started(proc: procs.Proc) -> Iterator[procs.Proc]:
    """Stops (SIGTERM to its process group, SIGKILL after 10 s) whatever happens in the block."""
    try:
        yield proc
    finally:
        proc.stop(within=10)


def raise_fd_limit(need: int) -> dict[str, int]:
    """Raises this process's soft RLIMIT_NOFILE to `need` (up to the hard limit). Set before the
    API is spawned, the API inherits it: it holds one fd per stream as well."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            sys.exit(f"RLIMIT_NOFILE hard limit {hard} is below the {need} fds --clients needs")
        soft = target
    return {"soft": soft, "hard": hard}


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def rss_now(pid: int, samples: int = 5, interval: float = 0.1) -> int:
    """The median of a few readings of the group's summed VmRSS (one reading can catch a
    transient allocation)."""
    values = []
    for _ in range(samples):
        values.append(common.rss_bytes(common.group_pids(pid)))
        time.sleep(interval)
    values.sort()
    return values[len(values) // 2]


# -- part 1: latency -----------------------------------------------------------------------------


@dataclass
class Upload:
    image_id: str = ""
    status: int = 0
    error: str = ""
    waiter_sent: float = 0.0
    waiter_arrived: float = 0.0
    waiter_status: int = 0
    ready: bool | None = None


@dataclass
class Listener:
    """What the one long-lived stream saw: `image.ready` per image (at, arrival)."""

    ready: dict[str, tuple[float, float]] = field(default_factory=dict)
    events: int = 0
    ended: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def listen(client: SseClient, seen: Listener) -> None:
    async for frame in client.events():
        seen.events += 1
        if frame.type == "image.ready":
            data = frame.data
            seen.ready[data["image_id"]] = (at_seconds(data["at"]), frame.arrived)
            seen.changed.set()
    seen.ended = True
    seen.changed.set()


async def upload_and_wait(client: httpx.AsyncClient, url: str, body: bytes, ctype: str) -> Upload:
    out = Upload()
    try:
        res = await client.post(f"{url}/api/images", content=body, headers={"content-type": ctype})
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.status = res.status_code
    if res.status_code != 201:
        out.error = res.text[:200]
        return out
    out.image_id = res.json()["data"]["image_id"]
    # The waiter goes out right after the 201: the jobs are then queued or running.
    out.waiter_sent = time.time()
    try:
        waited = await client.get(f"{url}/api/images/{out.image_id}?wait=60")
    except httpx.HTTPError as exc:
        out.error = f"waiter: {type(exc).__name__}: {exc}"
        return out
    out.waiter_arrived = time.time()
    out.waiter_status = waited.status_code
    if waited.status_code == 200:
        out.ready = bool(waited.json()["data"]["ready"])
    else:
        out.error = f"waiter {waited.status_code}: {waited.text[:200]}"
    return out


async def run_uploads(
    client: httpx.AsyncClient, url: str, bodies: list[tuple[bytes, str]], concurrency: int
) -> list[Upload]:
    """Every body once, `concurrency` upload+waiter pairs in flight."""
    issued = itertools.count()
    results: list[Upload] = []

    async def slot() -> None:
        while (i := next(issued)) < len(bodies):
            results.append(await upload_and_wait(client, url, *bodies[i]))

    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return results


async def wait_for_events(seen: Listener, ids: list[str], within: float) -> None:
    """Until the stream has delivered image.ready for every id, it ended, or `within` passed."""
    deadline = time.monotonic() + within
    while not seen.ended and any(i not in seen.ready for i in ids):
        seen.changed.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.changed.wait(), remaining)


async def latency_setup(args: argparse.Namespace, setup: str) -> dict[str, Any]:
    images = make_jpegs(args.warmup + args.uploads, args.size, seed=1)
    bodies = [multipart(jpeg, f"events-{i}.jpg") for i, jpeg in enumerate(images)]
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(workdir(args.workdir, setup))
        env: dict[str, str] = {"WORKER": "inline"}
        if setup == "across-processes":
            redis = stack.enter_context(procs.redis_server(root / "redis"))
            env = {"WORKER": "off", "REDIS_URL": redis.url}
        settings = common.service_settings(root, **env)
        api = stack.enter_context(started(procs.start_api(settings, root / "api.log")))
        servers = [api]
        if setup == "across-processes":
            worker = procs.start_worker(settings, root / "worker.log")
            servers.append(stack.enter_context(started(worker)))
        port = int(api.url.rsplit(":", 1)[1])
        sse = await SseClient.open("127.0.0.1", port)
        stack.callback(sse.close)
        seen = Listener()
        listener = asyncio.create_task(listen(sse, seen))
        limits = httpx.Limits(max_connections=2 * args.concurrency)
        try:
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(90.0)) as client:
                # Warm-up (not counted): first imports and connections, the worker's start.
                warm = await run_uploads(client, api.url, bodies[: args.warmup], args.concurrency)
                began = time.perf_counter()
                results = await run_uploads(
                    client, api.url, bodies[args.warmup :], args.concurrency
                )
                wall = time.perf_counter() - began
            ids = [r.image_id for r in results if r.image_id]
            await wait_for_events(seen, ids, WITHIN_S)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        log_text = "".join(proc.output() for proc in servers)
    return summarize_latency(setup, results, warm, seen, wall, log_text)


def summarize_latency(
    setup: str,
    results: list[Upload],
    warm: list[Upload],
    seen: Listener,
    wall: float,
    log_text: str,
) -> dict[str, Any]:
    waiter_all: list[float] = []
    waiter_woken: list[float] = []
    sse: list[float] = []
    already_ready = missing_events = 0
    for r in results:
        event = seen.ready.get(r.image_id) if r.image_id else None
        if r.image_id and event is None:
            missing_events += 1
        if event is None:
            continue
        at, arrived = event
        sse.append(arrived - at)
        if r.ready:
            waiter_all.append(r.waiter_arrived - at)
            # Sent after the event was written (at is truncated: compare at its ms): found ready.
            if r.waiter_sent >= at + 0.001:
                already_ready += 1
            else:
                waiter_woken.append(r.waiter_arrived - at)
    errors = [r for r in results if r.error]
    goal = GOAL_P99_MS[setup]
    waiter_ms = common.latency_ms(waiter_woken)
    sse_ms = common.latency_ms(sse)
    ready_false = sum(r.ready is False for r in results)
    return {
        "setup": setup,
        "uploads": len(results),
        "warmup_uploads": len(warm),
        "warmup_errors": sum(bool(r.error) for r in warm),
        "seconds": round(wall, 2),
        "upload_errors": sum(r.status != 201 for r in results),
        "errors": len(errors),
        "first_errors": sorted({r.error for r in errors})[:5],
        "waiter": {
            "answered_ready": sum(r.ready is True for r in results),
            "answered_not_ready": ready_false,
            "woken": len(waiter_woken),
            "already_ready_when_sent": already_ready,
            "latency_ms": waiter_ms,
            "latency_all_ms": common.latency_ms(waiter_all),
        },
        "sse": {
            "events_seen": seen.events,
            "image_ready_received": len(sse),
            "image_ready_missing": missing_events,
            "stream_ended_early": seen.ended,
            "latency_ms": sse_ms,
        },
        "goal_p99_ms": goal,
        "goal_met": bool(
            waiter_woken
            and sse
            and waiter_ms["p99"] < goal
            and sse_ms["p99"] < goal
            and ready_false == 0
            and missing_events == 0
        ),
        "server_tracebacks": log_text.count("Traceback"),
    }


# -- part 2: memory ------------------------------------------------------------------------------


@dataclass
class Crowd:
    """The --clients streams and the image.uploaded events each received."""

    clients: list[SseClient] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    # Per client: each image.uploaded frame, parsed only afterwards: 500 clients share this one
    # event loop, and work done here would delay the arrival stamps of the clients after it.
    uploaded: list[list[Frame]] = field(default_factory=list)
    ended: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, index: int) -> None:
        async for frame in self.clients[index].events():
            if frame.type == "image.uploaded":
                self.uploaded[index].append(frame)
                self.changed.set()
        self.ended += 1
        self.changed.set()

    def count(self, image_id: str) -> int:
        """Clients that received image_id's image.uploaded (a cheap test, no JSON parsed)."""
        needle = f'"image_id":"{image_id}"'
        return sum(any(needle in f.fields.get("data", "") for f in got) for got in self.uploaded)

    def received(self, image_id: str) -> list[tuple[float, float]]:
        """(at, arrival) for each client that received image_id's image.uploaded."""
        out = []
        for frames in self.uploaded:
            for frame in frames:
                data = frame.data
                if data["image_id"] == image_id:
                    out.append((at_seconds(data["at"]), frame.arrived))
                    break
        return out

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def connect_crowd(crowd: Crowd, port: int, count: int) -> None:
    while len(crowd.clients) < count:
        batch = min(CONNECT_BATCH, count - len(crowd.clients))
        opened = await asyncio.gather(
            *(SseClient.open("127.0.0.1", port) for _ in range(batch)), return_exceptions=True
        )
        for client in opened:
            if isinstance(client, BaseException):
                for other in opened:
                    if isinstance(other, SseClient):
                        other.close()
                raise RuntimeError(f"an SSE client could not connect: {client!r}") from client
        for client in opened:
            assert isinstance(client, SseClient)
            index = len(crowd.clients)
            crowd.clients.append(client)
            crowd.uploaded.append([])
            crowd.tasks.append(asyncio.create_task(crowd.follow(index)))


async def memory(args: argparse.Namespace) -> dict[str, Any]:
    warm_jpegs = make_jpegs(WARM_UPLOADS, args.size, seed=99)
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(workdir(args.workdir, "memory"))
        settings = common.service_settings(root, WORKER="inline")
        api = stack.enter_context(started(procs.start_api(settings, root / "api.log", workers=1)))
        port = int(api.url.rsplit(":", 1)[1])
        crowd = Crowd()
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(90.0)) as client:
                # Warm-up: uploads and their jobs, as many at once as jobs run in parallel (each
                # job thread gets its own malloc arena), and a few streams opened and closed, so
                # that the baseline already holds what the measured part needs besides streams.
                async def warm_upload(jpeg: bytes) -> None:
                    body, ctype = multipart(jpeg, "warm.jpg")
                    res = await client.post(
                        f"{api.url}/api/images?wait=60",
                        content=body,
                        headers={"content-type": ctype},
                    )
                    res.raise_for_status()

                await asyncio.gather(*(warm_upload(j) for j in warm_jpegs))
                warm = [await SseClient.open("127.0.0.1", port) for _ in range(5)]
                for w in warm:
                    w.close()
                await asyncio.sleep(args.settle)
                pids = common.group_pids(api.pid)
                baseline = await asyncio.to_thread(rss_now, api.pid)
                fds_before = open_fds(pids)

                began = time.perf_counter()
                await connect_crowd(crowd, port, args.clients)
                connect_s = time.perf_counter() - began
                await asyncio.sleep(args.settle)
                connected = await asyncio.to_thread(rss_now, api.pid)
                fds_connected = open_fds(common.group_pids(api.pid))

                # The probe repeats a warm-up image's bytes: its jobs are long finished, so none
                # run, and the reading after it shows the event's fan-out, not a job's buffers.
                body, ctype = multipart(warm_jpegs[0], "probe.jpg")
                res = await client.post(
                    f"{api.url}/api/images", content=body, headers={"content-type": ctype}
                )
                res.raise_for_status()
                image_id = res.json()["data"]["image_id"]
                deadline = time.monotonic() + WITHIN_S
                while (
                    crowd.count(image_id) + crowd.ended < len(crowd.clients)
                    and time.monotonic() < deadline
                ):
                    crowd.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(crowd.changed.wait(), 1.0)
                got = crowd.received(image_id)
                # Known bytes are ready at once (image.ready in the upload's transaction).
                probe = await client.get(f"{api.url}/api/images/{image_id}?wait=60")
                probe_ready = probe.status_code == 200 and probe.json()["data"]["ready"] is True
                await asyncio.sleep(args.settle)
                after_event = await asyncio.to_thread(rss_now, api.pid)
                ended_early = crowd.ended
        finally:
            await crowd.close()
        await asyncio.sleep(args.settle)
        fds_closed = open_fds(common.group_pids(api.pid))
        after_close = await asyncio.to_thread(rss_now, api.pid)
        log_text = api.output()
    delta = connected - baseline
    fanout = [arrived - at for at, arrived in got]
    return {
        "clients": args.clients,
        "server_processes": len(pids),
        "connect_seconds": round(connect_s, 2),
        "rss_mib": {
            "baseline": common.mib(baseline),
            "clients_connected": common.mib(connected),
            "after_one_event": common.mib(after_event),
            "after_clients_closed": common.mib(after_close),
        },
        "delta_mib": common.mib(delta),
        "kib_per_client": round((connected - baseline) / 1024 / max(1, args.clients), 1),
        "server_fds": {
            "before": fds_before,
            "clients_connected": fds_connected,
            "after_clients_closed": fds_closed,
        },
        "probe_image_uploaded_received": len(got),
        "probe_ready": probe_ready,
        "streams_ended_early": ended_early,
        "fanout_latency_ms": common.latency_ms(fanout),
        "goal": f"RSS delta < {GOAL_RSS_MIB:g} MiB with {GOAL_CLIENTS} clients, all get the event",
        # Judged at the goal's client count only: for a few clients, noise outweighs the streams.
        "goal_met": (
            delta / 2**20 < GOAL_RSS_MIB and len(got) == args.clients
            if args.clients >= GOAL_CLIENTS
            else None
        ),
        "server_tracebacks": log_text.count("Traceback"),
    }


# -- report --------------------------------------------------------------------------------------


def tables(report: dict[str, Any]) -> list[str]:
    out = []
    rows = []
    for r in report.get("latency", []):
        for what, part in (("waiter (woken)", r["waiter"]), ("SSE image.ready", r["sse"])):
            ms = part["latency_ms"]
            n = part["woken"] if what.startswith("waiter") else part["image_ready_received"]
            rows.append(
                [
                    r["setup"],
                    what,
                    n,
                    ms["p50"],
                    ms["p95"],
                    ms["p99"],
                    ms.get("max", float("nan")),
                    r["goal_p99_ms"],
                    ms["p99"] < r["goal_p99_ms"],
                ]
            )
    if rows:
        text = "Latency from `at` of image.ready (last job's finish, 1 ms resolution) to the "
        text += "answer\n\n"
        text += common.markdown_table(
            ["setup", "what", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "goal p99 ms", "met"],
            rows,
        )
        for r in report["latency"]:
            w, s = r["waiter"], r["sse"]
            text += (
                f"\n- {r['setup']}: {r['uploads']} uploads in {r['seconds']} s, "
                f"{r['errors']} errors; waiters ready={w['answered_ready']}, "
                f"ready=false={w['answered_not_ready']}, "
                f"already ready when sent={w['already_ready_when_sent']} "
                f"(all waiters p99 {w['latency_all_ms']['p99']} ms); "
                f"image.ready missing on the stream={s['image_ready_missing']}"
            )
        out.append(text)
    m = report.get("memory")
    if m:
        rss = m["rss_mib"]
        fds = m["server_fds"]
        out.append(
            f"API RSS (VmRSS summed over its process group, {m['server_processes']} process(es)) "
            f"with {m['clients']} open SSE clients\n\n"
            + common.markdown_table(
                [
                    "baseline MiB",
                    "connected MiB",
                    "after 1 event MiB",
                    "closed MiB",
                    "delta MiB",
                    "KiB/client",
                    "fds before/connected/closed",
                    "got image.uploaded",
                    "fan-out p50/p99/max ms",
                    "goal < 50 MiB per 500",
                ],
                [
                    [
                        rss["baseline"],
                        rss["clients_connected"],
                        rss["after_one_event"],
                        rss["after_clients_closed"],
                        m["delta_mib"],
                        m["kib_per_client"],
                        f"{fds['before']}/{fds['clients_connected']}/{fds['after_clients_closed']}",
                        f"{m['probe_image_uploaded_received']}/{m['clients']}",
                        "/".join(str(m["fanout_latency_ms"].get(k)) for k in ("p50", "p99", "max")),
                        "n/a (< 500 clients)" if m["goal_met"] is None else m["goal_met"],
                    ]
                ],
            )
        )
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "events",
        "environment": common.environment(),
        "fd_limit": args.fd_limit,
        "image_size": list(args.size),
        "uploads": args.uploads,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "clients": args.clients,
        "time_resolution_ms": 1,
    }
    runs: list[tuple[str, Callable[[], Any]]] = []
    if args.only in (None, "latency"):
        for setup in ("in-process", "across-processes"):
            runs.append(("latency", lambda s=setup: latency_setup(args, s)))
    if args.only in (None, "memory"):
        runs.append(("memory", lambda: memory(args)))
    for key, run in runs:
        result = await run()
        if key == "memory":
            report["memory"] = result
        else:
            report.setdefault(key, []).append(result)
        print(f"  {key}: {result.get('setup', 'memory')} done", file=sys.stderr)
    return report


def size_arg(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) < 16 or int(height) < 32:
        raise argparse.ArgumentTypeError("use WIDTHxHEIGHT, e.g. 1024x768")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=100, help="measured uploads per setup")
    parser.add_argument("--warmup", type=int, default=5, help="uploads before measuring")
    parser.add_argument("--concurrency", type=int, default=4, help="upload+waiter pairs at once")
    parser.add_argument("--size", type=size_arg, default=(1024, 768), help="JPEG WIDTHxHEIGHT")
    parser.add_argument("--clients", type=int, default=GOAL_CLIENTS, help="SSE clients (memory)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before RSS readings")
    parser.add_argument("--only", choices=("latency", "memory"), help="one part only")
    parser.add_argument(
        "--workdir", type=Path, help="where the servers' databases and media go (default: /tmp)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.uploads < 1 or args.concurrency < 1 or args.clients < 1 or args.warmup < 0:
        parser.error("--uploads, --concurrency and --clients must be positive")
    if procs.redis_server_path() is None and args.only != "memory":
        parser.error("redis-server is not installed (needed for the across-processes setup)")
    # Each stream is an fd here and one in the API; plus the usual few hundred for both.
    args.fd_limit = raise_fd_limit(args.clients + 512)

    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        report = runner(main_async(args))
    except KeyboardInterrupt:
        # The processes and folders are gone by now (the context managers ran on the way out).
        sys.exit("interrupted")
    common.emit(report, tables(report), args.json_out)


if __name__ == "__main__":
    main()
