"""Webhook deliveries as every Store implementation must keep them, written only against the Store
protocol: one delivery per URL for each image.ready and job.failed event, written with the event;
claims exclusive between stores on one database, under a lease that lapses; the first body kept;
failed ones queued again; the listing's filter and cursor."""

from __future__ import annotations

import asyncio
import json
import time

from store_helpers import add_image

from imgapi_core.store import JOB_KINDS, Delivery, Store

SHA = "a" * 64
SHA2 = "b" * 64
HOOK_A = "http://a.example/hook"
HOOK_B = "https://b.example/hook?k=1"


async def finish_jobs(store: Store, sha256: str, states: dict[str, str] | None = None) -> None:
    """Runs every job of these bytes to its end: done, unless `states` says otherwise."""
    for kind in JOB_KINDS:
        state = (states or {}).get(kind, "done")
        assert await store.claim_job(sha256, kind, "jobs", 30) is not None, kind
        error = f"{kind} broke" if state == "failed" else None
        assert await store.finish_job(sha256, kind, "jobs", state, error), kind


async def all_deliveries(store: Store, state: str | None = None) -> list[Delivery]:
    return await store.deliveries(state=state, limit=1000)


def event_of(delivery: Delivery) -> dict:
    return json.loads(delivery.event_json)


async def pending_for(store: Store, image_id: str, sha256: str = SHA) -> list[Delivery]:
    """The image.ready deliveries of one finished upload."""
    await add_image(store, image_id, sha256)
    await finish_jobs(store, sha256)
    return [d for d in await all_deliveries(store) if d.image_id == image_id]


# -- what is written with the events ------------------------------------------------------------


async def test_an_image_that_becomes_ready_gets_one_delivery_per_url(make_store):
    store = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    await add_image(store, "img1")
    await finish_jobs(store, SHA, {"caption": "skipped"})
    # job.done and the other events get none; image.ready one per URL.
    deliveries = await all_deliveries(store)
    assert sorted(d.url for d in deliveries) == [HOOK_A, HOOK_B]
    for d in deliveries:
        assert (d.event_type, d.image_id) == ("image.ready", "img1")
        assert (d.state, d.attempts) == ("pending", 0)
        assert d.body is None and d.last_status is None and d.delivered_at is None
        event = event_of(d)
        assert event["type"] == "image.ready" and event["image_id"] == "img1"
        assert event["id"] == d.event_id and event["at"]
    assert len({d.delivery_id for d in deliveries}) == 2
    assert deliveries[0].event_id == deliveries[1].event_id


