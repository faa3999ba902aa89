"""The event log every Store keeps: each state change writes its events in its own transaction,
ids grow in commit order, and the commit listener hears of them once they are committed.
Written only against the Store protocol; run once per backend (tests/store_backends.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from store_helpers import SHA, add_image

from imgapi_core.store import Event, Store, now_iso

RUNNER = "host:1:aa"


async def new_events(store: Store, after: int) -> list[tuple[str, str, str | None, str | None]]:
    return [(e.type, e.image_id, e.kind, e.state) for e in await store.events_after(after, 1000)]


async def finish_all(store: Store, sha256: str, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        assert await store.claim_job(sha256, kind, RUNNER, 30.0) is not None
        assert await store.finish_job(sha256, kind, RUNNER, "done")


async def test_an_upload_and_its_jobs_write_their_events_in_order(store: Store) -> None:
    start = await store.last_event_id()
    await add_image(store, "img1")
    await finish_all(store, SHA, ("thumbnail", "exif"))
    assert await store.claim_job(SHA, "caption", RUNNER, 30.0) is not None
    await store.finish_job(SHA, "caption", RUNNER, "failed", "model exploded")

    events = await store.events_after(start, 1000)
    assert [(e.type, e.image_id, e.kind, e.state) for e in events] == [
        ("image.uploaded", "img1", None, "success"),
        ("job.started", "img1", "thumbnail", "running"),
        ("job.done", "img1", "thumbnail", "done"),
        ("job.started", "img1", "exif", "running"),
        ("job.done", "img1", "exif", "done"),
        ("job.started", "img1", "caption", "running"),
        ("job.failed", "img1", "caption", "failed"),
        ("image.ready", "img1", None, "ready"),
    ]
    assert events[-2].error == "model exploded"
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert await store.last_event_id() == ids[-1]
    assert all(isinstance(e, Event) and e.at.endswith("Z") for e in events)


async def test_events_after_pages_by_id(store: Store) -> None:
    start = await store.last_event_id()
    for i in range(5):
        await add_image(store, f"img{i}", sha256=f"{i:064x}")
    first = await store.events_after(start, 2)
    rest = await store.events_after(first[-1].id, 1000)
    assert [e.image_id for e in first + rest] == [f"img{i}" for i in range(5)]
    assert await store.events_after(rest[-1].id, 1000) == []


async def test_job_events_go_to_every_upload_of_the_same_bytes(store: Store) -> None:
    await add_image(store, "first")
    await add_image(store, "second")  # the same bytes: its jobs are the first one's
    start = await store.last_event_id()
    await finish_all(store, SHA, ("thumbnail", "exif", "caption"))
    ready = [e.image_id for e in await store.events_after(start, 1000) if e.type == "image.ready"]
    assert ready == ["first", "second"]


async def test_an_upload_whose_jobs_are_finished_already_is_ready_at_once(store: Store) -> None:
    await add_image(store, "first")
    await finish_all(store, SHA, ("thumbnail", "exif", "caption"))
    start = await store.last_event_id()
    await add_image(store, "again")
    assert await new_events(store, start) == [
        ("image.uploaded", "again", None, "success"),
        ("image.ready", "again", None, "ready"),
    ]


async def test_a_failed_upload_and_a_delete_write_their_events(store: Store) -> None:
    start = await store.last_event_id()
    stamp = now_iso()
    await store.record_failure(
        image_id="bad", original_name="x.bmp", processed_at=stamp, start_time=stamp, error="no"
    )
    await add_image(store, "img1")
    assert await store.delete_image("img1") is not None
    assert await new_events(store, start) == [
        ("image.uploaded", "bad", None, "failed"),
        ("image.uploaded", "img1", None, "success"),
        ("image.deleted", "img1", None, "deleted"),
    ]


async def test_retries_requeues_and_skips_write_their_events(store: Store) -> None:
    await add_image(store, "img1")
    start = await store.last_event_id()
    assert await store.claim_job(SHA, "thumbnail", RUNNER, 30.0) is not None
    assert await store.retry_job(SHA, "thumbnail", RUNNER, "busy", 0)
    assert await store.skip_queued("caption", "captions are off") == 1
    assert await store.claim_job(SHA, "exif", RUNNER, 30.0) is not None
    await store.finish_job(SHA, "exif", RUNNER, "failed", "broken")
    assert len(await store.requeue_jobs("exif", ("failed",), SHA)) == 1
    assert await new_events(store, start) == [
        ("job.started", "img1", "thumbnail", "running"),
        ("job.queued", "img1", "thumbnail", "queued"),
        ("job.done", "img1", "caption", "skipped"),
        ("job.started", "img1", "exif", "running"),
        ("job.failed", "img1", "exif", "failed"),
        ("job.queued", "img1", "exif", "queued"),
    ]


async def test_a_lapsed_lease_writes_queued_then_failed(store: Store) -> None:
    await add_image(store, "img1", jobs={"thumbnail": ("queued", None)})
    start = await store.last_event_id()
    assert await store.claim_job(SHA, "thumbnail", RUNNER, 0.01) is not None
    await asyncio.sleep(0.05)  # past the lease
    assert len(await store.release_lapsed(max_attempts=2, backoff_s=lambda n: 0)) == 1
    assert await store.claim_job(SHA, "thumbnail", RUNNER, 0.01) is not None
    await asyncio.sleep(0.05)  # past the lease
    assert await store.release_lapsed(max_attempts=2, backoff_s=lambda n: 0) == []
    assert await new_events(store, start) == [
        ("job.started", "img1", "thumbnail", "running"),
        ("job.queued", "img1", "thumbnail", "queued"),
        ("job.started", "img1", "thumbnail", "running"),
        ("job.failed", "img1", "thumbnail", "failed"),
        ("image.ready", "img1", None, "ready"),
    ]


async def test_an_unavailable_job_finishes_its_image(store: Store) -> None:
    await add_image(store, "img1", jobs={"caption": ("queued", None)})
    start = await store.last_event_id()
    assert await store.claim_job(SHA, "caption", RUNNER, 30.0) is not None
    assert await store.finish_job(SHA, "caption", RUNNER, "unavailable", "not installed")
    _, jobs = await store.record_with_jobs("img1")
    assert jobs["caption"].state == "unavailable" and jobs["caption"].error == "not installed"
    assert [e[0] for e in await new_events(store, start)] == [
        "job.started",
        "job.done",
        "image.ready",
    ]
    assert (await store.stats()).processing == 0


async def test_the_commit_listener_hears_each_commit_with_events(make_store) -> None:
    store = await make_store()
    heard: list[tuple[int, str]] = []
    store.add_commit_listener(lambda last: heard.append((last, threading.current_thread().name)))
    await add_image(store, "img1")
    assert [last for last, _ in heard] == [await store.last_event_id()]
    heard.clear()
    await store.ping()
    await store.renew_leases(RUNNER, [(SHA, "thumbnail")], 30.0)  # a write without events
    assert heard == []
    await store.delete_image("img1")
    assert [last for last, _ in heard] == [await store.last_event_id()]


async def test_a_rolled_back_change_writes_no_event(store: Store) -> None:
    await add_image(store, "img1")
    start = await store.last_event_id()
    heard: list[int] = []
    store.add_commit_listener(heard.append)
    with pytest.raises(Exception):  # noqa: B017 - the backend's own integrity error
        await add_image(store, "img1")  # the same image id again
    assert heard == [] and await store.events_after(start, 10) == []


async def test_another_store_on_the_same_database_reads_the_events(make_store) -> None:
    writer, reader = await make_store(), await make_store()
    start = await reader.last_event_id()
    await add_image(writer, "img1")
    assert [e.type for e in await reader.events_after(start, 10)] == ["image.uploaded"]


async def test_pruning_keeps_ids_growing(store: Store) -> None:
    await add_image(store, "img1")
    last = await store.last_event_id()
    assert await store.prune_events(before="9999-12-31T00:00:00Z") >= 1
    assert await store.events_after(0, 10) == []
    assert await store.last_event_id() == last
    await add_image(store, "img2", sha256="b" * 64)
    (event,) = await store.events_after(0, 10)
    assert event.id > last
