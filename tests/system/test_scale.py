"""The scale-out engines with real processes: PostgreSQL (the session's private cluster), moto's S3
server and Redis. Two API processes on different data folders share one database, one bucket and
one queue; PostgreSQL restarted during uploads; the object store down during uploads;
`migrate-store` from SQLite + a local folder, interrupted and run again."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import seeded_jpeg
from procs import (
    REPO,
    Proc,
    RedisServer,
    free_port,
    run_command,
    service_env,
    settings_for,
    start_api,
    start_worker,
    wait_until,
)
from services import (
    PostgresServer,
    S3Server,
    name_for,
    start_s3_server,
    stop_s3_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis]

WITHIN_S = 60


def upload(url: str, data: bytes, name: str = "photo.jpg") -> httpx.Response:
    return httpx.post(
        f"{url}/api/images", files={"file": (name, data, "image/jpeg")}, timeout=WITHIN_S
    )


def bucket_keys(s3: S3Server, bucket: str) -> set[str]:
    client = s3.client()
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def ready(url: str, image_id: str) -> bool:
    res = httpx.get(f"{url}/api/images/{image_id}", timeout=WITHIN_S)
    return res.status_code == 200 and res.json()["data"]["ready"]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for proc in procs:
        proc.kill()


def scale_env(
    root: Path, database_url: str, s3: S3Server, bucket: str, **extra: str
) -> dict[str, str]:
    return settings_for(root, DATABASE_URL=database_url, **s3.settings(bucket), **extra)


# -- two API hosts, one database, one bucket, one queue ------------------------------------------


def test_two_api_processes_on_different_folders_share_one_postgresql_bucket_and_queue(
    tmp_path: Path,
    postgres_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    private_redis: RedisServer,
    started: list[Proc],
) -> None:
    queue = f"imgapi-test:{tmp_path.name}"
    shared = {"REDIS_URL": private_redis.url, "ARQ_QUEUE": queue, "WORKER": "off"}
    a_env = scale_env(tmp_path / "a", postgres_url, s3_server, s3_bucket, **shared)
    b_env = scale_env(tmp_path / "b", postgres_url, s3_server, s3_bucket, **shared)
    a = start_api(a_env, tmp_path / "a.log")
    started.append(a)
    b = start_api(b_env, tmp_path / "b.log", workers=2)
    started.append(b)
    started.append(start_worker(a_env, tmp_path / "worker.log"))

    # B waits on an image that A stores: the wake-up crosses processes through the database.
    photos = [seeded_jpeg(i) for i in range(6)]
    ids = []
    for i, data in enumerate(photos):
        res = upload((a, b)[i % 2].url, data, f"p{i}.jpg")
        assert res.status_code == 201, res.text
        ids.append(res.json()["data"]["image_id"])
    for image_id in ids:
        res = httpx.get(f"{b.url}/api/images/{image_id}?wait=30", timeout=WITHIN_S)
        assert res.status_code == 200, res.text
        assert res.json()["data"]["ready"], res.text

    # Either host serves any image's bytes and thumbnails, from the bucket.
    for image_id, data in zip(ids, photos, strict=True):
        for host in (a, b):
            res = httpx.get(f"{host.url}/api/images/{image_id}/original", timeout=WITHIN_S)
            assert res.status_code == 200 and res.content == data
            res = httpx.get(f"{host.url}/api/images/{image_id}/thumbnails/small", timeout=30)
            assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    listed = httpx.get(f"{a.url}/api/images?limit=100", timeout=WITHIN_S).json()
    assert {r["data"]["image_id"] for r in listed} >= set(ids)
    # Nothing of the media is on either host's disk: only temp folders.
    for root in (tmp_path / "a", tmp_path / "b"):
        assert not list((root / "media").glob("originals/*"))
    keys = bucket_keys(s3_server, s3_bucket)
    assert sum(1 for k in keys if "/originals/" in k) == len(ids)

    # A delete through B removes the objects; A answers 404 at once.
    res = httpx.delete(f"{b.url}/api/images/{ids[0]}", timeout=WITHIN_S)
    assert res.status_code in (200, 204), res.text
    assert httpx.get(f"{a.url}/api/images/{ids[0]}", timeout=WITHIN_S).status_code == 404
    sha = hashlib.sha256(photos[0]).hexdigest()
    assert not any(sha in k for k in bucket_keys(s3_server, s3_bucket))
    for proc in started:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


# -- PostgreSQL restarted during uploads ---------------------------------------------------------


def test_postgresql_restarted_during_50_uploads_loses_none(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    started: list[Proc],
) -> None:
    # A job whose end could not be written waits out its lease: a short one keeps the test short.
    env = scale_env(tmp_path, postgres_url, s3_server, s3_bucket, JOB_LEASE_SECONDS="6")
    api = start_api(env, tmp_path / "api.log")
    started.append(api)
    photos = [seeded_jpeg(100 + i) for i in range(50)]

    def send(i: int) -> tuple[int, httpx.Response]:
        time.sleep(i * 0.05)
        return i, upload(api.url, photos[i], f"p{i}.jpg")

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, i) for i in range(50)]
            time.sleep(0.6)  # some uploads done, most still to come
            postgres_server.stop("fast")
            time.sleep(1.5)
            postgres_server.start()
            answers = [f.result() for f in futures]
    finally:
        if postgres_server.pg_ctl("status").returncode != 0:  # not running: the next tests need it
            postgres_server.start()

    stored = {}
    for i, res in answers:
        assert res.status_code in (201, 503), (i, res.status_code, res.text)
        body = res.json()
        if res.status_code == 503:
            assert body["status"] == "failed" and "unavailable" in body["error"]
            assert res.headers["retry-after"]
        else:
            stored[i] = body["data"]["image_id"]
    assert stored, "no upload got through"

    # None lost: every 201 has its record and its original; every job finishes after.
    def all_ready() -> bool:
        return all(ready(api.url, image_id) for image_id in stored.values())

    wait_until(all_ready, WITHIN_S, "every stored upload ready after the restart")
    for i, image_id in stored.items():
        res = httpx.get(f"{api.url}/api/images/{image_id}/original", timeout=WITHIN_S)
        assert res.status_code == 200 and res.content == photos[i]
    # And the service goes on.
    res = upload(api.url, seeded_jpeg(999))
    assert res.status_code == 201, res.text
    assert "Traceback" not in api.output(), api.output()[-3000:]


# -- the object store down during uploads ---------------------------------------------------------


def test_the_object_store_down_answers_503_and_records_no_success_without_its_object(
    tmp_path: Path, postgres_url: str, started: list[Proc]
) -> None:
    port = free_port()
    s3 = start_s3_server(tmp_path / "moto.log", port)
    try:
        bucket = s3.create_bucket(name_for(tmp_path, "b"))
        api = start_api(scale_env(tmp_path, postgres_url, s3, bucket), tmp_path / "api.log")
        started.append(api)
        res = upload(api.url, seeded_jpeg(1))
        assert res.status_code == 201, res.text
        stop_s3_server(s3)

        failed = upload(api.url, seeded_jpeg(2), "down.jpg")
        assert failed.status_code == 503, failed.text
        assert failed.headers["retry-after"] == "2"
        body = failed.json()
        assert body["status"] == "failed" and "media storage is unavailable" in body["error"]
        # Recorded as the failure it is, never as a success without its object.
        listed = httpx.get(f"{api.url}/api/images?limit=100", timeout=WITHIN_S).json()
        states = sorted((r["data"]["original_name"], r["status"]) for r in listed)
        assert states == [("down.jpg", "failed"), ("photo.jpg", "success")]
        # A read of an object answers 503 too, not 500 or 404.
        first = res.json()["data"]["image_id"]
        down = httpx.get(f"{api.url}/api/images/{first}/original", timeout=WITHIN_S)
        assert down.status_code == 503, down.text
        health = httpx.get(f"{api.url}/healthz", timeout=WITHIN_S)
        assert health.status_code == 503, health.text
        assert health.json()["database"] == "ok"
        # Refused at once, or still retrying when the check's 2 s are up.
        assert health.json()["media"].startswith("error: "), health.text

        # Back (an empty server: moto keeps nothing): uploads work again at once.
        s3 = start_s3_server(tmp_path / "moto.log", port)
        s3.create_bucket(bucket)
        res = upload(api.url, seeded_jpeg(3), "back.jpg")
        assert res.status_code == 201, res.text
        health = httpx.get(f"{api.url}/healthz", timeout=WITHIN_S)
        assert health.status_code == 200 and health.json()["media"] == "ok", health.text
        assert "Traceback" not in api.output(), api.output()[-3000:]
    finally:
        stop_s3_server(s3)


# -- migrate-store ---------------------------------------------------------------------------------


def migrate(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_command(
        [sys.executable, str(REPO / "imgapi.py"), "migrate-store", *args],
        env,
        REPO,
        timeout=timeout,
    )


def test_migrate_store_interrupted_and_rerun_copies_everything_verified(
    tmp_path: Path,
    postgres_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    started: list[Proc],
) -> None:
    # A deployment on SQLite and a local folder, with its jobs done.
    local_env = settings_for(tmp_path / "local")
    api = start_api(local_env, tmp_path / "local.log")
    photos = [seeded_jpeg(200 + i) for i in range(12)]
    ids = []
    for i, data in enumerate(photos):
        res = upload(api.url, data, f"m{i}.jpg")
        assert res.status_code == 201, res.text
        ids.append(res.json()["data"]["image_id"])
    wait_until(lambda: all(ready(api.url, i) for i in ids), WITHIN_S, "jobs done")
    failed = upload(api.url, b"not an image", "bad.jpg")
    assert failed.status_code == 415
    before = httpx.get(f"{api.url}/api/stats", timeout=WITHIN_S).json()
    assert api.stop() == 0

    target_env = {
        **local_env,
        **{k: v for k, v in s3_server.settings(s3_bucket).items() if k != "STORAGE_URL"},
    }
    storage_url = f"s3://{s3_bucket}/moved"
    args = ["--database-to", postgres_url, "--to", storage_url]

    # Interrupted: killed once it has copied some objects.
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "imgapi.py"), "migrate-store", *args],
        cwd=REPO,
        env=service_env(target_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until(
        lambda: (
            any("/moved/" in k for k in bucket_keys(s3_server, s3_bucket))
            or proc.poll() is not None
        ),
        WITHIN_S,
        "the first object copied",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    done = migrate(target_env, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 problems" in done.stdout and "problems" in done.stdout, done.stdout
    again = migrate(target_env, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "originals: 0 copied, 12 already there, 0 problems" in again.stdout, again.stdout

    # The service on the new engines answers as before, with the same bytes.
    moved_env = settings_for(
        tmp_path / "moved",
        DATABASE_URL=postgres_url,
        **{**s3_server.settings(s3_bucket), "STORAGE_URL": storage_url},
    )
    moved = start_api(moved_env, tmp_path / "moved.log")
    started.append(moved)
    after = httpx.get(f"{moved.url}/api/stats", timeout=WITHIN_S).json()
    # The average is computed from the same timestamps by each engine's own date arithmetic
    # (SQLite's julianday is a float of days): equal to the millisecond.
    average = "average_processing_time_seconds"
    assert abs(after.pop(average) - before.pop(average)) <= 0.002
    assert after == before
    for image_id, data in zip(ids, photos, strict=True):
        res = httpx.get(f"{moved.url}/api/images/{image_id}/original", timeout=WITHIN_S)
        assert res.status_code == 200 and res.content == data
        record = httpx.get(f"{moved.url}/api/images/{image_id}", timeout=WITHIN_S).json()
        assert record["data"]["ready"], json.dumps(record)
        res = httpx.get(f"{moved.url}/api/images/{image_id}/thumbnails/small", timeout=30)
        assert res.status_code == 200
    # New uploads get ids past the copied ones, and events go on from the copied ones.
    res = upload(moved.url, seeded_jpeg(300))
    assert res.status_code == 201, res.text
