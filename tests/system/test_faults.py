"""Faults against real processes: Redis stopped mid-stream, a worker or the API SIGKILLed, and
API plus workers writing SQLite at once. Each test starts its own API (tests/procs.py), arq
workers and, where Redis is involved, a private redis-server on a free port that it stops and
starts at will."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import procs
import pytest
from conftest import corpus_folder
from PIL import ExifTags, Image, ImageDraw
from procs import Proc, RedisServer, start_api, start_worker

from imgapi_core import imaging
from imgapi_core.media import thumbnail_key

pytestmark = [pytest.mark.slow]

LOCKED = "database is locked"
OUTAGE_S = 8.0


# -- helpers ------------------------------------------------------------------------------------


def service_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Quick sweeps and short leases, so recovery shows within seconds; info logs to grep."""
    return procs.settings_for(
        tmp_path, SWEEP_SECONDS="0.2", JOB_LEASE_SECONDS="3", LOG_LEVEL="info", **extra
    )


@pytest.fixture
def procs_to_stop() -> Iterator[list[Proc]]:
    """Processes a test started; all are stopped at the end, whatever happened."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def make_photo(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A distinct JPEG per seed, with EXIF (Make, Model) and a GPS position."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x, y = (seed * 53 + i * 97) % size[0], (seed * 29 + i * 61) % size[1]
        draw.rectangle((x, y, x + 80, y + 60), fill=((i * 40) % 256, 200 - i * 20, 50 + i * 30))
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "imgapi-test"
    exif[ExifTags.Base.Model] = f"seed {seed}"
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (48.0, 51.0, 30.24), 3: "E", 4: (2.0, 17.0, 40.2)}
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def upload(http: httpx.Client, data: bytes, name: str) -> httpx.Response:
    return http.post("/api/images", files={"file": (name, data, "image/jpeg")})


def open_jobs(db_path: str) -> int:
    return procs.db_rows(db_path, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")[
        0
    ][0]


def wait_until(check: Callable[[], object], within: float, what: str) -> float:
    """Seconds it took for check() to hold; fails the test at the deadline."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"{what}: not within {within:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - start


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def figures(**values: object) -> None:
    """Measured figures, for docs/reliability.md (shown with pytest -s)."""
    print("RELIABILITY " + json.dumps(values, sort_keys=True))


def assert_consistent(db_path: str, media_dir: Path) -> None:
    """images, stats, metadata, jobs and the files under originals/ agree with each other."""
    with procs.read_only(db_path) as conn:
        images = conn.execute("SELECT * FROM images").fetchall()
        stats = {r["image_id"]: r for r in conn.execute("SELECT * FROM stats")}
        metadata = {r["sha256"] for r in conn.execute("SELECT sha256 FROM metadata")}
        jobs: dict[str, set[str]] = {}
        for row in conn.execute("SELECT sha256, kind FROM jobs"):
            jobs.setdefault(row["sha256"], set()).add(row["kind"])
    assert set(stats) == {r["image_id"] for r in images}, "images and stats rows differ"
    stored: set[str] = set()
    for row in images:
        ok = row["error"] is None
        assert stats[row["image_id"]]["status"] == int(ok), dict(row)
        if ok:
            assert row["image_path"] and row["metadata_sha256"] in metadata, dict(row)
            assert row["image_path"].startswith("originals/"), "a storage key, not a path"
            stored.add(Path(row["image_path"]).name)
        else:
            assert row["image_path"] is None and row["metadata_sha256"] is None, dict(row)
    assert {r["metadata_sha256"] for r in images if r["error"] is None} == metadata
    assert set(jobs) == metadata, "every stored image has its job rows"
    assert all(kinds == {"thumbnail", "exif", "caption"} for kinds in jobs.values())
    on_disk = {p.name for p in (media_dir / "originals").iterdir()}
    assert on_disk == stored, "files under originals/ are exactly the stored records"


def assert_jobs_done_right(db_path: str, media_dir: Path, make: str | None = "imgapi-test") -> None:
    """Every thumbnail and EXIF job done, to the same result a fresh run gives (the thumbnails
    byte for byte; the EXIF read, with the camera make the photos were given)."""
    rows = procs.db_rows(
        db_path,
        "SELECT m.sha256, m.exif_json, i.image_path,"
        " (SELECT group_concat(kind || '=' || state) FROM jobs j WHERE j.sha256 = m.sha256) AS js"
        " FROM metadata m JOIN images i ON i.metadata_sha256 = m.sha256 GROUP BY m.sha256",
    )
    assert rows
    for row in rows:
        states = dict(item.split("=") for item in row["js"].split(","))
        assert states == {"thumbnail": "done", "exif": "done", "caption": "skipped"}, states
        exif = json.loads(row["exif_json"])
        original = media_dir / row["image_path"]
        assert exif == imaging.extract_exif(original)
        if make is not None:
            assert exif.get("Make") == make, exif
        fresh = imaging.render_thumbnails(original)
        for size, data in fresh.items():
            path = media_dir / thumbnail_key(size, row["sha256"])
            assert path.read_bytes() == data, f"{size} thumbnail of {row['sha256'][:12]} differs"


# -- Redis stopped during a stream of uploads ---------------------------------------------------


@pytest.mark.redis
def test_redis_outage_during_uploads(
    tmp_path: Path, private_redis: RedisServer, procs_to_stop: list[Proc]
) -> None:
    """Mode 3 (API WORKER=off + one arq worker): once the worker has run the jobs of the first 10
    uploads, Redis goes away for OUTAGE_S; it comes back, on the same port and empty, after
    upload 40. Every upload is a 201 and every job finishes, to the result a fresh run gives."""
    env = service_env(tmp_path, REDIS_URL=private_redis.url, WORKER="off")
    api = start_api(env, tmp_path / "api.log")
    procs_to_stop.append(api)
    worker = start_worker(env, tmp_path / "worker.log")
    procs_to_stop.append(worker)
    db = env["DB_PATH"]

    statuses: list[int] = []
    slowest = 0.0
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for i in range(50):
            if i == 10:
                # The worker is connected and working before Redis goes away.
                wait_until(lambda: open_jobs(db) == 0, 60, "the first 10 uploads' jobs")
                private_redis.stop()
                down = time.monotonic()
            if i == 40:
                # Down longer than the job lease and arq's health-check interval.
                time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
                private_redis.start()
                back = time.monotonic()
            began = time.monotonic()
            res = upload(http, make_photo(i), f"outage-{i}.jpg")
            if 10 <= i < 40:
                slowest = max(slowest, time.monotonic() - began)
            assert res.status_code == 201, (i, res.status_code, res.text)
            statuses.append(res.status_code)
        wait_until(lambda: open_jobs(db) == 0, 60, "jobs finished after Redis returned")
        since_back = time.monotonic() - back
        health = http.get("/healthz")

    assert statuses == [201] * 50
    assert health.status_code == 200, health.text
    assert worker.popen.poll() is None, "the worker died:\n" + worker.output()[-3000:]
    assert procs.db_rows(db, "SELECT count(*) FROM images WHERE error IS NULL")[0][0] == 50
    assert_jobs_done_right(db, Path(env["MEDIA_DIR"]))
    assert_consistent(db, Path(env["MEDIA_DIR"]))
    figures(
        test="redis_outage",
        uploads=50,
        uploads_during_outage=30,
        outage_s=round(back - down, 1),
        slowest_upload_during_outage_s=round(slowest, 3),
        all_jobs_done_after_redis_back_s=round(since_back, 2),
    )


# -- an arq worker SIGKILLed in the middle of jobs -----------------------------------------------


@pytest.mark.redis
def test_worker_killed_mid_jobs(
    tmp_path: Path, private_redis: RedisServer, procs_to_stop: list[Proc]
) -> None:
    """Mode 3: the only worker is SIGKILLed while it runs a job, with more queued. A new worker
    finishes every job (the killed one's once its lease of JOB_LEASE_SECONDS lapses), each to
    the result a fresh run gives."""
    photos = corpus_folder("photos")
    env = service_env(tmp_path, REDIS_URL=private_redis.url, WORKER="off", JOB_CONCURRENCY="2")
    api = start_api(env, tmp_path / "api.log")
    procs_to_stop.append(api)
    db = env["DB_PATH"]
    # The largest photos: their jobs take long enough (tens to hundreds of ms each) to be caught.
    files = sorted(photos.glob("*.jpg"), key=lambda p: p.stat().st_size, reverse=True)[:10]
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for path in files:
            res = upload(http, path.read_bytes(), path.name)
            assert res.status_code == 201, res.text

    first = start_worker(env, tmp_path / "worker-1.log")
    procs_to_stop.append(first)
    running = "SELECT count(*) FROM jobs WHERE state = 'running'"
    done = "SELECT count(*) FROM jobs WHERE state = 'done'"
    deadline = time.monotonic() + 60
    # Polled often: a thumbnail of these photos runs for 50-250 ms.
    while not (procs.db_rows(db, done)[0][0] >= 4 and procs.db_rows(db, running)[0][0] > 0):
        assert open_jobs(db) > 0, "the first worker finished everything before the kill"
        assert time.monotonic() < deadline, "the first worker did not get going within 60 s"
        time.sleep(0.01)
    first.kill()
    unfinished = open_jobs(db)
    held = procs.db_rows(db, running)[0][0]
    assert unfinished > 0, "the kill landed after the last job: nothing was interrupted"

    second = start_worker(env, tmp_path / "worker-2.log")
    procs_to_stop.append(second)
    recovery = wait_until(lambda: open_jobs(db) == 0, 60, "every job finished on the new worker")
    rerun = procs.db_rows(db, "SELECT count(*) FROM jobs WHERE attempts > 1")[0][0]

    media = Path(env["MEDIA_DIR"])
    assert_jobs_done_right(db, media, make=None)
    assert_consistent(db, media)
    figures(
        test="worker_sigkill",
        jobs=procs.db_rows(db, "SELECT count(*) FROM jobs WHERE kind != 'caption'")[0][0],
        unfinished_at_kill=unfinished,
        running_at_kill=held,
        run_again=rerun,
        lease_s=float(env["JOB_LEASE_SECONDS"]),
        all_jobs_done_after_new_worker_start_s=round(recovery, 2),
    )


# -- the API SIGKILLed mid-upload -----------------------------------------------------------------


def test_api_killed_mid_upload(tmp_path: Path, procs_to_stop: list[Proc]) -> None:
    """A slow client has streamed over 1 MB of a 6 MB file when the API is SIGKILLed: nothing
    half-written stays, and the temp file it was writing is removed when the API starts again."""
    env = service_env(tmp_path)
    media = Path(env["MEDIA_DIR"])
    api = start_api(env, tmp_path / "api.log")
    procs_to_stop.append(api)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        assert upload(http, make_photo(1), "before.jpg").status_code == 201

    boundary = "killboundary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    total = 6_000_000
    port = int(api.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(
            (
                "POST /api/images HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(head) + total + len(boundary) + 8}\r\n\r\n"
            ).encode()
            + head
        )
        sent = 0
        temp_files: list[Path] = []

        def partial_temp_file() -> bool:
            temp_files[:] = [p for p in (media / "tmp").glob("*") if p.stat().st_size > 1 << 20]
            return bool(temp_files)

        deadline = time.monotonic() + 20
        while not partial_temp_file():
            assert time.monotonic() < deadline, "no temp file appeared for the upload"
            sock.sendall(b"\xff" * 65536)
            sent += 65536
            time.sleep(0.05)
        assert sent < total
        api.kill()
    finally:
        sock.close()

    assert temp_files and all(p.exists() for p in temp_files), "the kill left no temp file"
    db = env["DB_PATH"]
    assert procs.db_rows(db, "SELECT count(*) FROM images")[0][0] == 1
    assert_consistent(db, media)

    # The server process is a child of the killed one: wait until it is reaped, as after a
    # machine's restart (here orphans linger as zombies for about a second).
    wait_until(lambda: not group_alive(api.pid), 20, "the killed API's processes gone")
    began = time.monotonic()
    again = start_api(env, tmp_path / "api-2.log")
    procs_to_stop.append(again)
    restart = time.monotonic() - began
    assert not any(p.exists() for p in temp_files), "leftover temp files were not removed"
    assert list((media / "tmp").iterdir()) == []
    with httpx.Client(base_url=again.url, timeout=30) as http:
        assert upload(http, make_photo(2), "after.jpg").status_code == 201
        assert http.get("/api/stats").json()["total"] == 2
    assert_consistent(db, media)
    figures(test="api_sigkill_mid_upload", bytes_sent_before_kill=sent, restart_s=round(restart, 2))


# -- API and workers writing SQLite at the same time ---------------------------------------------


@pytest.mark.redis
def test_no_database_locked_under_concurrent_writers(
    tmp_path: Path, private_redis: RedisServer, procs_to_stop: list[Proc]
) -> None:
    """Two API server processes and two arq workers write the one database at once (uploads,
    job claims, leases, results) while readers list and count: no "database is locked" reaches a
    client, a job or a log."""
    env = service_env(tmp_path, REDIS_URL=private_redis.url, WORKER="off", JOB_CONCURRENCY="8")
    api = start_api(env, tmp_path / "api.log", workers=2)
    procs_to_stop.append(api)
    workers = [start_worker(env, tmp_path / f"worker-{n}.log") for n in (1, 2)]
    procs_to_stop.extend(workers)
    db = env["DB_PATH"]
    uploads = 160

    def one(i: int) -> tuple[int, str]:
        with httpx.Client(base_url=api.url, timeout=60) as http:
            res = upload(http, make_photo(1000 + i % 120, (320, 240)), f"c{i}.jpg")
            listing = http.get("/api/images", params={"limit": 50})
            stats = http.get("/api/stats")
            bodies = res.text + listing.text + stats.text + str(res.headers)
            worst = max(res.status_code, listing.status_code, stats.status_code)
            return worst, bodies

    began = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(uploads)))
    elapsed = time.monotonic() - began
    wait_until(lambda: open_jobs(db) == 0, 90, "every job finished")

    assert all(status < 300 for status, _ in results), [s for s, _ in results if s >= 300]
    assert not any(LOCKED in body for _, body in results)
    errors = procs.db_rows(
        db, "SELECT kind, state, error FROM jobs WHERE error IS NOT NULL AND state != 'skipped'"
    )
    assert not any(LOCKED in (r["error"] or "") for r in errors), [dict(r) for r in errors]
    assert procs.db_rows(db, "SELECT count(*) FROM jobs WHERE state = 'failed'")[0][0] == 0
    for proc in (api, *workers):
        assert LOCKED not in proc.output(), proc.log
        assert proc.popen.poll() is None, proc.output()[-3000:]
    assert_jobs_done_right(db, Path(env["MEDIA_DIR"]))
    assert_consistent(db, Path(env["MEDIA_DIR"]))
    figures(
        test="concurrent_writers",
        uploads=uploads,
        api_processes=2,
        arq_workers=2,
        seconds=round(elapsed, 2),
        uploads_per_s=round(uploads / elapsed, 1),
    )
