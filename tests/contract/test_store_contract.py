"""What every Store implementation must do, written only against the Store protocol (no SQL, no
driver, no private attributes), and run once per backend.

The backends and the `make_store` / `store` fixtures are in tests/store_backends.py."""

from __future__ import annotations

import asyncio

import pytest
from store_helpers import add_image

from imgapi_core.store import (
    JOB_KINDS,
    Deleted,
    ImageQuery,
    Job,
    JobState,
    KnownImage,
    NewUpload,
    Record,
    Store,
    now_iso,
)

SHA = "a" * 64
SHA2 = "b" * 64
UNKNOWN = "f" * 64


def sha_of(i: int) -> str:
    return f"{i:064x}"


async def add_failure(store: Store, image_id: str, processed_at: str | None = None) -> None:
    stamp = processed_at or now_iso()
    await store.record_failure(
        image_id=image_id,
        original_name=f"{image_id}.xlsx",
        processed_at=stamp,
        start_time=stamp,
        error="invalid file format",
    )


async def finish_all(store: Store, sha256: str, runner: str = "r") -> None:
    for kind in JOB_KINDS:
        assert await store.claim_job(sha256, kind, runner, 30) is not None, kind
        assert await store.finish_job(sha256, kind, runner, "done") is True, kind


# -- health -------------------------------------------------------------------------------------


async def test_ping_and_check_writable_on_a_healthy_store(store):
    assert await store.ping() is None
    assert await store.check_writable() is None
    # The write probe leaves nothing behind, and the store takes writes after it.
    stats = await store.stats()
    assert (stats.total, stats.failed, stats.processing) == (0, 0, 0)
    assert await add_image(store, "one") is True
    await store.check_writable()
    assert (await store.stats()).total == 1
    assert (await store.get_record("one")) is not None


# -- recording uploads and reading them back ----------------------------------------------------


async def test_record_success_round_trips_every_field(store):
    upload = NewUpload(
        image_id="rt1",
        original_name="Holiday photo.JPG",
        processed_at="2026-03-01T10:00:00.250Z",
        start_time="2026-03-01T09:59:59.500Z",
        original_key="originals/rt1.png",
        sha256=SHA,
        width=640,
        height=480,
        format="png",
        size_bytes=123_456,
        frames=3,
        orientation=6,
        jobs={
            "thumbnail": ("queued", None),
            "exif": ("queued", None),
            "caption": ("skipped", "captions are off"),
        },
    )
    assert await store.record_success(upload) is True
    expected = Record(
        image_id="rt1",
        original_name="Holiday photo.JPG",
        processed_at="2026-03-01T10:00:00.250Z",
        error=None,
        original_key="originals/rt1.png",
        sha256=SHA,
        width=640,
        height=480,
        format="png",
        size_bytes=123_456,
        first_upload="2026-03-01T10:00:00.250Z",
        exif_json=None,
        caption=None,
        frames=3,
        orientation=6,
    )
    assert await store.get_record("rt1") == expected
    record, jobs = await store.record_with_jobs("rt1")
    assert record == expected
    assert {kind: (j.kind, j.state, j.attempts, j.error) for kind, j in jobs.items()} == {
        "thumbnail": ("thumbnail", "queued", 0, None),
        "exif": ("exif", "queued", 0, None),
        "caption": ("caption", "skipped", 0, "captions are off"),
    }
    assert await store.get_record("nope") is None
    assert await store.record_with_jobs("nope") == (None, {})
    assert await store.known_image(SHA) == KnownImage(SHA, 640, 480, "png", 3, 6)


