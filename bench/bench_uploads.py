"""Upload throughput, latency, event-loop stalls and memory of `python imgapi.py` over real HTTP.

Run (one command, ~8-10 minutes; under the shared lock when others may be benchmarking):
    flock /tmp/imgapi-bench.lock python bench/bench_uploads.py [--json-out FILE]

Parts (--parts, default all three):
- throughput: the 4 largest corpus photos, every upload byte-unique (a JPEG COM segment carrying a
  counter is inserted right after SOI: valid, no re-encode, a new SHA-256 each time), sent by
  --concurrency clients over keep-alive connections, --warmup uploads first, then --count
  measured. For each configuration: WORKER=inline (mode 1: the API runs the thumbnail and EXIF
  jobs in-process too) and WORKER=off (the API alone: it only records jobs), with 1 and 2 server
  processes (--workers). Reports uploads/s, p50/p95/p99, errors, CPU of client and server.
- slow: the same load again with SLOW_CALLBACK_MS=20 (asyncio debug mode); every "Executing ...
  took X seconds" line the API logs after the warm-up is counted, the slowest are shown.
- memory: a ~25 MB noisy JPEG (random RGB noise, 6000x3600, quality 95, made once under /tmp),
  uploaded 16 at a time (unique bytes each, --rss-rounds bursts) to the default configuration;
  the summed VmRSS of the API's process group is sampled every 20 ms: idle (after warm-up),
  peak while uploading, peak until its jobs finished. Variant: 16 x 25 MB of garbage (random
  bytes behind a JPEG SOI marker, so it gets past the magic-byte check and is refused by the
  decoder).

Prints JSON, then markdown tables. The client is httpx.AsyncClient on uvloop with pre-built
bodies: per upload it only makes the 39-byte COM segment; its CPU use is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

import httpx  # noqa: E402
import procs  # noqa: E402  (tests/procs.py: real API processes)

GOAL_UPLOADS_PER_S = 60
GOAL_P99_MS = 800
GOAL_SLOW_CALLBACK_MS = 20
GOAL_RSS_DELTA_MIB = 60
BIG_JPEG = Path(tempfile.gettempdir()) / "imgapi-bench-noise-6000x3600-q95.jpg"
BIG_SIZE = (6000, 3600)
UNIQUE_BYTES = (
    "a JPEG COM segment (FF FE) carrying a run id and a counter, inserted right after SOI "
    "(no re-encode)"
)


# -- bodies --------------------------------------------------------------------------------------


@dataclass
class Body:
    """One upload's framing around a shared image: only the COM segment is made per request."""

    name: str
    content_type: str
    prefix: bytes  # multipart part head + SOI
    suffix: bytes  # the image after SOI + the closing boundary
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))

    @classmethod
    def of(cls, name: str, jpeg: bytes) -> Body:
        form = common.Multipart(name)
        return cls(name, form.content_type, form.head + jpeg[:2], jpeg[2:] + form.tail)

    def pieces(self, n: int) -> list[bytes]:
        tag = common.jpeg_comment(f"imgapi-bench {self.run_id} {n:09d}".encode())
        return [self.prefix, tag, self.suffix]

    def headers(self, pieces: list[bytes]) -> dict[str, str]:
        return {
            "content-type": self.content_type,
            "content-length": str(common.total_length(pieces)),
        }


async def stream(pieces: list[bytes], chunk: int = 0) -> AsyncIterator[bytes]:
    for piece in pieces:
        if chunk and len(piece) > chunk:
            view = memoryview(piece)
            for start in range(0, len(piece), chunk):
                yield bytes(view[start : start + chunk])
        else:
            yield piece


@dataclass
class Result:
    started: float
    seconds: float
    status: int  # 0: the request raised
    error: str = ""


async def post(client: httpx.AsyncClient, url: str, body: Body, n: int, chunk: int = 0) -> Result:
    pieces = body.pieces(n)
    started = time.perf_counter()
    try:
        res = await client.post(url, content=stream(pieces, chunk), headers=body.headers(pieces))
        await res.aread()
    except httpx.HTTPError as exc:
        return Result(started, time.perf_counter() - started, 0, f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - started
    error = ""
    if res.status_code != 201:
        try:
            error = str(res.json().get("error"))[:200]
        except ValueError:
            error = res.text[:200]
    return Result(started, elapsed, res.status_code, error)


async def load(
    client: httpx.AsyncClient,
    url: str,
    bodies: list[Body],
    count: int,
    concurrency: int,
    numbers: itertools.count,
) -> tuple[list[Result], float]:
    """`count` uploads, `concurrency` at a time, bodies in turn; returns results and wall time."""
    issued = itertools.count()
    results: list[Result] = []

    async def client_loop() -> None:
        while (i := next(issued)) < count:
            results.append(await post(client, url, bodies[i % len(bodies)], next(numbers)))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results, time.perf_counter() - started


def http_client(concurrency: int, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0), headers=headers)


