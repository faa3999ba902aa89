"""Jobs on arq with a real Redis: mode 2 (the API's own arq worker), mode 3 (the API only
enqueues; separate workers run), and recovery from dead workers and a Redis outage.

Redis: IMGAPI_TEST_REDIS_URL (default redis://127.0.0.1:6379), database 11 unless the URL names
one, a fresh ARQ_QUEUE per test. Tests that stop Redis use a private redis-server. Each test runs
on both engine pairs (SQLite + a folder, PostgreSQL + S3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import media_view
import pytest
import redis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.worker import Worker
from conftest import running_app, wait_for
from job_helpers import (
    SMALL_PHOTO,
    get_record,
    job_rows,
    original_key,
    photo_bytes,
    thumbnail_keys,
    unique_jpeg,
    upload,
    wait_jobs,
)
from procs import RedisServer, start_worker
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import runtime as runtime_mod
from imgapi_core import worker as worker_mod
from imgapi_core.cancelling import bounded, cancel_all
from imgapi_core.dispatch import job_id
from imgapi_core.media import open_media
from imgapi_core.settings import Settings
from imgapi_core.store import open_store

pytestmark = [pytest.mark.redis, pytest.mark.both_engines]

REDIS_DB = 11


def redis_test_url() -> str:
    base = os.environ.get("IMGAPI_TEST_REDIS_URL", "redis://127.0.0.1:6379")
    parts = urllib.parse.urlsplit(base)
    if parts.path in ("", "/"):
        parts = parts._replace(path=f"/{REDIS_DB}")
    return urllib.parse.urlunsplit(parts)


def _unavailable(message: str) -> None:
    if os.environ.get("IMGAPI_REDIS_REQUIRED") == "1":
        pytest.fail(message + " and IMGAPI_REDIS_REQUIRED=1")
    pytest.skip(message)


@dataclass
class ArqSetup:
    url: str
    queue: str
    client: redis.Redis
    shas: set[str] = field(default_factory=set)

    def queued_ids(self) -> set[str]:
        return {member.decode() for member in self.client.zrange(self.queue, 0, -1)}

    def track(self, *shas: str) -> None:
        self.shas.update(shas)

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.queue}*"))
        for sha in self.shas:
            keys += self.client.scan_iter(match=f"arq:*imgapi:*:{sha}")
        if keys:
            self.client.delete(*keys)


@pytest.fixture
def arq_setup() -> Iterator[ArqSetup]:
    url = redis_test_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        _unavailable(f"no Redis answers at {url} ({exc})")
    setup = ArqSetup(url, f"imgapi-test:{uuid.uuid4().hex}", client)
    try:
        yield setup
    finally:
        setup.cleanup()
        client.close()


def arq_settings(make_settings: Callable[..., Settings], setup: ArqSetup, **env: str) -> Settings:
    return make_settings(REDIS_URL=setup.url, ARQ_QUEUE=setup.queue, **env)


@contextlib.asynccontextmanager
async def arq_worker(cfg: Settings, *, burst: bool = False) -> AsyncIterator[Worker]:
    """An arq worker as `arq jobs.WorkerSettings` builds it, in this event loop: worker_options
    without the start-up hooks, and ctx prepared the way worker_startup does (own Store, Runtime).
    With burst=True it has run every queued job by the time the block starts."""
    options = worker_mod.worker_options(cfg)
    for name in ("on_startup", "on_shutdown"):
        options.pop(name)
    options.update(burst=burst, poll_delay=0 if burst else cfg.arq_poll_seconds)
    store = await open_store(cfg)
    media = await open_media(cfg)
    runtime = runtime_mod.Runtime(cfg, store, media)
    worker = Worker(**options, handle_signals=False, ctx={"imgapi": runtime})
    task = asyncio.create_task(worker.main())
    try:
        if burst:
            await asyncio.wait_for(asyncio.shield(task), 120)
        yield worker
    finally:
        await cancel_all([task])
        await bounded(worker.close(), 5.0, "closing the test's arq worker")
        await runtime.close()
        await store.close()


def job_ids(*shas: str, kinds: tuple[str, ...] = ("thumbnail", "exif")) -> set[str]:
    return {job_id(kind, sha) for kind in kinds for sha in shas}


# -- mode 2: REDIS_URL + WORKER=inline --------------------------------------------------------


async def test_mode2_the_apis_own_arq_worker_runs_the_jobs(
    make_settings: Callable[..., Settings], arq_setup: ArqSetup
) -> None:
    cfg = arq_settings(make_settings, arq_setup, WORKER="inline")
    async with running_app(cfg) as app:
        assert app.ctx.jobs.local is None and app.ctx.jobs.queue is not None
        client = SanicASGITestClient(app)
        body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
        sha256 = body["data"]["metadata"]["sha256"]
        arq_setup.track(sha256)
        record = await wait_jobs(client, body["data"]["image_id"], states=("done",))
        assert record["data"]["jobs"]["thumbnail"] == {"state": "done", "attempts": 1}
        assert record["data"]["jobs"]["caption"]["state"] == "skipped"
        assert record["data"]["metadata"]["exif"]["Make"] == "FUJIFILM"
        # Run by arq, not by an in-process table runner (there is none in this mode).
        worker = app.ctx.jobs._worker
        assert worker is not None
        await wait_for(lambda: worker.jobs_complete >= 2)
        _, res = await client.get("/healthz")
        assert res.status == 200 and res.json["redis"] == "ok"
    assert all(media_view.exists(cfg, key) for key in thumbnail_keys(sha256).values())
    # Nothing left in Redis: the queue is empty and finished jobs keep no result.
    assert arq_setup.queued_ids() == set()
    assert not arq_setup.client.exists(*(job_key_prefix + jid for jid in job_ids(sha256)))


# -- mode 3: REDIS_URL + WORKER=off, separate workers -----------------------------------------


async def test_mode3_the_api_only_enqueues_and_a_burst_worker_runs_all(
    make_settings: Callable[..., Settings], arq_setup: ArqSetup
) -> None:
    cfg = arq_settings(make_settings, arq_setup, WORKER="off")
    fine_bytes = unique_jpeg(photo_bytes(SMALL_PHOTO))
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        fine = (await upload(client, fine_bytes))["data"]
        gone = (await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO))))["data"]
        fine_sha, gone_sha = fine["metadata"]["sha256"], gone["metadata"]["sha256"]
        arq_setup.track(fine_sha, gone_sha)
        expected = job_ids(fine_sha, gone_sha)

        # Enqueued after the upload's commit, with deterministic ids; no caption job (captions off).
        await wait_for(lambda: arq_setup.queued_ids() == expected)
        assert expected == {
            f"imgapi:{kind}:{sha}" for kind in ("thumbnail", "exif") for sha in (fine_sha, gone_sha)
        }
        for jid in expected:
            assert arq_setup.client.exists(job_key_prefix + jid)
        assert not arq_setup.client.exists(job_key_prefix + job_id("caption", fine_sha))

        # The same job enqueued again, by hand or by a duplicate upload: still one arq job each.
        assert await app.ctx.jobs.queue.enqueue([("thumbnail", fine_sha), ("exif", fine_sha)]) == 0
        duplicate = (await upload(client, fine_bytes, "again.jpg"))["data"]
        await asyncio.sleep(max(0.5, cfg.sweep_seconds * 3))
        assert arq_setup.queued_ids() == expected
        # Nobody runs jobs in this process.
        for sha in (fine_sha, gone_sha):
            assert {k: r["state"] for k, r in job_rows(cfg, sha).items()} == {
                "thumbnail": "queued",
                "exif": "queued",
                "caption": "skipped",
            }

        media_view.remove(cfg, original_key(cfg, gone["image_id"]))
        async with arq_worker(cfg, burst=True) as worker:
            assert worker.jobs_complete == 4
            assert worker.jobs_failed == 0  # a failed job is recorded, not an arq failure

        for image_id in (fine["image_id"], duplicate["image_id"]):
            record = await get_record(client, image_id)
            assert record["data"]["jobs"]["thumbnail"] == {"state": "done", "attempts": 1}
            assert record["data"]["jobs"]["exif"] == {"state": "done", "attempts": 1}
            assert record["data"]["metadata"]["exif"]["Make"] == "FUJIFILM"
        record = await get_record(client, gone["image_id"])
        for kind in ("thumbnail", "exif"):
            assert record["data"]["jobs"][kind] == {
                "state": "failed",
                "attempts": 1,
                "error": "the original file is gone",
            }
        _, res = await client.get("/api/stats")
        assert res.json["processing"] == 0
        assert res.json["jobs"]["done"] == 2 and res.json["jobs"]["failed"] == 2
    assert arq_setup.queued_ids() == set()


async def test_mode3_with_the_arq_cli_worker(
    make_settings: Callable[..., Settings],
    arq_setup: ArqSetup,
    tmp_path: Path,
    engines: dict[str, str],
) -> None:
    cfg = arq_settings(make_settings, arq_setup, WORKER="off")
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        bodies = [
            (await upload(client, unique_jpeg(photo_bytes(name))))["data"]
            for name in (SMALL_PHOTO, "nikon-p6000-gps.jpg")
        ]
        shas = [body["metadata"]["sha256"] for body in bodies]
        arq_setup.track(*shas)
        await wait_for(lambda: arq_setup.queued_ids() == job_ids(*shas))

        env = {
            "DB_PATH": cfg.db_path,
            "MEDIA_DIR": cfg.media_dir,
            "REDIS_URL": cfg.redis_url,
            "ARQ_QUEUE": cfg.arq_queue,
            "CAPTION_MODEL": "none",
            "LOG_LEVEL": "info",
            **engines,
        }
        worker = start_worker(env, tmp_path / "worker.log", burst=True)
        try:
            returncode = await asyncio.to_thread(worker.popen.wait, 120)
        finally:
            worker.kill()
        assert returncode == 0, worker.output()[-3000:]
        log = worker.output()
        assert f"started (queue {cfg.arq_queue}," in log  # worker_startup ran and logs
        for jid in job_ids(*shas):
            assert jid in log  # arq's own log line for each job it ran

        for body in bodies:
            record = await get_record(client, body["image_id"])
            assert record["data"]["jobs"]["thumbnail"] == {"state": "done", "attempts": 1}
            assert record["data"]["jobs"]["exif"] == {"state": "done", "attempts": 1}
        record = await get_record(client, bodies[1]["image_id"])
        assert record["data"]["metadata"]["exif"]["latitude"] == pytest.approx(43.467448, abs=2e-5)
    assert arq_setup.queued_ids() == set()


# -- recovery ----------------------------------------------------------------------------------


async def test_job_held_by_a_dead_worker_is_run_by_another_after_its_lease(
    make_settings: Callable[..., Settings], arq_setup: ArqSetup
) -> None:
    cfg = arq_settings(make_settings, arq_setup, WORKER="off", JOB_LEASE_SECONDS="3")
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        body = (await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO))))["data"]
        sha256 = body["metadata"]["sha256"]
        arq_setup.track(sha256)
        await wait_for(lambda: arq_setup.queued_ids() == job_ids(sha256))

        # What a worker SIGKILLed mid-job leaves: arq's in-progress mark (it expires only after
        # the job timeout), and the job running in the table under its name, its lease unrenewed.
        in_progress = in_progress_key_prefix + job_id("thumbnail", sha256)
        arq_setup.client.set(in_progress, b"1", px=worker_mod.ARQ_JOB_TIMEOUT_S * 1000)
        claimed = await app.ctx.store.claim_job(sha256, "thumbnail", "dead:1:aa", 3.0)
        assert claimed is not None
        lapses_at = time.time() + 3.0

        async with arq_worker(cfg):
            await wait_jobs(client, body["image_id"], ["exif"], ["done"])
            row = job_rows(cfg, sha256)["thumbnail"]
            if time.time() < lapses_at - 0.5:
                assert (row["state"], row["runner"]) == ("running", "dead:1:aa")
            record = await wait_jobs(client, body["image_id"], states=("done",))
            assert time.time() >= lapses_at - 0.1
    assert record["data"]["jobs"]["thumbnail"] == {"state": "done", "attempts": 2}
    assert not arq_setup.client.exists(in_progress)
    assert media_view.exists(cfg, thumbnail_keys(sha256)["small"])


async def test_jobs_queued_while_redis_was_down_run_once_it_is_back(
    make_settings: Callable[..., Settings], private_redis: RedisServer
) -> None:
    cfg = make_settings(
        REDIS_URL=private_redis.url, ARQ_QUEUE=f"imgapi-test:{uuid.uuid4().hex}", WORKER="inline"
    )
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        await asyncio.to_thread(private_redis.stop)

        body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
        image_id = body["data"]["image_id"]
        assert body["data"]["jobs"]["thumbnail"]["state"] == "queued"
        _, res = await client.get("/healthz")
        assert res.status == 503
        assert res.json["database"] == "ok" and res.json["redis"].startswith("error")
        await asyncio.sleep(1.0)
        record = await get_record(client, image_id)
        assert record["data"]["jobs"]["thumbnail"]["state"] == "queued"

        await asyncio.to_thread(private_redis.start)  # same port, empty: the queue was lost
        record = await wait_jobs(client, image_id, states=("done",), within=40)
        assert record["data"]["jobs"]["thumbnail"] == {"state": "done", "attempts": 1}
        assert record["data"]["metadata"]["exif"]["Make"] == "FUJIFILM"
        _, res = await client.get("/healthz")
        assert res.status == 200
