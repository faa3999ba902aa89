"""Job latency of real processes: how soon an upload's thumbnail (and EXIF) are ready.

Run (one command, ~2-3 minutes; under the shared lock when others may be benchmarking):
    flock /tmp/imgapi-bench.lock python bench/bench_jobs.py [--json-out FILE]

Stacks (CAPTION_MODEL=none, each on a fresh database and media folder under /tmp):
- mode1: `python imgapi.py` with no REDIS_URL: jobs run in the API process;
- mode3-wN: a private redis-server, the API with WORKER=off (it only enqueues) and N
  `arq jobs.WorkerSettings` processes (ARQ_POLL_SECONDS as configured, default 0.05).

Parts:
- latency: one upload at a time of a 12 MP corpus photo (xiaomi-mi9t, 4000x3000), --count times,
  each made byte-unique (a JPEG COM segment with a counter inserted after SOI, no re-encode);
  measured from the start of the upload request until GET /api/images/{id}, polled every 5 ms,
  shows data.jobs.thumbnail.state == "done". Goals: p50 <= 120 ms (mode1), <= 300 ms (mode3-w1).
- burst: --burst uploads (the 4 largest corpus photos in turn, byte-unique) sent by --concurrency
  clients; for each upload, from the start of its request until both its thumbnail and EXIF jobs
  are done. The done moment is the later of the two jobs' finished_at in the jobs table (read
  after the burst; the clock is this machine's, as for the start), so no polling loads the API
  while the burst runs. Goal: p95 <= 6 s (the seed: 26 s), in mode1, mode3-w1 and mode3-w2.

Prints JSON, then markdown tables. Extra settings for every stack: --env KEY=VALUE (repeatable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

import httpx  # noqa: E402
import procs  # noqa: E402  (tests/procs.py: real API, worker and redis-server processes)

LATENCY_PHOTO = "xiaomi-mi9t-12mp-orient6.jpg"
POLL_S = 0.005
GOALS_LATENCY_P50_MS = {"mode1": 120.0, "mode3-w1": 300.0}
GOAL_BURST_P95_S = 6.0
SEED_BURST_P95_S = 26.0
UNIQUE_BYTES = "a JPEG COM segment with a run id and counter inserted after SOI (no re-encode)"


# -- the stacks -----------------------------------------------------------------------------------


@dataclass
class Stack:
    label: str
    api: procs.Proc
    db_path: Path
    workers: list[procs.Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.api.url

    def pgids(self) -> dict[str, list[int]]:
        return {
            "api": [self.api.pid],
            "workers": [w.pid for w in self.workers],
        }


def cpu_of(pgids: list[int]) -> float:
    return sum(common.cpu_seconds(common.group_pids(pgid)) for pgid in pgids)


@contextlib.contextmanager
def stack(label: str, workers: int, extra_env: dict[str, str]) -> Iterator[Stack]:
    """mode1 when workers == 0, else mode 3 with that many arq worker processes."""
    workdir = Path(tempfile.mkdtemp(prefix=f"imgapi-bench-jobs-{label}-"))
    env = common.service_settings(workdir, **extra_env)
    try:
        with contextlib.ExitStack() as cleanup:
            if workers:
                redis = cleanup.enter_context(procs.redis_server(workdir / "redis"))
                env.update(REDIS_URL=redis.url, WORKER="off", ARQ_QUEUE="imgapi:bench")
            api = procs.start_api(env, workdir / "api.log")
            cleanup.callback(api.stop)
            result = Stack(label, api, Path(env["DB_PATH"]))
            for n in range(workers):
                worker = procs.start_worker(env, workdir / f"worker{n}.log")
                cleanup.callback(worker.stop)
                result.workers.append(worker)
            for worker in result.workers:
                procs.wait_until(
                    lambda w=worker: "Starting worker" in w.output(), 60, f"worker of {label}"
                )
            yield result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- uploads --------------------------------------------------------------------------------------


class Bodies:
    """Byte-unique multipart bodies of one photo: only the COM segment is new per upload."""

    def __init__(self, path: Path) -> None:
        jpeg = path.read_bytes()
        self.form = common.Multipart(path.name)
        self.prefix = self.form.head + jpeg[:2]
        self.suffix = jpeg[2:] + self.form.tail
        self.run_id = secrets.token_hex(6)
        self.count = 0

    def next(self) -> tuple[bytes, dict[str, str]]:
        self.count += 1
        tag = common.jpeg_comment(f"bench-jobs {self.run_id} {self.count:06d}".encode())
        body = b"".join((self.prefix, tag, self.suffix))
        return body, {"content-type": self.form.content_type}


async def post(client: httpx.AsyncClient, url: str, bodies: Bodies) -> dict[str, Any]:
    body, headers = bodies.next()
    res = await client.post(url + "/api/images", content=body, headers=headers)
    if res.status_code != 201:
        raise RuntimeError(f"upload answered {res.status_code}: {res.text[:300]}")
    return res.json()["data"]


async def wait_quiet(client: httpx.AsyncClient, url: str, within: float = 600) -> None:
    """Until no job is queued or running and every upload's stats row is closed."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        res = await client.get(url + "/api/stats")
        stats = res.json()
        if stats["queued_jobs"] == 0 and stats["processing"] == 0:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"jobs still running after {within}s")


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# -- part 1: one upload at a time, until its thumbnail is ready ---------------------------------


