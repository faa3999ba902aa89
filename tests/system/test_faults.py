"""Faults against real processes: Redis stopped mid-stream, a worker or the API SIGKILLed, and
API plus workers writing the one database at once. Each test starts its own API (tests/procs.py),
arq workers and, where Redis is involved, a private redis-server on a free port that it stops and
starts at will.

Every test runs on both engine pairs (SQLite + a media folder, PostgreSQL + S3): the processes get
the `engines` settings, and the test reads what they stored through db_query and media_view."""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import db_query
import httpx
import media_view
import procs
import pytest
from conftest import corpus_folder
from PIL import ExifTags, Image, ImageDraw
from procs import Proc, RedisServer, start_api, start_worker

from imgapi_core import imaging
from imgapi_core import settings as settings_mod
from imgapi_core.media import thumbnail_key
from imgapi_core.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]

LOCKED = "database is locked"
# What contention between writers looks like on PostgreSQL, were it to reach a client, a job or a
# log: a deadlock, a serialization failure, a lock wait given up, a race on a key, or processes
# that between them ask for more connections than the server has.
PG_CONTENTION = (
    "deadlock detected",
    "could not serialize access",
    "could not obtain lock",
    "lock timeout",
    "duplicate key value",
    "too many clients",
)
OUTAGE_S = 8.0


# -- helpers ------------------------------------------------------------------------------------


def service_env(tmp_path: Path, engines: dict[str, str], **extra: str) -> dict[str, str]:
    """Quick sweeps and short leases, so recovery shows within seconds; info logs to grep. The
    data goes where `engines` says (a SQLite file and media folder under tmp_path by default)."""
    return procs.settings_for(
        tmp_path,
        SWEEP_SECONDS="0.2",
        JOB_LEASE_SECONDS="3",
        LOG_LEVEL="info",
        **engines,
        **extra,
    )


def settings_of(env: dict[str, str]) -> Settings:
    """The Settings the processes started with `env` read, for db_query and media_view."""
    values = dict(env)
    overrides = {}
    # WORKER=off without REDIS_URL is refused by load(); a test that looks only needs the rest.
    if values.get("WORKER", "").strip().lower() == "off" and not values.get("REDIS_URL"):
        overrides["worker"] = values.pop("WORKER").strip().lower()
    return settings_mod.load(env=values, dotenv=None, **overrides)


def engine_name(cfg: Settings) -> str:
    return "postgresql+s3" if cfg.database_url else "sqlite+local"


def count(cfg: Settings, sql: str, params: tuple = ()) -> int:
    return int(db_query.fetch(cfg, sql, params)[0][0])


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


