"""?wait=SECONDS on GET /api/images/{id} and POST /api/images: the answer comes once every job of
the image is finished (data.ready), woken by the job's own event rather than by polling.

WORKER=off without Redis: nothing runs the jobs but the test, which claims and finishes them
through the store as a runner would, so each wake-up is caused by a known commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import multipart, running_app
from job_helpers import SMALL_PHOTO, photo_bytes, unique_jpeg, upload
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core.settings import Settings

RUNNER = "test:1:aa"
# A liveness bound, far above the few milliseconds a wake-up takes: without the wake-up the
# waiter would sit out its whole wait (60 s).
WOKEN_WITHIN_S = 10


@pytest.fixture
async def idle_app(make_settings: Callable[..., Settings]) -> AsyncIterator[Sanic]:
    async with running_app(make_settings(WORKER="off")) as app:
        yield app


async def finish(app: Sanic, sha256: str, kind: str, state: str = "done") -> None:
    store = app.ctx.store
    assert await store.claim_job(sha256, kind, RUNNER, 30.0) is not None
    assert await store.finish_job(sha256, kind, RUNNER, state, "bad" if state == "failed" else None)


async def test_a_waiter_is_answered_when_the_last_job_finishes(idle_app: Sanic) -> None:
    client = SanicASGITestClient(idle_app)
    body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
    image_id, sha256 = body["data"]["image_id"], body["data"]["metadata"]["sha256"]
    assert body["data"]["ready"] is False

    waiter = asyncio.create_task(client.get(f"/api/images/{image_id}?wait=60"))
    await finish(idle_app, sha256, "thumbnail")
    await asyncio.sleep(0.2)
    assert not waiter.done()  # one job of two finished: still waiting
    await finish(idle_app, sha256, "exif", "failed")
    _, res = await asyncio.wait_for(waiter, WOKEN_WITHIN_S)
    assert res.status == 200
    data = res.json["data"]
    assert data["ready"] is True
    assert data["jobs"]["thumbnail"]["state"] == "done"
    assert data["jobs"]["exif"] == {"state": "failed", "attempts": 1, "error": "bad"}


async def test_the_time_running_out_answers_the_record_not_ready(idle_app: Sanic) -> None:
    client = SanicASGITestClient(idle_app)
    body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
    _, res = await client.get(f"/api/images/{body['data']['image_id']}?wait=0.3")
    assert res.status == 200
    assert res.json["data"]["ready"] is False
    assert res.json["data"]["jobs"]["thumbnail"]["state"] == "queued"


async def test_a_ready_or_failed_upload_answers_at_once(idle_app: Sanic) -> None:
    client = SanicASGITestClient(idle_app)
    body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
    image_id, sha256 = body["data"]["image_id"], body["data"]["metadata"]["sha256"]
    await finish(idle_app, sha256, "thumbnail")
    await finish(idle_app, sha256, "exif")
    _, res = await asyncio.wait_for(client.get(f"/api/images/{image_id}?wait=60"), WOKEN_WITHIN_S)
    assert res.json["data"]["ready"] is True

    _, res = await client.post(
        "/api/images", files=multipart(b"not an image", "x.jpg", "image/jpeg")
    )
    failed_id = res.json["data"]["image_id"]
    _, res = await asyncio.wait_for(client.get(f"/api/images/{failed_id}?wait=60"), WOKEN_WITHIN_S)
    assert res.status == 200 and res.json["data"]["ready"] is True


async def test_an_image_deleted_while_waited_for_answers_404(idle_app: Sanic) -> None:
    client = SanicASGITestClient(idle_app)
    body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
    image_id = body["data"]["image_id"]
    waiter = asyncio.create_task(client.get(f"/api/images/{image_id}?wait=60"))
    await asyncio.sleep(0.2)
    _, res = await client.delete(f"/api/images/{image_id}")
    assert res.status == 204
    _, res = await asyncio.wait_for(waiter, WOKEN_WITHIN_S)
    assert res.status == 404


async def test_an_unknown_image_answers_404_at_once(idle_app: Sanic) -> None:
    client = SanicASGITestClient(idle_app)
    _, res = await asyncio.wait_for(client.get("/api/images/nope?wait=60"), WOKEN_WITHIN_S)
    assert res.status == 404


async def test_an_upload_with_wait_answers_once_its_jobs_ran(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_app(make_settings()) as app:  # in-process jobs
        client = SanicASGITestClient(app)
        data = unique_jpeg(photo_bytes(SMALL_PHOTO))
        _, res = await client.post(
            "/api/images?wait=30", files=multipart(data, "photo.jpg", "image/jpeg")
        )
    assert res.status == 201, res.text
    record = res.json["data"]
    assert record["ready"] is True
    assert record["jobs"]["thumbnail"]["state"] == "done"
    assert record["metadata"]["exif"]["Make"] == "FUJIFILM"
    assert res.json["delete_token"]


@pytest.mark.parametrize(
    "value", ["-1", "61", "60.5", "abc", "1e3", "nan", "inf", "²", "1,5", " 5", "0x10"]
)
async def test_a_bad_wait_is_a_400_naming_it(idle_app: Sanic, value: str) -> None:
    client = SanicASGITestClient(idle_app)
    body = await upload(client, unique_jpeg(photo_bytes(SMALL_PHOTO)))
    _, res = await client.get(f"/api/images/{body['data']['image_id']}", params={"wait": value})
    assert res.status == 400, res.text
    assert res.json["status"] == "failed" and "wait" in res.json["error"]


async def test_an_upload_with_a_bad_wait_is_refused_and_not_recorded(idle_app: Sanic) -> None:
    client = SanicASGITestClient(idle_app)
    data = unique_jpeg(photo_bytes(SMALL_PHOTO))
    _, res = await client.post(
        "/api/images?wait=999", files=multipart(data, "photo.jpg", "image/jpeg")
    )
    assert res.status == 400 and "wait" in res.json["error"]
    _, res = await client.get("/api/stats")
    assert res.json["total"] == 0