async def latency(target: Stack, photo: Path, count: int, warmup: int) -> dict[str, Any]:
    bodies = Bodies(photo)
    upload_s: list[float] = []
    ready_s: list[float] = []
    polls: list[int] = []
    failures: list[str] = []
    measured: list[tuple[str, float, float]] = []  # image_id, wall start, wall ready
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        cpu_before: dict[str, float] = {}
        for i in range(warmup + count):
            if i == warmup:
                cpu_before = {k: cpu_of(v) for k, v in target.pgids().items()}
            wall, started = time.time(), time.perf_counter()
            data = await post(client, target.url, bodies)
            uploaded = time.perf_counter()
            n = 0
            while True:
                n += 1
                res = await client.get(f"{target.url}/api/images/{data['image_id']}")
                state = res.json()["data"]["jobs"]["thumbnail"]
                if state["state"] == "done":
                    break
                if state["state"] == "failed":
                    failures.append(state.get("error", ""))
                    break
                await asyncio.sleep(POLL_S)
            ready = time.perf_counter()
            if i >= warmup:
                upload_s.append(uploaded - started)
                ready_s.append(ready - started)
                polls.append(n)
                measured.append((data["image_id"], wall, wall + (ready - started)))
        await wait_quiet(client, target.url)
        cpu = {k: round(cpu_of(v) - cpu_before[k], 2) for k, v in target.pgids().items()}
    return {
        "stack": target.label,
        "photo": photo.name,
        "count": count,
        "warmup": warmup,
        "upload_ms": common.latency_ms(upload_s),
        "thumbnail_ready_ms": common.latency_ms(ready_s),
        "phases_p50_ms": phases(target.db_path, measured),
        "polls_per_upload_mean": round(sum(polls) / max(1, len(polls)), 1),
        "failures": failures,
        "server_cpu_s": cpu,
    }


def phases(db_path: Path, measured: list[tuple[str, float, float]]) -> dict[str, float]:
    """Where the time went, from the server's own timestamps (ms resolution, same clock):
    request start -> stats.start_time -> images.processed_at (body received, validated, stored)
    -> thumbnail job started_at (dispatch) -> finished_at (the job) -> seen done by the client."""
    with procs.read_only(db_path) as conn:
        rows = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT i.image_id, s.start_time, i.processed_at, j.started_at, j.finished_at"
                " FROM images i JOIN stats s USING (image_id)"
                " JOIN jobs j ON j.sha256 = i.metadata_sha256 AND j.kind = 'thumbnail'"
            )
        }
    names = ("to_handler", "receive_validate_store", "dispatch", "job", "seen_by_client")
    spans: dict[str, list[float]] = {name: [] for name in names}
    for image_id, wall_start, wall_ready in measured:
        if image_id not in rows or None in rows[image_id]:
            continue
        marks = [wall_start, *(epoch(stamp) for stamp in rows[image_id]), wall_ready]
        for name, a, b in zip(names, marks, marks[1:], strict=False):
            spans[name].append((b - a) * 1000)
    return {name: round(common.percentile(v, 50), 1) for name, v in spans.items()}


# -- part 2: a burst of large uploads, until thumbnail and EXIF are done -------------------------


async def burst(
    target: Stack, photos: list[Path], count: int, concurrency: int, warmup: int
) -> dict[str, Any]:
    bodies = [Bodies(p) for p in photos]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0)) as client:
        for i in range(warmup):
            await post(client, target.url, bodies[i % len(bodies)])
        await wait_quiet(client, target.url)
        cpu_before = {k: cpu_of(v) for k, v in target.pgids().items()}

        started: dict[str, float] = {}  # sha256 -> wall-clock start of its upload request
        upload_s: list[float] = []
        issued = iter(range(count))

        async def one_client() -> None:
            for i in issued:
                body, headers = bodies[i % len(bodies)].next()
                wall, t0 = time.time(), time.perf_counter()
                res = await client.post(target.url + "/api/images", content=body, headers=headers)
                upload_s.append(time.perf_counter() - t0)
                if res.status_code != 201:
                    raise RuntimeError(f"upload answered {res.status_code}: {res.text[:300]}")
                started[res.json()["data"]["metadata"]["sha256"]] = wall

        first = time.time()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        uploads_done = time.time()
        await wait_quiet(client, target.url)
        cpu = {k: round(cpu_of(v) - cpu_before[k], 2) for k, v in target.pgids().items()}

    done, states = finished_at(target.db_path, list(started))
    per_upload = [done[sha] - t for sha, t in started.items() if sha in done]
    last = max(done.values()) if done else first
    return {
        "stack": target.label,
        "photos": [p.name for p in photos],
        "count": count,
        "concurrency": concurrency,
        "warmup": warmup,
        "upload_ms": common.latency_ms(upload_s),
        "thumbnail_and_exif_done_s": {
            k: round(v / 1000, 2) for k, v in common.latency_ms(per_upload).items()
        },
        "uploads_wall_s": round(uploads_done - first, 2),
        "all_done_wall_s": round(last - first, 2),
        "job_states": states,
        "server_cpu_s": cpu,
    }