async def test_a_failed_job_gets_a_job_failed_delivery(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await add_image(store, "img1")
    await finish_jobs(store, SHA, {"exif": "failed"})
    by_type = {d.event_type: d for d in await all_deliveries(store)}
    assert set(by_type) == {"job.failed", "image.ready"}
    event = event_of(by_type["job.failed"])
    assert (event["kind"], event["state"], event["error"]) == ("exif", "failed", "exif broke")
    assert by_type["job.failed"].event_id < by_type["image.ready"].event_id


async def test_each_upload_of_the_same_bytes_gets_its_own_delivery(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await add_image(store, "first")
    await add_image(store, "second")
    await finish_jobs(store, SHA)
    assert sorted(d.image_id for d in await all_deliveries(store)) == ["first", "second"]


async def test_an_upload_whose_jobs_had_finished_is_ready_at_once(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "first")
    await add_image(store, "again")  # the same bytes: their jobs are long done
    assert {d.image_id for d in await all_deliveries(store)} == {"first", "again"}


async def test_no_url_no_deliveries(make_store):
    store = await make_store()
    await add_image(store, "img1")
    await finish_jobs(store, SHA, {"exif": "failed"})
    assert await all_deliveries(store) == []
    assert await store.claim_deliveries("r", 10, 30) == []


# -- claims and leases --------------------------------------------------------------------------


async def test_a_claim_takes_due_deliveries_and_counts_the_attempt(make_store):
    store = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    made = await pending_for(store, "img1")
    claimed = await store.claim_deliveries("r1", 10, 30)
    assert {d.delivery_id for d in claimed} == {d.delivery_id for d in made}
    assert all(d.state == "delivering" and d.attempts == 1 for d in claimed)
    # Held: nobody else gets them while the lease runs.
    assert await store.claim_deliveries("r2", 10, 30) == []
    assert len(await all_deliveries(store, "delivering")) == 2


async def test_a_claim_takes_no_more_than_its_limit(make_store):
    store = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    await pending_for(store, "img1")
    first = await store.claim_deliveries("r", 1, 30)
    second = await store.claim_deliveries("r", 5, 30)
    assert len(first) == 1 and len(second) == 1
    assert first[0].delivery_id != second[0].delivery_id


async def test_claims_are_exclusive_between_two_stores_on_one_database(make_store):
    one = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    other = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    for i in range(5):
        await pending_for(one, f"img{i}", f"{i:064x}")
    everything = {d.delivery_id for d in await all_deliveries(one)}
    assert len(everything) == 10
    claims: list[list[Delivery]] = [[], []]

    async def keep_claiming(store: Store, runner: str, out: list[Delivery]) -> None:
        while batch := await store.claim_deliveries(runner, 2, 30):
            out.extend(batch)
            await asyncio.sleep(0)

    await asyncio.gather(keep_claiming(one, "r1", claims[0]), keep_claiming(other, "r2", claims[1]))
    ids = [d.delivery_id for d in claims[0] + claims[1]]
    assert sorted(ids) == sorted(everything)  # each once, by one of the two


async def test_a_lapsed_lease_is_claimed_again_and_the_first_runner_loses_it(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "img1")
    (gone,) = await store.claim_deliveries("dead", 10, 0.01)  # its process died mid-send
    await asyncio.sleep(0.05)
    (again,) = await store.claim_deliveries("alive", 10, 30)
    assert again.delivery_id == gone.delivery_id and again.attempts == 2
    late = dict(state="delivered", status=200, error=None, body="{}")
    assert await store.finish_delivery(gone.delivery_id, "dead", **late) is False
    assert await store.finish_delivery(again.delivery_id, "alive", **late) is True


async def test_a_retry_is_not_claimed_before_it_is_due(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "img1")
    (d,) = await store.claim_deliveries("r", 10, 30)
    body = '{"first":true}'
    later = time.time() + 60
    assert await store.finish_delivery(
        d.delivery_id, "r", state="pending", status=500, error="HTTP 500", body=body, retry_at=later
    )
    assert await store.claim_deliveries("r", 10, 30) == []
    (listed,) = await all_deliveries(store, "pending")
    assert listed.next_attempt_at == later
    assert (listed.last_status, listed.last_error, listed.attempts) == (500, "HTTP 500", 1)


# -- finishing ----------------------------------------------------------------------------------


async def test_finish_keeps_the_first_body_so_a_retry_sends_the_same_bytes(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "img1")
    (d,) = await store.claim_deliveries("r", 10, 30)
    first = '{"event":{"id":1},"record":{"caption":null}}'
    assert await store.finish_delivery(
        d.delivery_id, "r", state="pending", status=None, error="ConnectError", body=first
    )
    (d,) = await store.claim_deliveries("r", 10, 30)
    assert d.body == first and d.attempts == 2
    assert await store.finish_delivery(
        d.delivery_id, "r", state="delivered", status=204, error=None, body='{"other":1}'
    )
    (done,) = await all_deliveries(store)
    assert done.body == first
    assert (done.state, done.last_status, done.last_error) == ("delivered", 204, None)
    assert done.delivered_at is not None
    # Delivered is final: no claim takes it again.
    assert await store.claim_deliveries("r", 10, 30) == []


async def test_the_body_kept_before_the_first_send_is_the_one_every_attempt_sends(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "img1")
    (d,) = await store.claim_deliveries("r", 10, 30)
    first = '{"event":{"id":1},"record":null}'
    assert await store.keep_delivery_body(d.delivery_id, "r", first) == first
    # Another attempt (after a crash: the record may have changed since) builds another body,
    # and sends the first.
    assert await store.keep_delivery_body(d.delivery_id, "r", '{"other":1}') == first
    assert await store.keep_delivery_body(d.delivery_id, "not-the-runner", first) is None


async def test_a_failed_delivery_keeps_its_last_status_and_error(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "img1")
    (d,) = await store.claim_deliveries("r", 10, 30)
    assert await store.finish_delivery(
        d.delivery_id, "r", state="failed", status=302, error="HTTP 302", body="{}"
    )
    (failed,) = await all_deliveries(store, "failed")
    assert (failed.last_status, failed.last_error, failed.delivered_at) == (302, "HTTP 302", None)
    assert await store.claim_deliveries("r", 10, 30) == []


async def test_requeue_sends_failed_deliveries_again_with_attempts_reset(make_store):
    store = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    await pending_for(store, "img1")
    one, two = await store.claim_deliveries("r", 10, 30)
    assert await store.finish_delivery(
        one.delivery_id, "r", state="failed", status=500, error="HTTP 500", body="{}"
    )
    assert await store.finish_delivery(
        two.delivery_id, "r", state="delivered", status=200, error=None, body="{}"
    )
    assert await store.requeue_deliveries() == 1
    assert await store.requeue_deliveries() == 0
    (again,) = await store.claim_deliveries("r", 10, 30)
    assert again.delivery_id == one.delivery_id and again.attempts == 1
    assert again.body == "{}"
    assert [d.delivery_id for d in await all_deliveries(store, "delivered")] == [two.delivery_id]


# -- listing ------------------------------------------------------------------------------------


async def test_the_listing_filters_by_state_newest_first(make_store):
    store = await make_store(webhook_urls=[HOOK_A])
    await pending_for(store, "old", SHA)
    await asyncio.sleep(0.002)  # created_at has milliseconds: a later one sorts after
    await pending_for(store, "new", SHA2)
    assert [d.image_id for d in await all_deliveries(store)] == ["new", "old"]
    (d,) = await store.claim_deliveries("r", 1, 30)
    assert d.image_id == "old"  # the oldest due goes first
    assert [x.image_id for x in await all_deliveries(store, "delivering")] == ["old"]
    assert [x.image_id for x in await all_deliveries(store, "pending")] == ["new"]
    assert await all_deliveries(store, "failed") == []


async def test_the_listing_pages_with_a_cursor_without_gaps_or_repeats(make_store):
    store = await make_store(webhook_urls=[HOOK_A, HOOK_B])
    for i in range(4):
        await pending_for(store, f"img{i}", f"{i:064x}")
    everything = await all_deliveries(store)
    assert len(everything) == 8
    seen: list[Delivery] = []
    before = None
    while page := await store.deliveries(state=None, limit=3, before=before):
        seen.extend(page)
        before = (page[-1].created_at, page[-1].delivery_id)
    assert [d.delivery_id for d in seen] == [d.delivery_id for d in everything]
    keys = [(d.created_at, d.delivery_id) for d in seen]
    assert keys == sorted(keys, reverse=True)
