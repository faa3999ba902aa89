"""S3_REDIRECT=1: GETs of originals and thumbnails answer 302 to a presigned URL of the object
(on moto's S3 server), after the route's own access checks; a refused request is never
redirected, and HEAD and conditional requests are still answered by the API."""

from __future__ import annotations

import asyncio
import io
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from email.message import Message
from urllib.parse import urlsplit

import pytest
from conftest import running_app, seeded_jpeg, wait_for
from job_helpers import FINISHED, upload, wait_jobs
from PIL import Image
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient
from services import S3Server

from imgapi_core import settings as settings_mod
from imgapi_core.access import tokens
from imgapi_core.store import ApiKey
from imgapi_core.timestamps import now_iso

TTL = 600


@pytest.fixture
def s3_settings(
    make_settings: Callable[..., settings_mod.Settings], s3_server: S3Server, s3_bucket: str
) -> Callable[..., settings_mod.Settings]:
    def make(**env: str) -> settings_mod.Settings:
        values = {**s3_server.settings(s3_bucket), "S3_REDIRECT": "1", "SIGNED_URL_TTL": str(TTL)}
        return make_settings(**values, **env)

    return make


@pytest.fixture
async def app(s3_settings: Callable[..., settings_mod.Settings]) -> AsyncIterator[Sanic]:
    async with running_app(s3_settings()) as application:
        yield application


@pytest.fixture
def client(app: Sanic) -> SanicASGITestClient:
    return SanicASGITestClient(app)


def fetch(url: str) -> tuple[int, Message, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers, response.read()


async def follow(res) -> tuple[Message, bytes]:
    """Checks a 302 of the API and fetches where it points, as a browser would."""
    assert res.status == 302, res.text
    location = res.headers["location"]
    assert urlsplit(location).query and "X-Amz-Signature=" in location
    assert "etag" not in res.headers
    max_age = re.fullmatch(r"private, max-age=(\d+)", res.headers["cache-control"])
    assert max_age and 0 < int(max_age.group(1)) <= TTL, res.headers["cache-control"]
    status, headers, body = await asyncio.to_thread(fetch, location)
    assert status == 200
    return headers, body


async def test_originals_and_thumbnails_redirect_to_their_bytes(app, client):
    data = seeded_jpeg(1)
    body = await upload(client, data, "holiday photo.jpg")
    image_id = body["data"]["image_id"]
    await wait_jobs(client, image_id)

    _, res = await client.get(f"/api/images/{image_id}/original")
    headers, got = await follow(res)
    assert got == data
    assert headers["content-type"] == "image/jpeg"
    assert headers["content-disposition"] == (
        "inline; filename=\"holiday photo.jpg\"; filename*=UTF-8''holiday%20photo.jpg"
    )

    for size, box in (("small", 256), ("medium", 768)):
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/{size}")
        assert res.headers["vary"] == "Accept"
        headers, got = await follow(res)
        assert headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(got))
        assert image.format == "JPEG" and max(image.size) <= box

    _, res = await client.get(
        f"/api/images/{image_id}/thumbnails/small", headers={"accept": "image/webp,*/*"}
    )
    headers, got = await follow(res)
    assert headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got)).format == "WEBP"


async def test_head_and_conditional_requests_are_answered_by_the_api(app, client):
    data = seeded_jpeg(2)
    image_id = (await upload(client, data))["data"]["image_id"]
    await wait_jobs(client, image_id)
    # A presigned URL is signed for GET: a HEAD is answered here, with the GET's headers.
    _, res = await client.head(f"/api/images/{image_id}/original")
    assert res.status == 200 and res.headers["content-length"] == str(len(data))
    etag = res.headers["etag"]
    _, res = await client.get(f"/api/images/{image_id}/original", headers={"if-none-match": etag})
    assert res.status == 304 and "location" not in res.headers
    _, res = await client.get(f"/api/images/{image_id}/thumbnails/small")
    thumb_etag = (await client.head(f"/api/images/{image_id}/thumbnails/small"))[1].headers["etag"]
    _, res = await client.get(
        f"/api/images/{image_id}/thumbnails/small", headers={"if-none-match": thumb_etag}
    )
    assert res.status == 304


async def test_a_thumbnail_not_made_yet_is_made_before_the_redirect(s3_settings):
    async with running_app(s3_settings(WORKER="off")) as app:
        client = SanicASGITestClient(app)
        image_id = (await upload(client, seeded_jpeg(3)))["data"]["image_id"]
        _, res = await client.get(f"/api/images/{image_id}/thumbnails/small")
        _, got = await follow(res)
        assert Image.open(io.BytesIO(got)).format == "JPEG"


async def test_missing_images_are_404_not_redirects(app, client):
    _, res = await client.get("/api/images/nosuchimage/original")
    assert res.status == 404 and "location" not in res.headers
    image_id = (await upload(client, seeded_jpeg(4)))["data"]["image_id"]
    await wait_jobs(client, image_id)
    await app.ctx.media.delete([f"originals/{image_id}.jpg"])
    _, res = await client.get(f"/api/images/{image_id}/original")
    assert res.status == 404 and "location" not in res.headers


# -- keys mode: the checks come first ------------------------------------------------------------


async def make_key(app: Sanic, *granted: str) -> str:
    key_id, token = tokens.new_key_token()
    await app.ctx.store.create_key(
        ApiKey("redirect-test", key_id, tokens.hash_token(token), granted, now_iso())
    )
    await app.ctx.guard.keys.reload()
    return token


async def test_a_request_without_access_is_refused_not_redirected(s3_settings):
    async with running_app(s3_settings(AUTH="keys")) as app:
        client = SanicASGITestClient(app)
        token = await make_key(app, "read", "upload")
        auth = {"Authorization": f"Bearer {token}"}
        data = seeded_jpeg(5)
        _, res = await client.post(
            "/api/images",
            files={"file": ("keys.jpg", data, "image/jpeg")},
            headers=auth,
        )
        assert res.status == 201, res.text
        record = res.json
        image_id = record["data"]["image_id"]

        async def thumbnail_job_finished() -> bool:
            _, res = await client.get(f"/api/images/{image_id}", headers=auth)
            return res.json["data"]["jobs"]["thumbnail"]["state"] in FINISHED

        await wait_for(thumbnail_job_finished)

        for path in (
            f"/api/images/{image_id}/original",
            f"/api/images/{image_id}/thumbnails/small",
        ):
            _, res = await client.get(path)
            assert res.status == 401 and "location" not in res.headers
            _, res = await client.get(path, headers={"Authorization": "Bearer nope"})
            assert res.status == 401 and "location" not in res.headers
            _, res = await client.get(path, headers=auth)
            assert res.status == 302
        _, res = await client.get(f"/api/images/{image_id}/original", headers=auth)
        assert (await follow(res))[1] == data

        # A signed URL of the record: redirected, for no longer than it still has to live.
        signed = record["thumbnails"]["small"]
        assert "sig=" in signed or "signature=" in signed.lower()
        parts = urlsplit(signed)
        _, res = await client.get(f"{parts.path}?{parts.query}")
        headers, got = await follow(res)
        assert headers["content-type"] == "image/jpeg" and got[:2] == b"\xff\xd8"
        tampered = parts.query.replace("exp=", "exp=9")
        _, res = await client.get(f"{parts.path}?{tampered}")
        assert res.status in (401, 403) and "location" not in res.headers
