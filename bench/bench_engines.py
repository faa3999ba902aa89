"""Uploads and end to end on the two engine pairs, in one run: SQLite + a local folder beside
PostgreSQL + S3.

Run (~3 minutes on 2 idle cores; under the shared lock when others may be benchmarking):
    flock /tmp/imgapi-bench.lock python bench/bench_engines.py [--uploads N] [--rounds N]
        [--json-out FILE]

Servers: a private PostgreSQL cluster (Debian's postgresql: initdb + pg_ctl on a free port, fsync
on, as a real one) and moto's standalone S3 server (`moto[server]`, in-memory, one Python process
on this machine: a real S3 or MinIO is a network away and answers differently), both started by
tests/services.py's helpers and removed after. The API is one `python imgapi.py` (WORKER=inline:
it runs its thumbnail and EXIF jobs too, no Redis, captions off), restarted per engine pair on a
fresh database and bucket.

Parts, each engine pair in turn, --rounds times interleaved:
- uploads: --uploads distinct 1600x1200 JPEGs (~350 kB, Pillow noise), --concurrency at a time
  over keep-alive connections; uploads/s and latency p50/p95/p99 of the 201.
- end to end: --e2e images, one at a time: from the start of the upload to the small thumbnail's
  bytes received, through `GET /api/images/{id}?wait=30` (woken by the image.ready event) and
  `GET .../thumbnails/small`; p50/p95.
CPU per upload during the uploads part: the API's process group, and moto's server, which shares
the two cores with it (a real object store would run elsewhere).

Prints JSON, then markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

import httpx  # noqa: E402
import procs  # noqa: E402  (tests/procs.py: real API processes)
import services  # noqa: E402  (tests/services.py: the PostgreSQL cluster and moto's S3)
from PIL import Image  # noqa: E402

ENGINES = ("sqlite+local", "postgresql+s3")


def photo(seed: int, size: tuple[int, int] = (1600, 1200)) -> bytes:
    rng = random.Random(seed)
    small = Image.frombytes(
        "RGB", (size[0] // 16, size[1] // 16), rng.randbytes(size[0] * size[1] * 3 // 256)
    )
    out = io.BytesIO()
    small.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


async def upload(client: httpx.AsyncClient, url: str, data: bytes, name: str) -> tuple[float, str]:
    started = time.perf_counter()
    res = await client.post(
        f"{url}/api/images", files={"file": (name, data, "image/jpeg")}, timeout=120
    )
    if res.status_code != 201:
        raise RuntimeError(f"upload answered {res.status_code}: {res.text[:300]}")
    return time.perf_counter() - started, res.json()["data"]["image_id"]


async def uploads_part(
    url: str, bodies: list[bytes], concurrency: int, pgid: int, moto_pid: int | None = None
) -> dict:
    latencies: list[float] = []
    queue = list(enumerate(bodies))
    moto = [moto_pid] if moto_pid else []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        cpu_before = common.cpu_seconds(common.group_pids(pgid))
        moto_before = common.cpu_seconds(moto)
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                i, data = queue.pop()
                seconds, _ = await upload(client, url, data, f"u{i}.jpg")
                latencies.append(seconds)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = common.cpu_seconds(common.group_pids(pgid)) - cpu_before
        moto_cpu = common.cpu_seconds(moto) - moto_before
    return {
        "uploads": len(latencies),
        "uploads_per_s": round(len(latencies) / wall, 1),
        "latency_ms": common.latency_ms(latencies),
        "api_cpu_ms_per_upload": round(cpu * 1000 / len(latencies), 1),
        "moto_cpu_ms_per_upload": round(moto_cpu * 1000 / len(latencies), 1),
    }


async def e2e_part(url: str, bodies: list[bytes]) -> dict:
    times: list[float] = []
    async with httpx.AsyncClient() as client:
        for i, data in enumerate(bodies):
            started = time.perf_counter()
            _, image_id = await upload(client, url, data, f"e{i}.jpg")
            res = await client.get(f"{url}/api/images/{image_id}?wait=30", timeout=60)
            if not res.json()["data"]["ready"]:
                raise RuntimeError(f"{image_id} not ready within 30 s")
            res = await client.get(f"{url}/api/images/{image_id}/thumbnails/small", timeout=60)
            if res.status_code != 200 or not res.content:
                raise RuntimeError(f"thumbnail answered {res.status_code}")
            times.append(time.perf_counter() - started)
    return {"images": len(times), "latency_ms": common.latency_ms(times)}


async def one_round(
    engine: str, args: argparse.Namespace, workdir: Path, pg: Any, s3: Any, round_no: int
) -> dict:
    root = workdir / f"{engine}-{round_no}"
    extra: dict[str, str] = {}
    if engine == "postgresql+s3":
        name = services.name_for(root, "bench")
        extra = {
            "DATABASE_URL": pg.create_database(name),
            **s3.settings(s3.create_bucket(name)),
        }
    env = procs.settings_for(root, **extra)
    api = procs.start_api(env, root / "api.log")
    try:
        seed = round_no * 100_000 + (0 if engine == ENGINES[0] else 50_000)
        warm = [photo(seed + i) for i in range(8)]
        await uploads_part(api.url, warm, 4, api.pid)
        bodies = [photo(seed + 100 + i) for i in range(args.uploads)]
        up = await uploads_part(
            api.url, bodies, args.concurrency, api.pid, s3.popen.pid if extra else None
        )
        e2e = await e2e_part(api.url, [photo(seed + 20_000 + i) for i in range(args.e2e)])
    finally:
        api.stop()
    return {"engine": engine, "round": round_no, "uploads": up, "end_to_end": e2e}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="imgapi-bench-engines-"))
    pg_root = Path(tempfile.mkdtemp(prefix="imgapi-bench-pg-"))
    pg = services.start_postgres(pg_root, fsync=True)
    s3 = services.start_s3_server(workdir / "moto.log")
    try:
        runs = []
        for round_no in range(args.rounds):
            order = ENGINES if round_no % 2 == 0 else ENGINES[::-1]
            for engine in order:
                runs.append(await one_round(engine, args, workdir, pg, s3, round_no))
                print(f"done: {engine} round {round_no}", file=sys.stderr)
    finally:
        services.stop_s3_server(s3)
        pg.stop("fast")
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "environment": common.environment(),
        "settings": vars(args) | {"json_out": str(args.json_out) if args.json_out else None},
        "runs": runs,
    }


def tables(report: dict[str, Any]) -> list[str]:
    rows = []
    for run in report["runs"]:
        up, e2e = run["uploads"], run["end_to_end"]
        rows.append(
            [
                run["engine"],
                run["round"],
                up["uploads_per_s"],
                up["latency_ms"]["p50"],
                up["latency_ms"]["p99"],
                up["api_cpu_ms_per_upload"],
                up["moto_cpu_ms_per_upload"],
                e2e["latency_ms"]["p50"],
                e2e["latency_ms"]["p95"],
            ]
        )
    headers = [
        "engines",
        "round",
        "uploads/s",
        "upload p50 ms",
        "upload p99 ms",
        "API CPU ms/upload",
        "moto CPU ms/upload",
        "e2e p50 ms",
        "e2e p95 ms",
    ]
    return [common.markdown_table(headers, rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=200, help="measured uploads per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--e2e", type=int, default=30, help="end-to-end images per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("IMGAPI_SCALE_REQUIRED", "1")
    report = asyncio.run(main_async(args))
    common.emit(report, tables(report), args.json_out)


if __name__ == "__main__":
    main()