async def stats(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    res = await client.get(url + "/api/stats")
    res.raise_for_status()
    return res.json()


async def wait_for_jobs(client: httpx.AsyncClient, url: str, within: float) -> float | None:
    """Seconds until no job is queued or running, or None when that did not happen in time."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        s = await stats(client, url)
        if s.get("queued_jobs", 0) == 0 and s.get("processing", 0) == 0:
            return round(time.monotonic() - started, 1)
        await asyncio.sleep(0.2)
    return None


# -- the server ----------------------------------------------------------------------------------


@contextlib.contextmanager
def api_server(
    workroot: Path | None,
    label: str,
    workers: int,
    headers: dict[str, str] | None = None,
    **env: str,
) -> Iterator[procs.Proc]:
    """`python imgapi.py` on a fresh database and media folder, removed afterwards. With AUTH=keys
    an admin key is made first and `headers` gets its Authorization header."""
    workdir = Path(tempfile.mkdtemp(prefix=f"imgapi-bench-{label}-", dir=workroot))
    with contextlib.ExitStack() as stack:
        if env.get("WORKER") == "off" and not env.get("REDIS_URL"):
            # WORKER=off needs a queue: a private Redis that no worker reads.
            env["REDIS_URL"] = stack.enter_context(procs.redis_server(workdir / "redis")).url
        settings_env = common.service_settings(workdir, **env)
        if env.get("AUTH") == "keys":
            made = procs.run_command(
                [sys.executable, "imgapi.py", "keys", "create", "bench", "--scopes", "admin"],
                settings_env,
                procs.REPO,
            )
            made.check_returncode()
            if headers is not None:
                headers["Authorization"] = f"Bearer {made.stdout.splitlines()[-1]}"
        proc = procs.start_api(settings_env, workdir / "api.log", workers=workers)
        try:
            yield proc
        finally:
            proc.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def log_offset(proc: procs.Proc) -> int:
    return proc.log.stat().st_size if proc.log.exists() else 0


def log_since(proc: procs.Proc, offset: int) -> str:
    with proc.log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# -- part 1 and 2: throughput and slow callbacks -------------------------------------------------


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r.seconds for r in results if r.status == 201]
    statuses = Counter(str(r.status) for r in results)
    errors = [r for r in results if r.status != 201]
    return {
        "uploads": len(results),
        "seconds": round(wall, 2),
        "uploads_per_s": round(len(ok) / wall, 1),
        "latency_ms": common.latency_ms(ok),
        "errors": len(errors),
        "statuses": dict(statuses),
        "first_errors": sorted({f"{r.status}: {r.error}" for r in errors})[:5],
    }


async def run_load(
    args: argparse.Namespace, workers: int, worker_mode: str, slow_ms: int, auth: str = "open"
) -> dict[str, Any]:
    bodies = [Body.of(p.name, p.read_bytes()) for p in common.largest_photos(4)]
    numbers = itertools.count()
    label = f"{worker_mode}-w{workers}" + ("-slow" if slow_ms else "") + f"-{auth}"
    env = {"WORKER": worker_mode, "SLOW_CALLBACK_MS": str(slow_ms), "AUTH": auth}
    headers: dict[str, str] = {}
    with api_server(args.workdir, label, workers, headers, **env) as proc:
        url = proc.url + "/api/images"
        pids = common.group_pids(proc.pid)
        async with http_client(args.concurrency, headers) as client:
            warm, _ = await load(client, url, bodies, args.warmup, args.concurrency, numbers)
            offset = log_offset(proc)
            server_cpu = common.cpu_seconds(pids)
            with common.stopwatch() as client_time:
                results, wall = await load(
                    client, url, bodies, args.count, args.concurrency, numbers
                )
            server_cpu = common.cpu_seconds(pids) - server_cpu
            after = await stats(client, proc.url)
        out = {
            "config": label,
            "auth": auth,
            "worker": worker_mode,
            "server_processes": workers,
            "concurrency": args.concurrency,
            "warmup_errors": sum(r.status != 201 for r in warm),
            **summarize(results, wall),
            "client_cpu_pct_of_one_core": round(100 * client_time["cpu"] / wall, 1),
            "server_cpu_pct_of_one_core": round(100 * server_cpu / wall, 1),
            # Machine-independent-ish: 2 idle cores give at most 2000 / this uploads/s.
            "server_cpu_ms_per_upload": round(1000 * server_cpu / max(1, len(results)), 1),
            "jobs_queued_or_running_after": after["queued_jobs"],
        }
        if slow_ms:
            slow = common.slow_callbacks(log_since(proc, offset))
            out["slow_callbacks"] = {
                "threshold_ms": slow_ms,
                "count": len(slow),
                "max_ms": slow[0][0] if slow else 0.0,
                "slowest": [f"{ms} ms: {what[:400]}" for ms, what in slow[:5]],
            }
    return out


# -- part 3: memory ------------------------------------------------------------------------------


def big_jpeg() -> bytes:
    """A ~25 MB JPEG of random RGB noise, made once (deterministic) and kept under /tmp."""
    if BIG_JPEG.exists():
        return BIG_JPEG.read_bytes()
    from PIL import Image

    width, height = BIG_SIZE
    noise = random.Random(2).randbytes(width * height * 3)
    temp = BIG_JPEG.with_suffix(f".{os.getpid()}.part")
    Image.frombytes("RGB", BIG_SIZE, noise).save(temp, "JPEG", quality=95)
    temp.replace(BIG_JPEG)
    return BIG_JPEG.read_bytes()


async def memory_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    image = big_jpeg()
    if variant == "valid":
        big = Body.of("big-noise.jpg", image)
    else:
        garbage = b"\xff\xd8" + random.Random(3).randbytes(len(image) - 2)
        big = Body.of("garbage.jpg", garbage)
    photos = [Body.of(p.name, p.read_bytes()) for p in common.largest_photos(4)]
    warm_big = Body.of("big-noise.jpg", image)
    numbers = itertools.count()
    with api_server(args.workdir, f"rss-{variant}", 1) as proc:
        url = proc.url + "/api/images"
        async with http_client(args.rss_concurrency) as client:
            with common.RssSampler(proc.pid, interval=0.02) as sampler:
                # Warm-up: every code path the burst takes (incl. jobs), one request at a time.
                for body in [*photos, warm_big, warm_big]:
                    await post(client, url, body, next(numbers), chunk=256 * 1024)
                await wait_for_jobs(client, proc.url, within=120)
                await asyncio.sleep(1.0)
                sampler.reset()
                await asyncio.sleep(1.0)
                idle = sampler.peak()

                sampler.reset()
                results: list[Result] = []
                started = time.perf_counter()
                for _ in range(args.rss_rounds):
                    results += await asyncio.gather(
                        *(
                            post(client, url, big, next(numbers), chunk=256 * 1024)
                            for _ in range(args.rss_concurrency)
                        )
                    )
                wall = time.perf_counter() - started
                peak_uploads = sampler.peak()
                drained = await wait_for_jobs(client, proc.url, within=300)
                peak_jobs = max(sampler.peak(), peak_uploads)
                samples = sampler.samples()
    statuses = Counter(str(r.status) for r in results)
    return {
        "variant": variant,
        "body_mib": common.mib(len(image)),
        "concurrent": args.rss_concurrency,
        "rounds": args.rss_rounds,
        "statuses": dict(statuses),
        "first_errors": sorted({f"{r.status}: {r.error}" for r in results if r.error})[:3],
        "upload_seconds": round(wall, 2),
        "idle_mib": common.mib(idle),
        "peak_uploading_mib": common.mib(peak_uploads),
        "delta_uploading_mib": common.mib(peak_uploads - idle),
        "peak_until_jobs_done_mib": common.mib(peak_jobs),
        "delta_until_jobs_done_mib": common.mib(peak_jobs - idle),
        "jobs_drained_after_s": drained,
        "rss_samples": samples,
    }


# -- report --------------------------------------------------------------------------------------


def tables(report: dict[str, Any]) -> list[str]:
    out = []
    if report.get("throughput"):
        rows = [
            [
                r["config"],
                r["uploads"],
                r["uploads_per_s"],
                r["latency_ms"]["p50"],
                r["latency_ms"]["p95"],
                r["latency_ms"]["p99"],
                r["errors"],
                r["client_cpu_pct_of_one_core"],
                r["server_cpu_pct_of_one_core"],
                r["server_cpu_ms_per_upload"],
                r["jobs_queued_or_running_after"],
            ]
            for r in report["throughput"]
        ]
        out.append(
            f"Uploads of the 4 largest corpus photos, c={report['concurrency']}, "
            f"{report['count']} measured after {report['warmup']} warm-up\n\n"
            + common.markdown_table(
                [
                    "config",
                    "uploads",
                    "uploads/s",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "errors",
                    "client CPU %",
                    "server CPU %",
                    "server CPU ms/upload",
                    "jobs left",
                ],
                rows,
            )
        )
    if report.get("slow_callbacks"):
        rows = [
            [
                r["config"],
                r["uploads_per_s"],
                r["latency_ms"]["p99"],
                r["errors"],
                r["slow_callbacks"]["count"],
                r["slow_callbacks"]["max_ms"],
            ]
            for r in report["slow_callbacks"]
        ]
        text = "Event loop with SLOW_CALLBACK_MS=20 (asyncio debug mode), same load\n\n"
        text += common.markdown_table(
            ["config", "uploads/s", "p99 ms", "errors", "callbacks > 20 ms", "max ms"], rows
        )
        for r in report["slow_callbacks"]:
            for line in r["slow_callbacks"]["slowest"][:3]:
                text += f"\n- {r['config']}: {line[:300]}"
        out.append(text)
    if report.get("memory"):
        rows = [
            [
                r["variant"],
                f"{r['concurrent']} x {r['body_mib']} MiB x {r['rounds']}",
                " ".join(f"{k}:{v}" for k, v in r["statuses"].items()),
                r["idle_mib"],
                r["peak_uploading_mib"],
                r["delta_uploading_mib"],
                r["peak_until_jobs_done_mib"],
                r["delta_until_jobs_done_mib"],
            ]
            for r in report["memory"]
        ]
        out.append(
            "API RSS (process group, VmRSS every 20 ms), default configuration\n\n"
            + common.markdown_table(
                [
                    "variant",
                    "uploads",
                    "statuses",
                    "idle MiB",
                    "peak MiB",
                    "delta MiB",
                    "peak incl. jobs MiB",
                    "delta incl. jobs MiB",
                ],
                rows,
            )
        )
    if report.get("goals"):
        out.append(
            "Goals\n\n"
            + common.markdown_table(["goal", "measured", "met"], [list(g) for g in report["goals"]])
        )
    return out


def goals(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    out = []
    for r in report.get("throughput", []):
        out.append(
            (
                f"{r['config']}: >= {GOAL_UPLOADS_PER_S} uploads/s, p99 <= {GOAL_P99_MS} ms, "
                "0 errors",
                f"{r['uploads_per_s']}/s, p99 {r['latency_ms']['p99']} ms, {r['errors']} errors",
                r["uploads_per_s"] >= GOAL_UPLOADS_PER_S
                and r["latency_ms"]["p99"] <= GOAL_P99_MS
                and r["errors"] == 0,
            )
        )
    runs = report.get("throughput", [])
    by_mode: dict[str, list[float]] = {}
    cpu_by_mode: dict[str, list[float]] = {}
    for r in runs:
        by_mode.setdefault(r["auth"], []).append(r["uploads_per_s"])
        cpu_by_mode.setdefault(r["auth"], []).append(r["server_cpu_ms_per_upload"])
    if {"open", "keys"} <= set(by_mode):
        # Server CPU per upload: what keys add, less exposed to a shared machine's drift than
        # uploads/s.
        open_cpu = sum(cpu_by_mode["open"]) / len(cpu_by_mode["open"])
        keys_cpu = sum(cpu_by_mode["keys"]) / len(cpu_by_mode["keys"])
        out.append(
            (
                "keys mode server CPU per upload within 5% of open mode",
                f"keys {keys_cpu:.1f} ms, open {open_cpu:.1f} ms: {keys_cpu / open_cpu:.3f}x",
                keys_cpu <= 1.05 * open_cpu,
            )
        )
        # Issue 10: checking a key (cached, no database round trip) costs under 5%.
        open_rate = sum(by_mode["open"]) / len(by_mode["open"])
        keys_rate = sum(by_mode["keys"]) / len(by_mode["keys"])
        out.append(
            (
                "keys mode within 5% of open mode (mean uploads/s)",
                f"keys {keys_rate:.1f}/s, open {open_rate:.1f}/s: {keys_rate / open_rate:.3f}x",
                keys_rate >= 0.95 * open_rate,
            )
        )
    for r in report.get("slow_callbacks", []):
        s = r["slow_callbacks"]
        out.append(
            (
                f"{r['config']}: no event-loop callback over {GOAL_SLOW_CALLBACK_MS} ms",
                f"{s['count']} over, max {s['max_ms']} ms",
                s["count"] == 0,
            )
        )
    for r in report.get("memory", []):
        out.append(
            (
                f"RSS {r['variant']}: peak <= idle + {GOAL_RSS_DELTA_MIB} MiB",
                f"+{r['delta_uploading_mib']} MiB (+{r['delta_until_jobs_done_mib']} incl. jobs)",
                r["delta_uploading_mib"] <= GOAL_RSS_DELTA_MIB,
            )
        )
    return out


def parse_configs(text: str) -> list[tuple[str, int]]:
    configs = []
    for item in text.split(","):
        mode, _, workers = item.strip().partition(":")
        if mode not in ("inline", "off") or not workers.isdigit():
            raise argparse.ArgumentTypeError(f"bad config {item!r}: use inline:1,off:2,...")
        configs.append((mode, int(workers)))
    return configs


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    photos = common.largest_photos(4)
    report: dict[str, Any] = {
        "benchmark": "uploads",
        "environment": common.environment(),
        "photos": [{"file": p.name, "bytes": p.stat().st_size} for p in photos],
        "unique_bytes": UNIQUE_BYTES,
        "client": "httpx.AsyncClient on uvloop, keep-alive pool of --concurrency connections",
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "count": args.count,
    }
    runs: list[tuple[str, Callable[[], Any]]] = []
    for mode, workers in args.configs:
        if "throughput" in args.parts:
            # Open and keys mode alternate, so that drift of a shared machine hits both alike.
            for _ in range(args.rounds):
                for auth in args.auth:
                    runs.append(
                        (
                            "throughput",
                            lambda m=mode, w=workers, a=auth: run_load(args, w, m, 0, a),
                        )
                    )
        if "slow" in args.parts:
            runs.append(
                (
                    "slow_callbacks",
                    lambda m=mode, w=workers: run_load(args, w, m, GOAL_SLOW_CALLBACK_MS),
                )
            )
    if "memory" in args.parts:
        for variant in ("valid", "garbage"):
            runs.append(("memory", lambda v=variant: memory_variant(args, v)))
    for key, run in runs:
        result = await run()
        report.setdefault(key, []).append(result)
        print(f"  {key}: {result.get('config', result.get('variant'))} done", file=sys.stderr)
    report["goals"] = goals(report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--count", type=int, default=1000, help="measured uploads per config")
    parser.add_argument("--warmup", type=int, default=96, help="uploads before measuring")
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs("inline:1,inline:2,off:1,off:2"),
        help="WORKER:server-processes pairs (default inline:1,inline:2,off:1,off:2)",
    )
    parser.add_argument(
        "--parts",
        default="throughput,slow,memory",
        help="any of throughput, slow, memory (comma-separated)",
    )
    parser.add_argument(
        "--auth",
        default="open",
        help="AUTH modes to measure (comma-separated: open,keys compares the cost of keys)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="throughput runs per config and mode")
    parser.add_argument("--rss-concurrency", type=int, default=16)
    parser.add_argument("--rss-rounds", type=int, default=2)
    parser.add_argument(
        "--workdir", type=Path, help="where the servers' databases and media go (default: /tmp)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    args.auth = [a.strip() for a in args.auth.split(",") if a.strip()]
    if set(args.auth) - {"open", "keys"}:
        parser.error("--auth takes open and/or keys")
    unknown = args.parts - {"throughput", "slow", "memory"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    try:
        import uvloop

        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    report = runner(main_async(args))
    common.emit(report, tables(report), args.json_out)


if __name__ == "__main__":
    main()
