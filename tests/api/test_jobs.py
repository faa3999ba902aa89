"""Jobs in-process (no REDIS_URL) and the job semantics: states, retries, failures, recovery.

The helpers are in job_helpers.py, shared with test_exif_thumbs_jobs.py, test_media_keys.py and
test_jobs_arq.py.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import media_view
import pytest
from conftest import running_app, wait_for
from job_helpers import (
    SMALL_PHOTO,
    db_rows,
    db_write,
    get_record,
    job_rows,
    original_key,
    photo_bytes,
    thumbnail_keys,
    unique_jpeg,
    upload,
    wait_jobs,
)
from PIL import Image
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import imaging
from imgapi_core import runtime as jobs
from imgapi_core.settings import Settings


def stored_image(cfg: Settings, key: str) -> Image.Image:
    data = media_view.read(cfg, key)
    assert data, f"nothing stored under {key}"
    return Image.open(io.BytesIO(data))


def record_writes(app: Sanic, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the app's media store is asked to write from now on (thumbnails are written
    with put_bytes), on either engine."""
    written: list[str] = []
    media = app.ctx.media
    real_put = media.put_bytes

    async def put_bytes(key: str, data: bytes) -> None:
        written.append(key)
        await real_put(key, data)

    monkeypatch.setattr(media, "put_bytes", put_bytes)
    return written


# -- mode 1: jobs in the API process ----------------------------------------------------------


async def test_upload_runs_its_jobs_in_process(client: SanicASGITestClient, cfg: Settings) -> None:
    assert not cfg.redis_url and cfg.worker == "inline"
    body = await upload(client, photo_bytes(SMALL_PHOTO), "x100f.jpg")
    data = body["data"]
    assert data["jobs"]["caption"] == {
        "state": "skipped",
        "attempts": 0,
        "error": jobs.CAPTIONS_OFF,
    }
    assert data["jobs"]["thumbnail"]["state"] in ("queued", "running", "done")

    record = await wait_jobs(client, data["image_id"], states=("done",))
    job_states = record["data"]["jobs"]
    for kind in ("thumbnail", "exif"):
        assert job_states[kind] == {"state": "done", "attempts": 1}, job_states
    assert job_states["caption"]["state"] == "skipped"

    sha256 = record["data"]["metadata"]["sha256"]
    expected = {"small": (256, 171), "medium": (768, 512)}
    for size, key in thumbnail_keys(sha256).items():
        with stored_image(cfg, key) as im:
            assert im.format == "JPEG"
            assert im.size == expected[size]
            assert not im.getexif()  # nothing of the original's metadata is carried over

    exif = record["data"]["metadata"]["exif"]
    assert isinstance(exif, dict)
    assert exif["Make"] == "FUJIFILM"

    (stats_row,) = db_rows(cfg, "SELECT * FROM stats WHERE image_id = ?", (data["image_id"],))
    assert stats_row["status"] == 1
    assert stats_row["end_time"] is not None
    assert stats_row["end_time"] > stats_row["start_time"]  # RFC 3339 UTC sorts as text

    _, res = await client.get("/api/stats")
    assert res.status == 200
    stats = res.json
    average = stats["average_processing_time_seconds"]
    assert isinstance(average, float | int) and not isinstance(average, bool)
    assert average > 0
    assert stats["total"] == 1 and stats["failed"] == 0
    assert stats["jobs"] == {
        "queued": 0,
        "running": 0,
        "done": 2,
        "failed": 0,
        "skipped": 1,
        "unavailable": 0,
    }