def open_jobs(cfg: Settings) -> int:
    return count(cfg, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")


def job_states(cfg: Settings) -> dict[str, int]:
    """Jobs per state, in one query (a test polls it often)."""
    rows = db_query.fetch(cfg, "SELECT state, count(*) AS n FROM jobs GROUP BY state")
    return {row["state"]: int(row["n"]) for row in rows}


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


def assert_consistent(cfg: Settings) -> None:
    """images, stats, metadata, jobs and the stored originals agree with each other."""
    images = db_query.fetch(cfg, "SELECT * FROM images")
    stats = {r["image_id"]: r for r in db_query.fetch(cfg, "SELECT * FROM stats")}
    metadata = {r["sha256"] for r in db_query.fetch(cfg, "SELECT sha256 FROM metadata")}
    jobs: dict[str, set[str]] = {}
    for row in db_query.fetch(cfg, "SELECT sha256, kind FROM jobs"):
        jobs.setdefault(row["sha256"], set()).add(row["kind"])
    assert set(stats) == {r["image_id"] for r in images}, "images and stats rows differ"
    stored: set[str] = set()
    for row in images:
        ok = row["error"] is None
        assert stats[row["image_id"]]["status"] == int(ok), dict(row)
        if ok:
            assert row["image_path"] and row["metadata_sha256"] in metadata, dict(row)
            assert row["image_path"].startswith("originals/"), "a storage key, not a path"
            stored.add(row["image_path"])
        else:
            assert row["image_path"] is None and row["metadata_sha256"] is None, dict(row)
    assert {r["metadata_sha256"] for r in images if r["error"] is None} == metadata
    assert set(jobs) == metadata, "every stored image has its job rows"
    assert all(kinds == {"thumbnail", "exif", "caption"} for kinds in jobs.values())
    on_store = set(media_view.keys(cfg, "originals/"))
    assert on_store == stored, "the stored originals are exactly the stored records"


def assert_nothing_left_over(cfg: Settings) -> None:
    """No upload temp file, and (on S3) no multipart upload begun and never finished. Called
    once every job is done; on S3 a job reads its original through a local copy in the temp
    folder, removed just after the job's result is written, so the folder gets a moment to empty:
    what was left behind stays, and fails the test all the same."""
    deadline = time.monotonic() + 10
    while (left := media_view.leftovers(cfg)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind: {left}"


def job_copies(cfg: Settings, pid: int) -> list[Path]:
    """The local copies of originals that process `pid` holds for its jobs (S3 only: a job reads
    its original from a temp file named as an upload's, media/s3.py S3Media.local_file)."""
    return sorted(cfg.tmp_dir.glob(f"upload-*-{pid}-*.part")) if cfg.tmp_dir.is_dir() else []


def assert_jobs_done_right(cfg: Settings, make: str | None = "imgapi-test") -> None:
    """Every thumbnail and EXIF job done, to the same result a fresh run gives (the thumbnails
    byte for byte; the EXIF read, with the camera make the photos were given)."""
    rows = db_query.fetch(
        cfg,
        "SELECT m.sha256, m.exif_json, i.image_path"
        " FROM metadata m JOIN images i ON i.metadata_sha256 = m.sha256",
    )
    # One original per stored bytes (images of the same bytes hold the same content).
    originals = {row["sha256"]: row for row in rows}
    states: dict[str, dict[str, str]] = {}
    for job in db_query.fetch(cfg, "SELECT sha256, kind, state FROM jobs"):
        states.setdefault(job["sha256"], {})[job["kind"]] = job["state"]
    assert originals
    with tempfile.TemporaryDirectory(prefix="imgapi-faults-") as scratch:
        for sha256, row in originals.items():
            got = states.get(sha256)
            assert got == {"thumbnail": "done", "exif": "done", "caption": "skipped"}, got
            exif = json.loads(row["exif_json"])
            data = media_view.read(cfg, row["image_path"])
            assert data is not None, f"the original {row['image_path']} is not stored"
            original = Path(scratch) / Path(row["image_path"]).name
            original.write_bytes(data)
            assert exif == imaging.extract_exif(original)
            if make is not None:
                assert exif.get("Make") == make, exif
            fresh = imaging.render_thumbnails(original)
            for size, thumb in fresh.items():
                stored = media_view.read(cfg, thumbnail_key(size, sha256))
                assert stored == thumb, f"{size} thumbnail of {sha256[:12]} differs"
            original.unlink()


# -- Redis stopped during a stream of uploads ---------------------------------------------------


@pytest.mark.redis
def test_redis_outage_during_uploads(
    tmp_path: Path,
    engines: dict[str, str],
    private_redis: RedisServer,
    procs_to_stop: list[Proc],
) -> None:
    """Mode 3 (API WORKER=off + one arq worker): once the worker has run the jobs of the first 10
    uploads, Redis goes away for OUTAGE_S; it comes back, on the same port and empty, after
    upload 40. Every upload is a 201 and every job finishes, to the result a fresh run gives."""
    env = service_env(tmp_path, engines, REDIS_URL=private_redis.url, WORKER="off")
    cfg = settings_of(env)
    api = start_api(env, tmp_path / "api.log")
    procs_to_stop.append(api)
    worker = start_worker(env, tmp_path / "worker.log")
    procs_to_stop.append(worker)

    statuses: list[int] = []
    slowest = 0.0
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for i in range(50):
            if i == 10:
                # The worker is connected and working before Redis goes away.
                wait_until(lambda: open_jobs(cfg) == 0, 60, "the first 10 uploads' jobs")
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
        wait_until(lambda: open_jobs(cfg) == 0, 60, "jobs finished after Redis returned")
        since_back = time.monotonic() - back
        health = http.get("/healthz")

    assert statuses == [201] * 50
    assert health.status_code == 200, health.text
    assert worker.popen.poll() is None, "the worker died:\n" + worker.output()[-3000:]
    assert count(cfg, "SELECT count(*) FROM images WHERE error IS NULL") == 50
    assert_jobs_done_right(cfg)
    assert_consistent(cfg)
    assert_nothing_left_over(cfg)
    figures(
        test="redis_outage",
        engines=engine_name(cfg),
        uploads=50,
        uploads_during_outage=30,
        outage_s=round(back - down, 1),
        slowest_upload_during_outage_s=round(slowest, 3),
        all_jobs_done_after_redis_back_s=round(since_back, 2),
    )


# -- an arq worker SIGKILLed in the middle of jobs -----------------------------------------------


@pytest.mark.redis
def test_worker_killed_mid_jobs(
    tmp_path: Path,
    engines: dict[str, str],
    private_redis: RedisServer,
    procs_to_stop: list[Proc],
) -> None:
    """Mode 3: the only worker is SIGKILLed while it runs a job, with more queued. A new worker
    finishes every job (the killed one's once its lease of JOB_LEASE_SECONDS lapses), each to
    the result a fresh run gives, and nothing the killed worker was writing stays behind (on S3,
    the kill lands while a job holds its local copy of an original)."""
    photos = corpus_folder("photos")
    env = service_env(
        tmp_path, engines, REDIS_URL=private_redis.url, WORKER="off", JOB_CONCURRENCY="2"
    )
    cfg = settings_of(env)
    api = start_api(env, tmp_path / "api.log")
    procs_to_stop.append(api)
    # The largest photos: their jobs take long enough (tens to hundreds of ms each) to be caught.
    files = sorted(photos.glob("*.jpg"), key=lambda p: p.stat().st_size, reverse=True)[:10]
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for path in files:
            res = upload(http, path.read_bytes(), path.name)
            assert res.status_code == 201, res.text

    first = start_worker(env, tmp_path / "worker-1.log")
    procs_to_stop.append(first)
    deadline = time.monotonic() + 60
    # Polled often, one query a time: a thumbnail of these photos runs for 50-250 ms.
    while True:
        states = job_states(cfg)
        holding = not cfg.storage_url or bool(job_copies(cfg, first.pid))
        if states.get("done", 0) >= 4 and states.get("running", 0) > 0 and holding:
            break
        open_now = states.get("queued", 0) + states.get("running", 0)
        assert open_now > 0, "the first worker finished everything before the kill"
        assert time.monotonic() < deadline, "the first worker did not get going within 60 s"
        time.sleep(0.01)
    first.kill()
    copies = job_copies(cfg, first.pid)
    states = job_states(cfg)
    unfinished = states.get("queued", 0) + states.get("running", 0)
    held = states.get("running", 0)
    assert unfinished > 0, "the kill landed after the last job: nothing was interrupted"
    if cfg.storage_url:
        assert copies, "the kill landed while no job held a local copy of its original"

    second = start_worker(env, tmp_path / "worker-2.log")
    procs_to_stop.append(second)
    recovery = wait_until(lambda: open_jobs(cfg) == 0, 60, "every job finished on the new worker")
    rerun = count(cfg, "SELECT count(*) FROM jobs WHERE attempts > 1")

    assert_jobs_done_right(cfg, make=None)
    assert_consistent(cfg)
    figures(
        test="worker_sigkill",
        engines=engine_name(cfg),
        jobs=count(cfg, "SELECT count(*) FROM jobs WHERE kind != 'caption'"),
        unfinished_at_kill=unfinished,
        running_at_kill=held,
        run_again=rerun,
        lease_s=float(env["JOB_LEASE_SECONDS"]),
        all_jobs_done_after_new_worker_start_s=round(recovery, 2),
    )
    # The killed worker's copy of an original (S3) is swept by the next worker's start.
    assert_nothing_left_over(cfg)


# -- the API SIGKILLed mid-upload -----------------------------------------------------------------


def test_api_killed_mid_upload(
    tmp_path: Path, engines: dict[str, str], procs_to_stop: list[Proc]
) -> None:
    """A slow client has streamed over 1 MB of a 6 MB file when the API is SIGKILLed: nothing
    half-written stays, and the temp file it was writing is removed when the API starts again.
    (Uploads are received into a local temp folder on either engine pair.)"""
    env = service_env(tmp_path, engines)
    cfg = settings_of(env)
    api = start_api(env, tmp_path / "api.log")
    procs_to_stop.append(api)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        assert upload(http, make_photo(1), "before.jpg").status_code == 201
    # Its jobs (in-process) done: on S3 they read the original through a temp file of their own,
    # and the only temp file at the kill is to be the upload's.
    wait_until(lambda: open_jobs(cfg) == 0, 30, "the first upload's jobs")
    assert_nothing_left_over(cfg)

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
            temp_files[:] = [p for p in cfg.tmp_dir.glob("*") if p.stat().st_size > 1 << 20]
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
    assert count(cfg, "SELECT count(*) FROM images") == 1
    assert_consistent(cfg)
    # What the killed API left: its temp file, and nothing in storage (no multipart upload).
    assert media_view.leftovers(cfg) == sorted(f"tmp/{p.name}" for p in temp_files)

    # The server process is a child of the killed one: wait until it is reaped, as after a
    # machine's restart (here orphans linger as zombies for about a second).
    wait_until(lambda: not group_alive(api.pid), 20, "the killed API's processes gone")
    began = time.monotonic()
    again = start_api(env, tmp_path / "api-2.log")
    procs_to_stop.append(again)
    restart = time.monotonic() - began
    assert not any(p.exists() for p in temp_files), "leftover temp files were not removed"
    assert_nothing_left_over(cfg)
    with httpx.Client(base_url=again.url, timeout=30) as http:
        assert upload(http, make_photo(2), "after.jpg").status_code == 201
        stats = http.get("/api/stats")
        assert stats.status_code == 200 and stats.json().get("total") == 2, stats.text
    wait_until(lambda: open_jobs(cfg) == 0, 30, "the second upload's jobs")
    assert_consistent(cfg)
    assert_nothing_left_over(cfg)
    figures(
        test="api_sigkill_mid_upload",
        engines=engine_name(cfg),
        bytes_sent_before_kill=sent,
        restart_s=round(restart, 2),
    )


# -- API and workers writing the one database at the same time ----------------------------------


@pytest.mark.redis
def test_no_database_locked_under_concurrent_writers(
    tmp_path: Path,
    engines: dict[str, str],
    private_redis: RedisServer,
    procs_to_stop: list[Proc],
) -> None:
    """Two API server processes and two arq workers write the one database at once (uploads,
    job claims, leases, results; 40 of the 160 uploads repeat another one's bytes) while
    readers list and count: no failed request or job, and no sign of contention reaches a
    client, a job or a log. On SQLite that sign is "database is locked"; on PostgreSQL, a
    deadlock, a serialization failure, a lock wait given up, a race on a key or a server out of
    connections."""
    env = service_env(
        tmp_path, engines, REDIS_URL=private_redis.url, WORKER="off", JOB_CONCURRENCY="8"
    )
    cfg = settings_of(env)
    markers = PG_CONTENTION if cfg.database_url else (LOCKED,)
    api = start_api(env, tmp_path / "api.log", workers=2)
    procs_to_stop.append(api)
    workers = [start_worker(env, tmp_path / f"worker-{n}.log") for n in (1, 2)]
    procs_to_stop.extend(workers)
    uploads = 160

    def contended(text: str) -> list[str]:
        return [marker for marker in markers if marker in text]

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
    wait_until(lambda: open_jobs(cfg) == 0, 90, "every job finished")

    assert all(status < 300 for status, _ in results), [s for s, _ in results if s >= 300]
    assert not any(contended(body) for _, body in results)
    errors = db_query.fetch(
        cfg, "SELECT kind, state, error FROM jobs WHERE error IS NOT NULL AND state != 'skipped'"
    )
    assert not any(contended(r["error"] or "") for r in errors), [dict(r) for r in errors]
    assert count(cfg, "SELECT count(*) FROM jobs WHERE state = 'failed'") == 0
    for proc in (api, *workers):
        assert not contended(proc.output()), (contended(proc.output()), proc.log)
        assert proc.popen.poll() is None, proc.output()[-3000:]
    assert_jobs_done_right(cfg)
    assert_consistent(cfg)
    assert_nothing_left_over(cfg)
    figures(
        test="concurrent_writers",
        engines=engine_name(cfg),
        uploads=uploads,
        api_processes=2,
        arq_workers=2,
        seconds=round(elapsed, 2),
        uploads_per_s=round(uploads / elapsed, 1),
    )
