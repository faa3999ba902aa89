"""Running failed jobs again: one image's job, or every failed job of a kind; the job goes back to
queued with its attempts reset and runs through the normal path. Admin only when keys are on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import multipart, running_app, wait_for
from job_helpers import photo_bytes, unique_jpeg
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import imaging
from imgapi_core.access import scopes, tokens
from imgapi_core.settings import Settings
from imgapi_core.store import ApiKey
from imgapi_core.timestamps import now_iso

SMALL = "orient1.jpg"


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[Sanic]:
    async with running_app(make_settings(JOB_MAX_ATTEMPTS="1")) as application:
        yield application


async def upload(client: SanicASGITestClient) -> dict[str, Any]:
    data = unique_jpeg(photo_bytes(SMALL))
    _, res = await client.post("/api/images", files=multipart(data, "photo.jpg"))
    assert res.status == 201, res.text
    return res.json["data"]


async def job(client: SanicASGITestClient, image_id: str, kind: str) -> dict[str, Any]:
    _, res = await client.get(f"/api/images/{image_id}")
    return res.json["data"]["jobs"][kind]


async def settled(client: SanicASGITestClient, image_id: str, kind: str) -> bool:
    return (await job(client, image_id, kind))["state"] in ("done", "failed")


async def all_settled(client: SanicASGITestClient, image_id: str) -> bool:
    _, res = await client.get(f"/api/images/{image_id}")
    return all(j["state"] not in ("queued", "running") for j in res.json["data"]["jobs"].values())


async def test_a_failed_job_runs_again_once_its_cause_is_fixed(app, client, monkeypatch):
    def broken(*_args: Any) -> Any:
        raise RuntimeError("exif reader crashed")

    monkeypatch.setattr(imaging, "extract_exif", broken)
    image_id = (await upload(client))["image_id"]
    await wait_for(lambda: settled(client, image_id, "exif"))
    failed = await job(client, image_id, "exif")
    assert failed["state"] == "failed" and "exif reader crashed" in failed["error"]

    monkeypatch.undo()  # the cause is fixed
    _, res = await client.post(f"/api/images/{image_id}/jobs/exif/retry")
    assert res.status == 202, res.text
    assert res.json == {"image_id": image_id, "kind": "exif", "state": "queued", "attempts": 0}
    await wait_for(lambda: settled(client, image_id, "exif"))
    assert await job(client, image_id, "exif") == {"state": "done", "attempts": 1}
    _, res = await client.get(f"/api/images/{image_id}")
    assert res.json["data"]["metadata"]["exif"] is not None
    await wait_for(lambda: all_settled(client, image_id))  # the thumbnail may still be running
    _, stats = await client.get("/api/stats")
    assert stats.json["processing"] == 0 and stats.json["failed_jobs"] == 0


async def test_only_failed_or_skipped_jobs_are_retried(app, client):
    image_id = (await upload(client))["image_id"]
    await wait_for(lambda: settled(client, image_id, "thumbnail"))
    _, res = await client.post(f"/api/images/{image_id}/jobs/thumbnail/retry")
    assert res.status == 409 and "thumbnail job is done" in res.json["error"]
    _, res = await client.post(f"/api/images/{image_id}/jobs/resize/retry")
    assert res.status == 400 and "kind must be one of" in res.json["error"]
    _, res = await client.post("/api/images/nope/jobs/exif/retry")
    assert res.status == 404
    # Captions are off in the tests: the caption job is skipped, and may be retried.
    _, res = await client.post(f"/api/images/{image_id}/jobs/caption/retry")
    assert res.status == 202


async def test_every_failed_job_of_a_kind_runs_again(app, client, monkeypatch):
    def broken(*_args: Any) -> Any:
        raise RuntimeError("exif reader crashed")

    monkeypatch.setattr(imaging, "extract_exif", broken)
    ids = [(await upload(client))["image_id"] for _ in range(3)]
    for image_id in ids:
        await wait_for(lambda image_id=image_id: settled(client, image_id, "exif"))
    _, stats = await client.get("/api/stats")
    assert stats.json["failed_jobs"] == 3

    monkeypatch.undo()
    _, res = await client.post("/api/jobs/retry?kind=thumbnail")
    assert res.status == 200 and res.json["retried"] == 0  # none of that kind failed
    _, res = await client.post("/api/jobs/retry?kind=exif&state=failed")
    assert res.status == 200 and res.json == {"kind": "exif", "state": "failed", "retried": 3}
    for image_id in ids:
        await wait_for(lambda image_id=image_id: settled(client, image_id, "exif"))
        assert (await job(client, image_id, "exif"))["state"] == "done"
    for bad in ("kind=exif&state=done", "kind=everything", "state=failed"):
        _, res = await client.post(f"/api/jobs/retry?{bad}")
        assert res.status == 400, bad


async def test_retrying_needs_the_admin_scope_in_keys_mode(make_settings):
    async with running_app(make_settings(AUTH="keys")) as app:
        client = SanicASGITestClient(app)
        made = {}
        for scope in (scopes.UPLOAD, scopes.ADMIN):
            key_id, token = tokens.new_key_token()
            key = ApiKey(scope, key_id, tokens.hash_token(token), (scope,), now_iso())
            await app.ctx.store.create_key(key)
            made[scope] = {"Authorization": f"Bearer {token}"}
        await app.ctx.guard.keys.reload()
        data = unique_jpeg(photo_bytes(SMALL))
        _, res = await client.post(
            "/api/images", files=multipart(data, "p.jpg"), headers=made[scopes.UPLOAD]
        )
        image_id = res.json["data"]["image_id"]
        url = f"/api/images/{image_id}/jobs/caption/retry"
        for headers, status in (({}, 401), (made[scopes.UPLOAD], 403), (made[scopes.ADMIN], 202)):
            _, res = await client.post(url, headers=headers)
            assert res.status == status, res.text
        _, res = await client.post("/api/jobs/retry?kind=caption", headers=made[scopes.UPLOAD])
        assert res.status == 403