def finished_at(db_path: Path, shas: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Per sha256, when the later of its thumbnail and EXIF jobs finished; and job state counts."""
    with procs.read_only(db_path) as conn:
        rows = conn.execute(
            "SELECT sha256, kind, state, finished_at FROM jobs WHERE kind IN ('thumbnail', 'exif')"
        ).fetchall()
    wanted = set(shas)
    done: dict[str, float] = {}
    states: dict[str, int] = {}
    for sha, _kind, state, stamp in rows:
        if sha not in wanted:
            continue
        states[state] = states.get(state, 0) + 1
        if stamp:
            done[sha] = max(done.get(sha, 0.0), epoch(stamp))
    return done, states


# -- report ---------------------------------------------------------------------------------------


def tables(report: dict[str, Any]) -> list[str]:
    out = []
    rows = []
    for r in report["latency"]:
        goal = GOALS_LATENCY_P50_MS.get(r["stack"])
        ready = r["thumbnail_ready_ms"]
        rows.append(
            [
                r["stack"],
                r["count"],
                r["upload_ms"]["p50"],
                ready["p50"],
                ready["p95"],
                ready["max"],
                goal if goal is not None else "-",
                (ready["p50"] <= goal) if goal is not None else "-",
            ]
        )
    if rows:
        out.append(
            "Thumbnail ready, one 12 MP upload at a time (ms from request start)\n\n"
            + common.markdown_table(
                [
                    "stack",
                    "n",
                    "upload p50",
                    "ready p50",
                    "ready p95",
                    "ready max",
                    "goal p50",
                    "met",
                ],
                rows,
            )
        )
    rows = []
    for r in report["burst"]:
        s = r["thumbnail_and_exif_done_s"]
        rows.append(
            [
                r["stack"],
                r["count"],
                r["concurrency"],
                s["p50"],
                s["p95"],
                s["max"],
                r["uploads_wall_s"],
                r["all_done_wall_s"],
                GOAL_BURST_P95_S,
                s["p95"] <= GOAL_BURST_P95_S,
            ]
        )
    if rows:
        out.append(
            f"Burst of large photos: upload start -> thumbnail and EXIF done (s; seed p95 "
            f"{SEED_BURST_P95_S:g} s)\n\n"
            + common.markdown_table(
                [
                    "stack",
                    "n",
                    "c",
                    "p50",
                    "p95",
                    "max",
                    "uploads wall",
                    "all done wall",
                    "goal p95",
                    "met",
                ],
                rows,
            )
        )
    return out


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    extra = parse_env(args.env)
    latency_photo = common.CORPUS / "photos" / LATENCY_PHOTO
    burst_photos = common.largest_photos(4)
    report: dict[str, Any] = {
        "benchmark": "bench_jobs",
        "environment": common.environment(),
        "settings": {"CAPTION_MODEL": "none", **extra},
        "unique_bytes": UNIQUE_BYTES,
        "poll_interval_ms": POLL_S * 1000,
        "latency": [],
        "burst": [],
    }
    stacks = {"mode1": 0, "mode3-w1": 1, "mode3-w2": 2}
    for label, workers in stacks.items():
        want_latency = "latency" in args.parts and label in GOALS_LATENCY_P50_MS
        want_burst = "burst" in args.parts
        if label not in args.stacks or not (want_latency or want_burst):
            continue
        with stack(label, workers, extra) as target:
            if want_latency:
                result = await latency(target, latency_photo, args.count, args.warmup)
                report["latency"].append(result)
                print(f"# {label} latency: {result['thumbnail_ready_ms']}", file=sys.stderr)
            if want_burst:
                result = await burst(
                    target, burst_photos, args.burst, args.concurrency, args.warmup
                )
                report["burst"].append(result)
                print(f"# {label} burst: {result['thumbnail_and_exif_done_s']}", file=sys.stderr)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=30, help="latency: uploads measured")
    parser.add_argument("--warmup", type=int, default=3, help="uploads before measuring")
    parser.add_argument("--burst", type=int, default=32, help="burst: uploads")
    parser.add_argument("--concurrency", type=int, default=8, help="burst: concurrent clients")
    parser.add_argument(
        "--parts", nargs="+", default=["latency", "burst"], choices=["latency", "burst"]
    )
    parser.add_argument(
        "--stacks",
        nargs="+",
        default=["mode1", "mode3-w1", "mode3-w2"],
        choices=["mode1", "mode3-w1", "mode3-w2"],
    )
    parser.add_argument("--env", action="append", default=[], help="extra setting KEY=VALUE")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    common.emit(report, tables(report), args.json_out)


if __name__ == "__main__":
    main()
