"""Listing speed: `GET /api/images?limit=100` on a database of 100,000 uploads and of 1,000.

Run: flock /tmp/imgapi-bench.lock python bench/bench_list.py [--sizes 100000,1000] [--json-out F]

Each size gets a fresh database, seeded in one transaction with direct sqlite3 bulk inserts after
the app's own migrations made the schema: ~10% failed uploads (images + stats rows with the
error), the rest with a metadata row (dimensions, size and the exif_json that the EXIF job stores
for a real corpus photo, a caption), images, stats and 3 jobs rows (done), ~3% of the successes
being repeat uploads of earlier bytes. Then `python imgapi.py` starts on it, and one keep-alive
client times --requests sequential requests (after --warmup) for each query: the newest page,
?status=failed, and a page behind a cursor half-way down the list. Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

import procs  # noqa: E402  (tests/procs.py: real API processes)

from imgapi_core import records  # noqa: E402
from imgapi_core.store import JOB_KINDS  # noqa: E402
from imgapi_core.store.sqlite import SqliteStore as Store  # noqa: E402

GOAL_P50_MS = 10.0
FAILED_SHARE = 0.10
REPEAT_SHARE = 0.03
ERRORS = (
    'file type ".xlsx" is not allowed (allowed: .jpeg, .jpg, .png)',
    "image data is truncated or corrupt: image file is truncated (12 bytes not processed)",
    "file is larger than the limit of 50000000 bytes",
    "image header is corrupt: cannot identify image file",
)
CAPTIONS = (
    "a man riding a bike down a street",
    "a view of a city from a hill",
    "a close up of a plate of food",
    "a dog sitting on a couch",
)


# -- seeding -------------------------------------------------------------------------------------


def sample_photos() -> list[dict[str, Any]]:
    """Camera photos of the corpus with what the upload and the EXIF job store for each."""
    from imgapi_core import imaging

    out = []
    for row in common.manifest("photos"):
        if row["expected"] != "valid" or not row["file"].endswith(".jpg"):
            continue
        path = common.CORPUS / "photos" / row["file"]
        # Exactly what jobs.Runtime stores for this photo.
        exif_json = json.dumps(imaging.extract_exif(str(path)), allow_nan=False, sort_keys=True)
        if len(exif_json) < 500:
            continue  # keep the camera photos, with real EXIF (make, model, exposure, GPS ...)
        info = imaging.validate_image(path, 10**9)
        out.append(
            {
                "name": row["file"],
                "width": info.width,
                "height": info.height,
                "size_bytes": int(row["bytes"]),
                "exif_json": exif_json,
            }
        )
    return out


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seed(db_path: Path, media: Path, count: int, photos: list[dict[str, Any]]) -> dict[str, int]:
    """`count` uploads over the last 30 days, in one transaction; returns row counts."""
    asyncio.run(_migrate(db_path))
    rng = random.Random(count)
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / count
    images, stats, metadata, jobs = [], [], [], []
    shas: list[str] = []
    for n in range(count):
        processed = start + step * n + timedelta(milliseconds=rng.randint(0, 50))
        at = iso(processed)
        image_id = secrets.token_hex(12)
        photo = photos[n % len(photos)]
        began = iso(processed - timedelta(milliseconds=rng.randint(20, 400)))
        if rng.random() < FAILED_SHARE:
            name = photo["name"].replace(".jpg", rng.choice((".xlsx", ".jpg", ".png")))
            images.append((image_id, name, at, None, None, rng.choice(ERRORS)))
            stats.append((image_id, began, at, 0))
            continue
        if shas and rng.random() < REPEAT_SHARE:
            sha = rng.choice(shas)  # the same bytes again: metadata and jobs are shared
        else:
            sha = hashlib.sha256(f"{count}:{n}".encode()).hexdigest()
            shas.append(sha)
            metadata.append(
                (
                    sha,
                    photo["width"],
                    photo["height"],
                    "jpeg",
                    photo["size_bytes"],
                    at,
                    photo["exif_json"],
                    rng.choice(CAPTIONS),
                )
            )
            done = iso(processed + timedelta(milliseconds=rng.randint(300, 3000)))
            for kind in JOB_KINDS:
                jobs.append((sha, kind, "done", 1, None, at, done, at, done, 0, None, None))
        path = f"originals/{image_id}.jpg"  # a storage key
        images.append((image_id, photo["name"], at, path, sha, None))
        end = iso(processed + timedelta(milliseconds=rng.randint(300, 3000)))
        stats.append((image_id, began, end, 1))

    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO metadata VALUES (?, ?, ?, ?, ?, ?, ?, ?)", metadata)
        conn.executemany(
            "INSERT INTO images (image_id, original_name, processed_at, image_path,"
            " metadata_sha256, error) VALUES (?, ?, ?, ?, ?, ?)",
            images,
        )
        conn.executemany(
            "INSERT INTO stats (image_id, start_time, end_time, status) VALUES (?, ?, ?, ?)",
            stats,
        )
        conn.executemany(
            "INSERT INTO jobs (sha256, kind, state, attempts, error, created_at, updated_at,"
            " started_at, finished_at, run_after, lease_until, runner)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            jobs,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return {
        "images": len(images),
        "metadata": len(metadata),
        "stats": len(stats),
        "jobs": len(jobs),
    }


async def _migrate(db_path: Path) -> None:
    store = await Store(db_path).open()
    await store.close()


def cursor_at(db_path: Path, offset: int) -> str:
    """The cursor a client holds after reading `offset` records of the newest-first list."""
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute(
            "SELECT processed_at, image_id FROM images"
            " ORDER BY processed_at DESC, image_id DESC LIMIT 1 OFFSET ?",
            (offset - 1,),
        ).fetchone()
    finally:
        conn.close()
    return records.encode_cursor(row[0], row[1])


# -- timing --------------------------------------------------------------------------------------


def timed_requests(url: str, path: str, warmup: int, requests: int) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    latencies: list[float] = []
    sizes: set[int] = set()
    items = -1
    link = False
    try:
        for n in range(warmup + requests):
            started = time.perf_counter()
            conn.request("GET", path)
            res = conn.getresponse()
            body = res.read()
            elapsed = time.perf_counter() - started
            if res.status != 200:
                raise RuntimeError(f"GET {path}: {res.status} {body[:300]!r}")
            if n >= warmup:
                latencies.append(elapsed)
            if n == 0:
                items = len(json.loads(body))
                link = res.getheader("link") is not None
            sizes.add(len(body))
    finally:
        conn.close()
    return {
        "path": path,
        "requests": requests,
        "items": items,
        "next_link": link,
        "response_kib": round(max(sizes) / 1024, 1),
        "latency_ms": common.latency_ms(latencies),
    }


def run_size(args: argparse.Namespace, count: int, photos: list[dict[str, Any]]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"imgapi-bench-list-{count}-", dir=args.workdir))
    try:
        settings = common.service_settings(workdir)
        db_path = Path(settings["DB_PATH"])
        started = time.perf_counter()
        rows = seed(db_path, Path(settings["MEDIA_DIR"]), count, photos)
        seed_s = time.perf_counter() - started
        queries = {
            "newest": "/api/images?limit=100",
            "status=failed": "/api/images?limit=100&status=failed",
            f"cursor at {count // 2}": "/api/images?limit=100&cursor="
            + cursor_at(db_path, count // 2),
        }
        proc = procs.start_api(settings, workdir / "api.log", workers=1, ready_within=120)
        try:
            results = {
                name: timed_requests(proc.url, path, args.warmup, args.requests)
                for name, path in queries.items()
            }
        finally:
            proc.stop()
        return {
            "records": count,
            "rows": rows,
            "db_mib": common.mib(db_path.stat().st_size),
            "seed_seconds": round(seed_s, 1),
            "queries": results,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def table(report: dict[str, Any]) -> str:
    rows = []
    for size in report["sizes"]:
        for name, q in size["queries"].items():
            lat = q["latency_ms"]
            rows.append(
                [
                    f"{size['records']:,}",
                    name,
                    q["items"],
                    q["response_kib"],
                    lat["p50"],
                    lat["p95"],
                    lat["p99"],
                    lat["p50"] <= GOAL_P50_MS,
                ]
            )
    return (
        f"GET /api/images?limit=100, {report['requests']} sequential requests after "
        f"{report['warmup']} warm-up, one keep-alive connection\n\n"
        + common.markdown_table(
            [
                "records",
                "query",
                "items",
                "KiB",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                f"p50 <= {GOAL_P50_MS:g} ms",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000", help="database sizes (records)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workdir", type=Path, help="where the databases go (default: /tmp)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]

    photos = sample_photos()
    report: dict[str, Any] = {
        "benchmark": "list",
        "environment": common.environment(),
        "requests": args.requests,
        "warmup": args.warmup,
        "seed": {
            "failed_share": FAILED_SHARE,
            "repeat_upload_share": REPEAT_SHARE,
            "exif_from": [p["name"] for p in photos],
        },
        "sizes": [],
    }
    for count in sizes:
        report["sizes"].append(run_size(args, count, photos))
        print(f"  {count} records done", file=sys.stderr)
    report["goals"] = [
        (
            f"{size['records']} records, {name}: p50 <= {GOAL_P50_MS:g} ms",
            q["latency_ms"]["p50"],
            q["latency_ms"]["p50"] <= GOAL_P50_MS,
        )
        for size in report["sizes"]
        for name, q in size["queries"].items()
    ]
    common.emit(report, [table(report)], args.json_out)


if __name__ == "__main__":
    main()