async def test_the_first_upload_of_some_bytes_wins_their_metadata_and_jobs(store):
    await add_image(store, "first", processed_at="2026-03-01T10:00:00.000Z")
    # The same bytes again, said to be otherwise (another decoder's answer), with other jobs.
    again = NewUpload(
        image_id="second",
        original_name="second.png",
        processed_at="2026-03-02T10:00:00.000Z",
        start_time="2026-03-02T10:00:00.000Z",
        original_key="originals/second.png",
        sha256=SHA,
        width=99,
        height=99,
        format="png",
        size_bytes=1,
        jobs=dict.fromkeys(JOB_KINDS, ("skipped", "not again")),
    )
    assert await store.record_success(again) is True  # the first upload's jobs are still queued
    second = await store.get_record("second")
    assert second is not None
    assert (second.original_name, second.processed_at, second.original_key) == (
        "second.png",
        "2026-03-02T10:00:00.000Z",
        "originals/second.png",
    )
    assert (second.width, second.height, second.format, second.size_bytes) == (4, 3, "jpeg", 100)
    assert second.first_upload == "2026-03-01T10:00:00.000Z"
    for kind in JOB_KINDS:
        assert await store.job_state(SHA, kind) == JobState(kind, "queued", 0)


async def test_record_failure_is_read_back(store):
    await store.record_failure(
        image_id="bad",
        original_name="file.xlsx",
        processed_at="2026-03-01T10:00:01.000Z",
        start_time="2026-03-01T10:00:00.000Z",
        error="invalid file format",
    )
    expected = Record(
        image_id="bad",
        original_name="file.xlsx",
        processed_at="2026-03-01T10:00:01.000Z",
        error="invalid file format",
    )
    assert await store.get_record("bad") == expected
    assert await store.record_with_jobs("bad") == (expected, {})
    stats = await store.stats()
    assert (stats.total, stats.failed, stats.processing) == (1, 1, 0)
    assert stats.average_processing_time_seconds is None  # failures are not timed
    assert await store.original_keys() == set()


async def test_record_success_says_whether_jobs_remain_to_run(store):
    assert await add_image(store, "queued", sha256=SHA) is True
    assert await add_image(store, "queued-again", sha256=SHA) is True
    await finish_all(store, SHA)
    # Bytes whose jobs have all finished: nothing to dispatch, and the upload is not processing.
    assert await add_image(store, "done-already", sha256=SHA) is False
    assert (await store.stats()).processing == 0
    off = dict.fromkeys(JOB_KINDS, ("skipped", "off"))
    assert await add_image(store, "all-skipped", sha256=SHA2, jobs=off) is False
    assert (await store.stats()).processing == 0
    one_left = {**off, "exif": ("queued", None)}
    assert await add_image(store, "one-queued", sha256=sha_of(3), jobs=one_left) is True
    assert (await store.stats()).processing == 1
    assert await store.job_state(SHA2, "caption") == JobState("caption", "skipped", 0, "off")


async def test_known_image_after_a_success_and_none_otherwise(store):
    assert await store.known_image(SHA) is None
    await add_failure(store, "bad")
    assert await store.known_image(SHA) is None
    await add_image(store, "one", sha256=SHA)
    assert await store.known_image(SHA) == KnownImage(SHA, 4, 3, "jpeg")
    assert await store.known_image(UNKNOWN) is None


async def test_set_exif_and_caption_are_seen_by_every_record_of_the_bytes(store):
    await add_image(store, "one", sha256=SHA)
    await add_image(store, "two", sha256=SHA)
    await add_image(store, "other", sha256=SHA2)
    await store.set_exif(SHA, '{"Make": "Canon"}')
    await store.set_caption(SHA, "a cat on a mat")
    await store.set_exif(UNKNOWN, "{}")  # bytes deleted meanwhile: nothing to update, no error
    for image_id in ("one", "two"):
        rec = await store.get_record(image_id)
        assert rec is not None
        assert (rec.exif_json, rec.caption) == ('{"Make": "Canon"}', "a cat on a mat")
        rec, _jobs = await store.record_with_jobs(image_id)
        assert rec is not None and rec.caption == "a cat on a mat"
    other = await store.get_record("other")
    assert other is not None and (other.exif_json, other.caption) == (None, None)
    # The list reads them too.
    page, _jobs, _keys = await store.search_with_jobs(ImageQuery(), limit=10)
    assert {r.image_id: r.caption for r in page} == {
        "one": "a cat on a mat",
        "two": "a cat on a mat",
        "other": None,
    }
    await store.set_caption(SHA, "a dog")  # a later caption replaces the earlier one
    assert (await store.get_record("one")).caption == "a dog"


# -- listing ------------------------------------------------------------------------------------