async def test_duplicate_upload_runs_no_new_jobs(
    app: Sanic, client: SanicASGITestClient, cfg: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = unique_jpeg(photo_bytes(SMALL_PHOTO))
    first = await upload(client, data)
    first_id = first["data"]["image_id"]
    sha256 = first["data"]["metadata"]["sha256"]
    done = await wait_jobs(client, first_id, states=("done",))
    thumbs = thumbnail_keys(sha256)
    before = {size: media_view.read(cfg, key) for size, key in thumbs.items()}
    written = record_writes(app, monkeypatch)

    second = await upload(client, data, "again.jpg")
    second_data = second["data"]
    assert second_data["image_id"] != first_id
    assert second_data["metadata"]["sha256"] == sha256
    # Complete at once: the finished jobs and their results are the first upload's.
    assert second_data["jobs"] == done["data"]["jobs"]
    assert second_data["metadata"]["exif"] == done["data"]["metadata"]["exif"]
    assert second_data["metadata"]["exif"]["Make"] == "FUJIFILM"
    (stats_row,) = db_rows(
        cfg, "SELECT end_time FROM stats WHERE image_id = ?", (second_data["image_id"],)
    )
    assert stats_row["end_time"] is not None

    await asyncio.sleep(cfg.sweep_seconds * 3)  # time for a runner to (wrongly) pick something up
    rows = job_rows(cfg, sha256)
    assert {kind: row["attempts"] for kind, row in rows.items()} == {
        "thumbnail": 1,
        "exif": 1,
        "caption": 0,
    }
    assert written == []  # no thumbnail made again
    assert {size: media_view.read(cfg, key) for size, key in thumbs.items()} == before


async def test_duplicates_uploaded_together_share_one_run(
    client: SanicASGITestClient, cfg: Settings
) -> None:
    data = unique_jpeg(photo_bytes("samsung-s7-12mp-gps-orient6.jpg"))
    bodies = await asyncio.gather(*(upload(client, data, f"copy{i}.jpg") for i in range(3)))
    sha256 = bodies[0]["data"]["metadata"]["sha256"]
    for body in bodies:
        await wait_jobs(client, body["data"]["image_id"], states=("done",))
    rows = job_rows(cfg, sha256)
    assert len(rows) == 3
    assert rows["thumbnail"]["attempts"] == 1 and rows["exif"]["attempts"] == 1
    ends = db_rows(cfg, "SELECT end_time FROM stats WHERE status = 1")
    assert len(ends) == 3 and all(row["end_time"] for row in ends)


# -- job semantics, one run at a time (WORKER=off: no runner competes with the test's own) -----


@pytest.fixture
async def quiet_app(make_settings: Callable[..., Settings]) -> AsyncIterator[Sanic]:
    """The API with no job runner: jobs stay queued until the test runs them itself."""
    async with running_app(make_settings(WORKER="off", JOB_MAX_ATTEMPTS="3")) as application:
        yield application


@pytest.fixture
async def runtime(quiet_app: Sanic) -> AsyncIterator[jobs.Runtime]:
    rt = jobs.Runtime(quiet_app.ctx.settings, quiet_app.ctx.store, quiet_app.ctx.media)
    try:
        yield rt
    finally:
        await rt.close()


async def test_done_job_is_not_run_again_and_a_forced_rerun_is_identical(
    quiet_app: Sanic, runtime: jobs.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = quiet_app.ctx.settings
    client = SanicASGITestClient(quiet_app)
    body = await upload(client, photo_bytes(SMALL_PHOTO))
    sha256 = body["data"]["metadata"]["sha256"]
    assert body["data"]["jobs"]["thumbnail"]["state"] == "queued"

    assert await runtime.run("thumbnail", sha256) == "done"
    assert await runtime.run("exif", sha256) == "done"
    thumbs = {key for fmt in cfg.thumb_formats for key in thumbnail_keys(sha256, fmt).values()}
    first_bytes = {key: media_view.read(cfg, key) for key in thumbs}
    assert all(first_bytes.values())
    written = record_writes(quiet_app, monkeypatch)
    (meta,) = db_rows(cfg, "SELECT exif_json FROM metadata WHERE sha256 = ?", (sha256,))
    first_exif = meta["exif_json"]

    # A done job handed out again (a duplicate arq delivery, a sweep) is a no-op.
    assert await runtime.run("thumbnail", sha256) == "not run: done"
    assert await runtime.run("exif", sha256) == "not run: done"
    assert {k: r["attempts"] for k, r in job_rows(cfg, sha256).items() if k != "caption"} == {
        "thumbnail": 1,
        "exif": 1,
    }
    assert written == []

    # Forced re-run: the thumbnails are written again, with the same bytes.
    db_write(
        cfg, "UPDATE jobs SET state = 'queued' WHERE sha256 = ? AND kind != 'caption'", (sha256,)
    )
    assert await runtime.run("thumbnail", sha256) == "done"
    assert await runtime.run("exif", sha256) == "done"
    assert sorted(written) == sorted(thumbs)
    assert {key: media_view.read(cfg, key) for key in thumbs} == first_bytes
    (meta,) = db_rows(cfg, "SELECT exif_json FROM metadata WHERE sha256 = ?", (sha256,))
    assert meta["exif_json"] == first_exif
    assert job_rows(cfg, sha256)["thumbnail"]["attempts"] == 2


async def test_a_job_cancelled_while_its_claim_commits_is_handed_back(
    quiet_app: Sanic, runtime: jobs.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown (or arq's timeout) cancels a run while the store commits its claim: the store
    finishes the write, so the job is the runner's; it must be queued again at once, not left
    running until its lease lapses (counted as a runner that died)."""
    cfg = quiet_app.ctx.settings
    client = SanicASGITestClient(quiet_app)
    sha256 = (await upload(client, photo_bytes(SMALL_PHOTO)))["data"]["metadata"]["sha256"]
    store = quiet_app.ctx.store
    real_claim = store.claim_job
    claiming = asyncio.Event()

    async def slow_claim(*args: Any) -> Any:
        claiming.set()
        await asyncio.sleep(0.2)  # the cancellation lands here; the claim still commits
        return await real_claim(*args)

    monkeypatch.setattr(store, "claim_job", slow_claim)
    run = asyncio.create_task(runtime.run("thumbnail", sha256))
    await claiming.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    row = job_rows(cfg, sha256)["thumbnail"]
    assert (row["state"], row["error"]) == ("queued", "interrupted before it started")
    assert row["runner"] is None


async def test_transient_error_backs_off_then_fails_keeping_the_last_error(
    quiet_app: Sanic, runtime: jobs.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = quiet_app.ctx.settings
    assert cfg.job_max_attempts == 3
    client = SanicASGITestClient(quiet_app)
    body = await upload(client, photo_bytes(SMALL_PHOTO))
    image_id = body["data"]["image_id"]
    sha256 = body["data"]["metadata"]["sha256"]
    calls: list[int] = []

    def broken(*_args: Any) -> None:
        calls.append(1)
        raise OSError(f"disk hiccup {len(calls)}")

    monkeypatch.setattr(imaging, "render_thumbnail_set", broken)

    for attempt, backoff in ((1, 2.0), (2, 4.0)):
        assert await runtime.run("thumbnail", sha256) == "retrying"
        row = job_rows(cfg, sha256)["thumbnail"]
        assert row["state"] == "queued"
        assert row["attempts"] == attempt
        assert row["error"] == f"OSError: disk hiccup {attempt}"
        assert row["run_after"] - time.time() == pytest.approx(backoff, abs=1.0)
        # Not due yet: nobody may take it before its backoff is over.
        assert await runtime.run("thumbnail", sha256) == "not run: queued"
        assert len(calls) == attempt
        record = await get_record(client, image_id)
        assert record["data"]["jobs"]["thumbnail"] == {
            "state": "queued",
            "attempts": attempt,
            "error": f"OSError: disk hiccup {attempt}",
        }
        db_write(
            cfg, "UPDATE jobs SET run_after = 0 WHERE sha256 = ? AND kind = 'thumbnail'", (sha256,)
        )

    assert await runtime.run("thumbnail", sha256) == "failed"
    assert len(calls) == 3
    row = job_rows(cfg, sha256)["thumbnail"]
    assert row["state"] == "failed"
    assert row["attempts"] == 3
    assert row["error"] == "OSError: disk hiccup 3 (gave up after 3 attempts)"
    assert row["runner"] is None and row["lease_until"] is None
    assert await runtime.run("thumbnail", sha256) == "not run: failed"

    # A failed job counts as finished: the image's stats row closes with its last job.
    (stats_row,) = db_rows(cfg, "SELECT end_time FROM stats WHERE image_id = ?", (image_id,))
    assert stats_row["end_time"] is None
    assert await runtime.run("exif", sha256) == "done"
    (stats_row,) = db_rows(cfg, "SELECT end_time FROM stats WHERE image_id = ?", (image_id,))
    assert stats_row["end_time"] is not None
    record = await get_record(client, image_id)
    assert record["data"]["jobs"]["thumbnail"]["state"] == "failed"
    assert "disk hiccup 3" in record["data"]["jobs"]["thumbnail"]["error"]
    _, res = await client.get("/api/stats")
    assert res.json["failed_jobs"] == 1


async def test_transient_errors_with_the_in_process_runner(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_settings(JOB_MAX_ATTEMPTS="2")
    real_write = imaging.render_thumbnail_set
    thumbnail_calls: list[int] = []

    def flaky_write(*args: Any) -> Any:
        thumbnail_calls.append(1)
        if len(thumbnail_calls) == 1:
            raise OSError("No space left on device")
        return real_write(*args)

    def broken_exif(*_args: Any) -> Any:
        raise RuntimeError("exif reader crashed")

    monkeypatch.setattr(imaging, "render_thumbnail_set", flaky_write)
    monkeypatch.setattr(imaging, "extract_exif", broken_exif)
    async with running_app(cfg) as application:
        client = SanicASGITestClient(application)
        body = await upload(client, photo_bytes(SMALL_PHOTO))
        record = await wait_jobs(client, body["data"]["image_id"], within=40)
        job_states = record["data"]["jobs"]
        assert job_states["thumbnail"] == {"state": "done", "attempts": 2}
        assert job_states["exif"] == {
            "state": "failed",
            "attempts": 2,
            "error": "RuntimeError: exif reader crashed (gave up after 2 attempts)",
        }
        assert record["data"]["metadata"]["exif"] is None

        # The runner is still there for the next upload.
        monkeypatch.undo()
        body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
        record = await wait_jobs(client, body["data"]["image_id"], states=("done",))
        assert record["data"]["metadata"]["exif"]["Make"] == "FUJIFILM"


async def test_permanent_errors_fail_at_once_and_the_runner_carries_on(
    make_settings: Callable[..., Settings],
) -> None:
    """A deleted original and an undecodable original: failed on the first attempt, no retry."""
    off = make_settings(WORKER="off")
    async with running_app(off) as application:
        client = SanicASGITestClient(application)
        gone, broken, fine = [
            (await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO))))["data"] for _ in range(3)
        ]
    media_view.remove(off, original_key(off, gone["image_id"]))
    broken_key = original_key(off, broken["image_id"])
    content = media_view.read(off, broken_key)
    media_view.write(off, broken_key, content[: len(content) // 2])  # EXIF and half the scan

    inline = make_settings(WORKER="inline")
    async with running_app(inline) as application:
        client = SanicASGITestClient(application)
        gone_rec = await wait_jobs(client, gone["image_id"])
        broken_rec = await wait_jobs(client, broken["image_id"])
        fine_rec = await wait_jobs(client, fine["image_id"], states=("done",))

    for kind in ("thumbnail", "exif"):
        assert gone_rec["data"]["jobs"][kind] == {
            "state": "failed",
            "attempts": 1,
            "error": "the original file is gone",
        }
    thumb = broken_rec["data"]["jobs"]["thumbnail"]
    assert thumb["state"] == "failed" and thumb["attempts"] == 1
    assert thumb["error"].startswith("the image cannot be decoded: ")
    assert "truncated" in thumb["error"]
    # No server path (nor bucket) in what clients see.
    assert str(off.media_dir) not in thumb["error"] and "s3://" not in thumb["error"]
    # EXIF sits in the headers, which survived: a partial result, never a crash.
    assert broken_rec["data"]["jobs"]["exif"]["state"] == "done"
    assert broken_rec["data"]["metadata"]["exif"]["Make"] == "FUJIFILM"
    assert fine_rec["data"]["metadata"]["exif"]["Make"] == "FUJIFILM"
    for key in thumbnail_keys(fine_rec["data"]["metadata"]["sha256"]).values():
        assert media_view.read(inline, key)


# -- recovery ----------------------------------------------------------------------------------


async def test_job_left_running_by_a_dead_runner_is_rerun_after_its_lease(
    make_settings: Callable[..., Settings],
) -> None:
    off = make_settings(WORKER="off")
    async with running_app(off) as application:
        client = SanicASGITestClient(application)
        body = await upload(client, photo_bytes(SMALL_PHOTO))
        sha256 = body["data"]["metadata"]["sha256"]
        # A runner takes the job and dies: the row says running, held by it, until its lease ends.
        lease_s = 4.0
        claimed = await application.ctx.store.claim_job(sha256, "thumbnail", "dead:1:aa", lease_s)
        assert claimed is not None and claimed.attempts == 1
        lapses_at = time.time() + lease_s

    async with running_app(make_settings()) as application:
        client = SanicASGITestClient(application)
        row = job_rows(off, sha256)["thumbnail"]
        if time.time() < lapses_at - 0.5:
            assert (row["state"], row["runner"]) == ("running", "dead:1:aa")  # not stolen early
        record = await wait_jobs(client, body["data"]["image_id"], states=("done",))
        assert time.time() >= lapses_at - 0.1
    assert record["data"]["jobs"]["thumbnail"] == {"state": "done", "attempts": 2}
    row = job_rows(off, sha256)["thumbnail"]
    assert row["runner"] is None and row["lease_until"] is None
    assert media_view.exists(off, thumbnail_keys(sha256)["small"])


async def test_api_restart_loses_no_job(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed with jobs queued and running: the running ones go back to queued; a new start
    runs them all."""
    cfg = make_settings()
    real_write = imaging.render_thumbnail_set
    release = threading.Event()

    def held_write(*args: Any) -> Any:
        release.wait(20)  # thumbnail jobs are still running when the API closes
        return real_write(*args)

    monkeypatch.setattr(imaging, "render_thumbnail_set", held_write)
    big = photo_bytes("xiaomi-mi9t-12mp-orient6.jpg")
    async with running_app(cfg) as application:
        client = SanicASGITestClient(application)
        ids = [(await upload(client, unique_jpeg(big)))["data"]["image_id"] for _ in range(4)]
        await wait_for(
            lambda: db_rows(
                cfg, "SELECT 1 FROM jobs WHERE kind = 'thumbnail' AND state = 'running'"
            )
        )
        # close_resources waits for the job threads: let them go once it has begun.
        threading.Timer(0.5, release.set).start()
    rows = db_rows(cfg, "SELECT state, error FROM jobs WHERE kind = 'thumbnail'")
    assert len(rows) == 4
    assert all(row["state"] in ("queued", "done") for row in rows), [tuple(r) for r in rows]
    assert any(row["error"] == "interrupted before it finished" for row in rows)

    monkeypatch.undo()
    async with running_app(cfg) as application:
        client = SanicASGITestClient(application)
        for image_id in ids:
            record = await wait_jobs(client, image_id, states=("done",), within=60)
            sha256 = record["data"]["metadata"]["sha256"]
            with stored_image(cfg, thumbnail_keys(sha256)["medium"]) as im:
                assert im.size == (576, 768)  # 4000x3000 with Orientation=6: portrait
    ends = db_rows(cfg, "SELECT end_time FROM stats")
    assert len(ends) == 4 and all(row["end_time"] for row in ends)
