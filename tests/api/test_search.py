"""Search and filters over HTTP: GET /api/images with q, camera, taken_after, has_gps, sort...
on real corpus photos whose EXIF the jobs read; the Link header keeps the query; every bad value is
a 400 in the one error shape naming its parameter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import running_app
from job_helpers import photo_bytes, unique_jpeg, upload, wait_jobs
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core.settings import Settings

# Three camera photos with EXIF: a Nikon with GPS, a Fujifilm without, a Canon EOS 20D.
PHOTOS = ("nikon-p6000-gps.jpg", "fujifilm-x100f-seed.jpg", "canon-eos20d-8mp.jpg")


@pytest.fixture
async def photos_app(make_settings: Callable[..., Settings]) -> AsyncIterator[Sanic]:
    async with running_app(make_settings()) as app:
        client = SanicASGITestClient(app)
        app.ctx.ids = {}
        for name in PHOTOS:
            body = await upload(client, unique_jpeg(photo_bytes(name)), name=name)
            app.ctx.ids[name] = body["data"]["image_id"]
            await wait_jobs(client, body["data"]["image_id"])
        yield app


async def listed(client: SanicASGITestClient, **params: str) -> list[str]:
    _, res = await client.get("/api/images", params=params)
    assert res.status == 200, res.text
    return [r["data"]["original_name"] for r in res.json]


async def test_filters_and_words_over_http(photos_app: Sanic) -> None:
    client = SanicASGITestClient(photos_app)
    assert await listed(client, camera="nikon") == ["nikon-p6000-gps.jpg"]
    assert await listed(client, camera="FUJIFILM", has_gps="false") == ["fujifilm-x100f-seed.jpg"]
    assert await listed(client, has_gps="true") == ["nikon-p6000-gps.jpg"]
    assert await listed(client, q="fuji") == ["fujifilm-x100f-seed.jpg"]  # the make, a prefix
    assert await listed(client, q="eos 20") == ["canon-eos20d-8mp.jpg"]  # model words
    assert await listed(client, q="canon eos20d") == ["canon-eos20d-8mp.jpg"]  # its file name
    assert await listed(client, format="png") == []
    assert await listed(client, uploaded_after="2000-01-01") == list(reversed(PHOTOS))
    assert await listed(client, uploaded_before="2000-01-01") == []
    # Every photo's record says when it was taken; sorting by it is newest first.
    _, res = await client.get("/api/images", params={"sort": "taken"})
    taken = [r["data"]["metadata"]["taken_at"] for r in res.json]
    dated = [t for t in taken if t is not None]
    assert dated == sorted(dated, reverse=True) and taken[: len(dated)] == dated
    if dated:
        first = dated[-1]
        assert await listed(client, taken_after=first, sort="taken") == [
            r["data"]["original_name"] for r in res.json if r["data"]["metadata"]["taken_at"]
        ]


async def test_the_next_page_keeps_the_query(photos_app: Sanic) -> None:
    client = SanicASGITestClient(photos_app)
    seen: list[str] = []
    url = "/api/images?q=jpg&limit=1&sort=uploaded&format=jpeg"
    while url:
        _, res = await client.get(url)
        assert res.status == 200, res.text
        seen += [r["data"]["original_name"] for r in res.json]
        link = res.headers.get("link")
        if not link:
            break
        target = urlsplit(link[1 : link.index(">")])
        params = parse_qs(target.query)
        assert params["q"] == ["jpg"] and params["format"] == ["jpeg"]
        assert params["sort"] == ["uploaded"] and params["limit"] == ["1"]
        url = f"{target.path}?{target.query}"
    assert seen == list(reversed(PHOTOS))


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"q": "!!!"}, "q"),
        ({"q": "x" * 201}, "q"),
        ({"q": " ".join(f"w{i}" for i in range(17))}, "q"),
        ({"format": "bmp"}, "format"),
        ({"camera": " "}, "camera"),
        ({"has_gps": "yes"}, "has_gps"),
        ({"taken_after": "yesterday"}, "taken_after"),
        ({"taken_before": "2024-13-01"}, "taken_before"),
        ({"uploaded_after": "2024-05-01T25:00:00Z"}, "uploaded_after"),
        ({"uploaded_before": "²⁰²⁴-05-01"}, "uploaded_before"),
        ({"sort": "random"}, "sort"),
        ({"sort": "relevance"}, "sort"),  # needs q
        ({"status": "ok"}, "status"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
async def test_a_bad_value_is_a_400_naming_its_parameter(
    client: SanicASGITestClient, params: dict[str, str], named: str
) -> None:
    _, res = await client.get("/api/images", params=params)
    assert res.status == 400, res.text
    assert res.json["status"] == "failed" and named in res.json["error"], res.json


async def test_a_cursor_of_another_order_is_refused(photos_app: Sanic) -> None:
    client = SanicASGITestClient(photos_app)
    _, res = await client.get("/api/images", params={"limit": "1", "sort": "taken"})
    link = res.headers["link"]
    cursor = parse_qs(urlsplit(link[1 : link.index(">")]).query)["cursor"][0]
    _, res = await client.get("/api/images", params={"cursor": cursor, "sort": "uploaded"})
    assert res.status == 400 and "cursor" in res.json["error"]