async def test_listing_newest_first_with_a_cursor_and_a_status_filter(store):
    """GET /api/images without words: ImageQuery() or ImageQuery(status=...), newest upload
    first, one record more than the page asked for (is there a next page?), and the next page
    from the position of the page's last record."""
    # (image_id, processed_at, sha256 or None for a failure); two share a processed_at (ties go
    # by image_id, descending) and two share their bytes.
    uploads = [
        ("a1", "2026-03-01T10:00:00.000Z", sha_of(1)),
        ("b2", "2026-03-01T10:00:01.000Z", None),
        ("c3", "2026-03-01T10:00:02.000Z", sha_of(2)),
        ("d4", "2026-03-01T10:00:02.000Z", sha_of(3)),
        ("e5", "2026-03-01T10:00:03.000Z", None),
        ("f6", "2026-03-01T10:00:04.000Z", sha_of(1)),
        ("g7", "2026-03-01T10:00:05.000Z", sha_of(4)),
    ]
    for image_id, at, sha in uploads:
        if sha is None:
            await add_failure(store, image_id, processed_at=at)
        else:
            await add_image(store, image_id, sha256=sha, processed_at=at)
    assert await store.claim_job(sha_of(2), "exif", "r", 30) is not None

    async def walk(status: str | None, limit: int) -> list[str]:
        """Page after page, as the list route reads them."""
        seen: list[str] = []
        after = None
        for _ in range(len(uploads) + 2):
            rows, jobs, keys = await store.search_with_jobs(
                ImageQuery(status=status), limit=limit + 1, after=after
            )
            assert len(rows) <= limit + 1
            # Each record's position is its upload time and id: a cursor written before search
            # (processed_at|image_id) still points at the same place.
            assert keys == [(r.processed_at, r.image_id) for r in rows]
            # The jobs of exactly the stored bytes read.
            assert set(jobs) == {r.sha256 for r in rows if r.sha256 is not None}
            for sha, by_kind in jobs.items():
                assert set(by_kind) == set(JOB_KINDS)
                for kind, job in by_kind.items():
                    state = await store.job_state(sha, kind)
                    assert state is not None
                    assert (job.kind, job.state, job.attempts, job.error) == (
                        state.kind,
                        state.state,
                        state.attempts,
                        state.error,
                    )
            seen.extend(r.image_id for r in rows[:limit])
            if len(rows) <= limit:
                return seen
            after = keys[limit - 1]
        pytest.fail(f"the cursor never reached the end: {seen}")

    newest_first = ["g7", "f6", "e5", "d4", "c3", "b2", "a1"]
    for limit in (1, 2, 3, 10):
        assert await walk(None, limit) == newest_first, limit
        assert await walk("success", limit) == ["g7", "f6", "d4", "c3", "a1"], limit
        assert await walk("failed", limit) == ["e5", "b2"], limit

    page, jobs, keys = await store.search_with_jobs(ImageQuery(), limit=3)
    assert [r.image_id for r in page] == ["g7", "f6", "e5"]
    assert keys[-1] == ("2026-03-01T10:00:03.000Z", "e5")
    assert set(jobs) == {sha_of(4), sha_of(1)}
    assert page[2].error == "invalid file format" and page[2].sha256 is None
    assert page[1] == await store.get_record("f6")
    page, jobs, _keys = await store.search_with_jobs(
        ImageQuery(), limit=10, after=("2026-03-01T10:00:02.000Z", "d4")
    )
    assert [r.image_id for r in page] == ["c3", "b2", "a1"]
    assert jobs[sha_of(2)]["exif"].state == "running"
    assert jobs[sha_of(2)]["exif"].attempts == 1
    assert jobs[sha_of(2)]["thumbnail"].state == "queued"
    end = ("2026-03-01T10:00:00.000Z", "a1")
    assert await store.search_with_jobs(ImageQuery(), limit=10, after=end) == ([], {}, [])


# -- what the start-up sweep and the thumbnail renderer ask -------------------------------------


async def test_original_keys_and_known_sha256s(store):
    assert await store.original_keys() == set()
    assert await store.known_sha256s([SHA, SHA2]) == set()
    await add_image(store, "one", sha256=SHA)
    await add_image(store, "two", sha256=SHA)
    await add_image(store, "three", sha256=SHA2)
    await add_failure(store, "bad")
    assert await store.original_keys() == {
        "originals/one.jpg",
        "originals/two.jpg",
        "originals/three.jpg",
    }
    assert await store.known_sha256s([SHA, UNKNOWN, SHA2, SHA]) == {SHA, SHA2}
    assert await store.known_sha256s(s for s in (UNKNOWN, SHA2)) == {SHA2}  # any iterable
    assert await store.known_sha256s([]) == set()
    await store.delete_image("three")
    assert await store.known_sha256s([SHA, SHA2]) == {SHA}
    assert await store.original_keys() == {"originals/one.jpg", "originals/two.jpg"}


async def test_known_sha256s_answers_for_many_at_once(store):
    # More than one statement's worth of parameters in some databases; the stored ones sit at
    # both ends and on both sides of the places a backend might cut the list.
    asked = [sha_of(i) for i in range(1, 1301)]
    stored = {asked[i] for i in (0, 498, 499, 500, 501, 999, 1000, 1299)}
    for i, sha in enumerate(sorted(stored)):
        await add_image(store, f"img{i}", sha256=sha)
    assert len(asked) > 1000
    assert await store.known_sha256s(asked) == stored
    assert await store.known_sha256s(reversed(asked + asked)) == stored


async def test_original_of_gives_a_stored_original_of_the_bytes(store):
    assert await store.original_of(SHA) is None
    await add_failure(store, "bad")
    await add_image(store, "one", sha256=SHA, processed_at="2026-03-01T10:00:00.000Z")
    await add_image(store, "two", sha256=SHA, processed_at="2026-03-01T10:00:01.000Z")
    await add_image(store, "other", sha256=SHA2)
    assert await store.original_of(SHA) in {"originals/one.jpg", "originals/two.jpg"}
    assert await store.original_of(SHA2) == "originals/other.jpg"
    await store.delete_image("one")
    assert await store.original_of(SHA) == "originals/two.jpg"
    await store.delete_image("two")
    assert await store.original_of(SHA) is None
    assert await store.original_of(UNKNOWN) is None


# -- deleting -----------------------------------------------------------------------------------


async def test_delete_image_drops_shared_rows_with_the_last_reference(store):
    await add_image(store, "one")
    await add_image(store, "two")  # same bytes: shares the metadata and the jobs
    first = await store.delete_image("one")
    assert first == Deleted("originals/one.jpg", SHA, last_reference=False)
    assert await store.get_record("one") is None
    assert await store.get_record("two") is not None
    assert await store.known_sha256s([SHA]) == {SHA}
    assert await store.known_image(SHA) == KnownImage(SHA, 4, 3, "jpeg")
    assert await store.job_state(SHA, "thumbnail") == JobState("thumbnail", "queued", 0)
    assert (await store.stats()).total == 1
    last = await store.delete_image("two")
    assert last == Deleted("originals/two.jpg", SHA, last_reference=True)
    assert await store.get_record("two") is None
    assert await store.known_sha256s([SHA]) == set()
    assert await store.known_image(SHA) is None
    for kind in JOB_KINDS:
        assert await store.job_state(SHA, kind) is None, kind
    assert await store.due_jobs(10) == []
    stats = await store.stats()
    assert (stats.total, stats.processing, dict(stats.jobs)) == (0, 0, {})
    assert await store.search_with_jobs(ImageQuery(), limit=10) == ([], {}, [])
    assert await store.delete_image("two") is None
    # The same bytes uploaded again start afresh.
    assert await add_image(store, "three") is True
    assert await store.job_state(SHA, "exif") == JobState("exif", "queued", 0)


async def test_deleting_a_failed_upload(store):
    await add_failure(store, "bad")
    await add_image(store, "one")
    assert await store.delete_image("bad") == Deleted(None, None, last_reference=False)
    assert await store.get_record("bad") is None
    stats = await store.stats()
    assert (stats.total, stats.failed) == (1, 0)
    assert await store.known_sha256s([SHA]) == {SHA}


# -- jobs: claims and leases --------------------------------------------------------------------


async def test_claim_job_is_exclusive_between_two_runners(make_store):
    a, b = await make_store(), await make_store()  # two processes on one database, in effect
    for i in range(5):
        await add_image(a, f"img{i}", sha256=sha_of(i))
    for i in range(5):
        won = await asyncio.gather(
            a.claim_job(sha_of(i), "thumbnail", "runner-a", 30),
            b.claim_job(sha_of(i), "thumbnail", "runner-b", 30),
            a.claim_job(sha_of(i), "thumbnail", "runner-c", 30),
        )
        winners = [(runner, job) for runner, job in zip("abc", won, strict=True) if job]
        assert len(winners) == 1, won
        runner, job = winners[0]
        assert job == Job(sha_of(i), "thumbnail", 1)
        for s in (a, b):  # both see the same winner
            state = await s.job_state(sha_of(i), "thumbnail")
            assert state == JobState("thumbnail", "running", 1, None, f"runner-{runner}")


async def test_claiming_what_is_not_queued(store):
    assert await store.claim_job(SHA, "exif", "r", 30) is None  # no such job
    await add_image(
        store,
        "one",
        jobs={**dict.fromkeys(JOB_KINDS, ("queued", None)), "caption": ("skipped", "off")},
    )
    assert await store.claim_job(SHA, "caption", "r", 30) is None  # skipped
    assert await store.claim_job(SHA, "exif", "r", 30) == Job(SHA, "exif", 1)
    assert await store.finish_job(SHA, "exif", "r", "done") is True
    assert await store.claim_job(SHA, "exif", "r", 30) is None  # done
    assert await store.finish_job(SHA, "exif", "r", "done") is False  # not running any more
    assert await store.renew_leases("r", [], 30) == 0


async def test_a_lapsed_lease_can_be_claimed_by_another_runner(make_store):
    a, b = await make_store(), await make_store()
    await add_image(a, "img")
    first = await a.claim_job(SHA, "exif", "runner-a", lease_s=0.05)
    assert first == Job(SHA, "exif", 1)
    assert await b.claim_job(SHA, "exif", "runner-b", lease_s=30) is None  # still held
    await asyncio.sleep(0.1)
    # Lapsed, it is not taken directly: the sweep puts it back (counted, with a backoff) first.
    assert await b.claim_job(SHA, "exif", "runner-b", lease_s=30) is None
    assert await b.release_lapsed(3, lambda attempts: 0) == [Job(SHA, "exif", 1)]
    second = await b.claim_job(SHA, "exif", "runner-b", lease_s=30)
    assert second == Job(SHA, "exif", 2)
    assert (await a.job_state(SHA, "exif")).runner == "runner-b"
    # The runner that lost the job cannot finish it, retry it or renew it.
    assert await a.finish_job(SHA, "exif", "runner-a", "done") is False
    assert await a.retry_job(SHA, "exif", "runner-a", "boom", 0) is False
    assert await a.renew_leases("runner-a", [(SHA, "exif")], 30) == 0
    assert (await a.job_state(SHA, "exif")).state == "running"
    assert await b.finish_job(SHA, "exif", "runner-b", "done") is True
    assert await a.job_state(SHA, "exif") == JobState("exif", "done", 2, None, None)


async def test_renewed_lease_keeps_the_job(make_store):
    a, b = await make_store(), await make_store()
    await add_image(a, "img")
    assert await a.claim_job(SHA, "thumbnail", "runner-a", lease_s=0.4) is not None
    for _ in range(6):
        await asyncio.sleep(0.1)
        # Only the jobs it is running count (it holds no exif job).
        assert await a.renew_leases("runner-a", [(SHA, "thumbnail"), (SHA, "exif")], 0.4) == 1
    # Held well past its first lease: nobody else takes it, and no sweep calls it lapsed.
    assert await b.claim_job(SHA, "thumbnail", "runner-b", lease_s=30) is None
    assert await b.release_lapsed(3, lambda attempts: 0) == []
    assert (await b.job_state(SHA, "thumbnail")).runner == "runner-a"
    # Not renewed any more, it lapses.
    await asyncio.sleep(0.6)
    assert await b.release_lapsed(3, lambda attempts: 0) == [Job(SHA, "thumbnail", 1)]


async def test_stats_row_closes_when_the_last_job_finishes(store):
    await add_image(store, "one")
    await add_image(store, "two")  # same bytes: shares the jobs
    stats = await store.stats()
    assert (stats.total, stats.processing, dict(stats.jobs)) == (2, 2, {"queued": 3})
    assert stats.average_processing_time_seconds is None  # nothing finished yet
    for kind in ("thumbnail", "exif"):
        assert await store.claim_job(SHA, kind, "r", 30) is not None
        assert await store.finish_job(SHA, kind, "r", "done")
        assert (await store.stats()).processing == 2
    assert await store.claim_job(SHA, "caption", "r", 30) is not None
    assert (await store.stats()).jobs == {"done": 2, "running": 1}
    assert await store.finish_job(SHA, "caption", "r", "failed", "no model")
    stats = await store.stats()
    assert (stats.total, stats.failed, stats.processing) == (2, 0, 0)
    assert dict(stats.jobs) == {"done": 2, "failed": 1}
    assert stats.average_processing_time_seconds is not None
    assert stats.average_processing_time_seconds >= 0
    assert await store.job_state(SHA, "caption") == JobState("caption", "failed", 1, "no model")


async def test_retry_job_backs_off_then_is_due_again(store):
    await add_image(store, "img")
    assert await store.claim_job(SHA, "exif", "r", 30) == Job(SHA, "exif", 1)
    assert await store.retry_job(SHA, "exif", "r", "busy", 3600) is True
    assert await store.job_state(SHA, "exif") == JobState("exif", "queued", 1, "busy")
    assert await store.claim_job(SHA, "exif", "r", 30) is None  # backing off
    assert "exif" not in {j.kind for j in await store.due_jobs(10)}
    assert await store.claim_job(SHA, "thumbnail", "r", 30) is not None
    assert await store.retry_job(SHA, "thumbnail", "r", "busy", 0) is True
    assert Job(SHA, "thumbnail", 1) in await store.due_jobs(10)
    assert await store.claim_job(SHA, "thumbnail", "r", 30) == Job(SHA, "thumbnail", 2)


async def test_due_jobs(store):
    assert await store.due_jobs(10) == []
    await add_image(store, "one", sha256=SHA)
    await add_image(
        store, "two", sha256=SHA2, jobs={"thumbnail": ("queued", None), "exif": ("skipped", "off")}
    )
    due = await store.due_jobs(10)
    assert sorted(due, key=lambda j: (j.sha256, j.kind)) == sorted(
        [Job(SHA, kind, 0) for kind in JOB_KINDS] + [Job(SHA2, "thumbnail", 0)],
        key=lambda j: (j.sha256, j.kind),
    )
    assert len(await store.due_jobs(2)) == 2
    assert await store.claim_job(SHA, "caption", "r", 30) is not None  # running: not due
    assert {(j.sha256, j.kind) for j in await store.due_jobs(10)} == {
        (SHA, "thumbnail"),
        (SHA, "exif"),
        (SHA2, "thumbnail"),
    }
    # `updated_before`: only jobs untouched since then (the sweep hands out the stale ones).
    assert await store.due_jobs(10, updated_before=now_iso(ago_s=3600)) == []
    assert len(await store.due_jobs(10, updated_before=now_iso(ago_s=-3600))) == 3


async def test_turning_a_kind_off_skips_every_queued_job_of_it_at_once(store):
    for i in range(3):
        await add_image(store, f"img{i}", sha256=sha_of(i))
    # One caption job in backoff (failed once, due in an hour), one running elsewhere.
    assert await store.claim_job(sha_of(0), "caption", "r", 30)
    assert await store.retry_job(sha_of(0), "caption", "r", "boom", 3600)
    assert await store.claim_job(sha_of(1), "caption", "r", 30)
    for kind in ("thumbnail", "exif"):
        for i in range(3):
            assert await store.claim_job(sha_of(i), kind, "r", 30)
            assert await store.finish_job(sha_of(i), kind, "r", "done")
    assert (await store.stats()).processing == 3
    assert await store.skip_queued("caption", "captions off") == 2
    assert await store.job_state(sha_of(0), "caption") == JobState(
        "caption", "skipped", 1, "captions off"
    )
    assert await store.job_state(sha_of(1), "caption") == JobState(
        "caption", "running", 1, None, "r"
    )
    assert await store.job_state(sha_of(2), "caption") == JobState(
        "caption", "skipped", 0, "captions off"
    )
    assert (await store.stats()).processing == 1  # img1: its caption job is still running
    assert await store.skip_queued("caption", "captions off") == 0
    assert await store.finish_job(sha_of(1), "caption", "r", "done")
    assert (await store.stats()).processing == 0


async def test_a_job_whose_runner_keeps_dying_fails_after_its_attempts(store):
    """An OOM kill or a decoder crash every time: handed out again with a backoff, then failed
    once JOB_MAX_ATTEMPTS is used up, instead of for ever."""
    await add_image(store, "img")
    delays: list[int] = []

    def backoff(attempts: int) -> float:
        delays.append(attempts)
        return 0

    for attempt in (1, 2):
        job = await store.claim_job(SHA, "thumbnail", f"doomed-{attempt}", lease_s=0.01)
        assert job == Job(SHA, "thumbnail", attempt)
        await asyncio.sleep(0.05)  # the runner died: its lease lapses
        released = await store.release_lapsed(2, backoff)
        assert released == ([Job(SHA, "thumbnail", 1)] if attempt == 1 else [])
    assert delays == [1]
    assert await store.job_state(SHA, "thumbnail") == JobState(
        "thumbnail",
        "failed",
        2,
        "the runner died 2 times on this job (gave up after 2 attempts)",
        None,
    )
    assert await store.claim_job(SHA, "thumbnail", "next", 30) is None
    assert (await store.stats()).processing == 1  # exif and caption are still queued


async def test_a_lapsed_job_backs_off_before_it_is_due_again(store):
    await add_image(store, "img")
    assert await store.claim_job(SHA, "exif", "doomed", lease_s=0.01)
    await asyncio.sleep(0.05)
    assert await store.release_lapsed(5, lambda attempts: 3600) == [Job(SHA, "exif", 1)]
    state = await store.job_state(SHA, "exif")
    assert state is not None and (state.state, state.attempts, state.runner) == ("queued", 1, None)
    assert {j.kind for j in await store.due_jobs(10)} == {"thumbnail", "caption"}
    assert await store.claim_job(SHA, "exif", "next", 30) is None
    assert await store.release_lapsed(5, lambda attempts: 3600) == []  # counted once


async def test_requeue_puts_finished_jobs_back_with_attempts_reset(store):
    for i in range(3):
        await add_image(store, f"img{i}", sha256=sha_of(i))
    for i in range(3):
        for kind in ("thumbnail", "exif", "caption"):
            assert await store.claim_job(sha_of(i), kind, "r", 30)
            failed = kind == "exif" and i < 2
            state, error = ("failed", "boom") if failed else ("done", None)
            assert await store.finish_job(sha_of(i), kind, "r", state, error)
    assert (await store.stats()).processing == 0
    # One image's job only, and only from the states asked for.
    assert await store.requeue_jobs("exif", ("failed",), sha_of(2)) == []  # it is done
    (one,) = await store.requeue_jobs("exif", ("failed",), sha_of(0))
    assert (one.sha256, one.kind, one.attempts) == (sha_of(0), "exif", 0)
    state = await store.job_state(sha_of(0), "exif")
    assert (state.state, state.attempts, state.error, state.runner) == ("queued", 0, None, None)
    assert (await store.stats()).processing == 1  # its upload is processing again
    assert [job.sha256 for job in await store.due_jobs(10)] == [sha_of(0)]
    # Every failed job of a kind.
    assert [job.sha256 for job in await store.requeue_jobs("exif", ("failed",))] == [sha_of(1)]
    assert await store.requeue_jobs("exif", ("queued", "running")) == []  # not finished states
    assert (await store.stats()).processing == 2
    # Run again through the normal path, they close their uploads' stats once more.
    for i in (0, 1):
        job = await store.claim_job(sha_of(i), "exif", "r", 30)
        assert job is not None and job.attempts == 1
        assert await store.finish_job(sha_of(i), "exif", "r", "done")
    assert (await store.stats()).processing == 0
