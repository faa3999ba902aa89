"""GET /api/images (listing, pagination, filters) and GET /api/images/{id}, through
sanic-testing's ASGI client."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from api_helpers import (
    RECORD_KEYS,
    XLSX,
    assert_error_shape,
    assert_no_server_path,
    distinct_jpeg,
    jpeg_bytes,
    next_link,
    no_worker,
    path_of,
    upload,
    upload_ok,
)

# -- listing ------------------------------------------------------------------------------------


async def walk_pages(client, first: str) -> tuple[list[dict], list]:
    """Follows Link rel=next from `first`; returns every record seen and every response."""
    seen: list[dict] = []
    responses = []
    url: str | None = first
    while url is not None:
        _, res = await client.get(url)
        assert res.status == 200, res.text
        responses.append(res)
        seen.extend(res.json)
        link = next_link(res)
        url = path_of(link) if link else None
        assert len(responses) < 50, "pagination does not end"
    return seen, responses


@no_worker
async def test_list_paginates_newest_first_with_link_and_status_filter(client, cfg):
    uploaded: list[tuple[str, str]] = []  # (image_id, status) in upload order
    for i in range(25):
        if i % 3 == 2:
            res = await upload(client, XLSX, f"sheet-{i}.xlsx", "application/octet-stream")
            assert res.status == 415
            uploaded.append((res.json["data"]["image_id"], "failed"))
        else:
            body = await upload_ok(client, distinct_jpeg(i), f"pic-{i}.jpg")
            uploaded.append((body["data"]["image_id"], "success"))

    _, res = await client.get("/api/images")
    assert res.status == 200 and next_link(res) is None
    everything = res.json
    assert [r["data"]["image_id"] for r in everything] == [i for i, _ in reversed(uploaded)]
    keys = [(r["data"]["processed_at"], r["data"]["image_id"]) for r in everything]
    assert keys == sorted(keys, reverse=True)
    for rec in everything:
        assert set(rec) == RECORD_KEYS

    seen, pages = await walk_pages(client, "/api/images?limit=10")
    assert [len(p.json) for p in pages] == [10, 10, 5]
    assert [next_link(p) is not None for p in pages] == [True, True, False]
    assert [r["data"]["image_id"] for r in seen] == [r["data"]["image_id"] for r in everything]
    assert seen == everything
    link = next_link(pages[0])
    assert link is not None and urlsplit(link).scheme in ("http", "https")
    assert parse_qs(urlsplit(link).query)["limit"] == ["10"]

    for status in ("success", "failed"):
        expected = [i for i, s in reversed(uploaded) if s == status]
        seen, pages = await walk_pages(client, f"/api/images?status={status}&limit=3")
        assert [r["data"]["image_id"] for r in seen] == expected
        assert {r["status"] for r in seen} == {status}
        for page in pages[:-1]:
            assert parse_qs(urlsplit(next_link(page)).query)["status"] == [status]
        assert next_link(pages[-1]) is None
    _, res = await client.get("/api/images?limit=9&status=failed")
    assert len(res.json) == 8 and next_link(res) is None  # exactly all: no next page


async def test_list_with_equal_timestamps_visits_every_record_once(app, client):
    store = app.ctx.store
    stamp = "2026-03-01T12:00:00.000Z"
    ids = [f"{i:024x}" for i in range(25)]
    for image_id in ids:
        await store.record_failure(
            image_id=image_id,
            original_name="x.xlsx",
            processed_at=stamp,
            start_time=stamp,
            error="file type not allowed",
        )
    seen, pages = await walk_pages(client, "/api/images?limit=10")
    assert len(pages) == 3
    assert [r["data"]["image_id"] for r in seen] == sorted(ids, reverse=True)


async def test_list_limit_default_is_100_and_max_is_1000(app, client):
    store = app.ctx.store
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(101):
        stamp = (base + timedelta(seconds=i)).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        await store.record_failure(
            image_id=f"{i:024x}",
            original_name=f"f{i}.xlsx",
            processed_at=stamp,
            start_time=stamp,
            error="nope",
        )
    _, res = await client.get("/api/images")
    assert res.status == 200 and len(res.json) == 100
    assert res.json[0]["data"]["image_id"] == f"{100:024x}"
    link = next_link(res)
    assert link is not None
    _, rest = await client.get(path_of(link))
    assert [r["data"]["image_id"] for r in rest.json] == [f"{0:024x}"]
    assert next_link(rest) is None
    _, res = await client.get("/api/images?limit=1000")
    assert res.status == 200 and len(res.json) == 101 and next_link(res) is None


async def test_list_bad_query_is_400_in_the_error_shape(client):
    await upload_ok(client, jpeg_bytes())
    for query in ("limit=0", "limit=1001", "limit=abc", "limit=-5", "limit=1.5", "status=done"):
        _, res = await client.get(f"/api/images?{query}")
        body = assert_error_shape(res, 400)
        assert body["data"] is None
    # A cursor that is not one this API wrote.
    for cursor in ("!!!", "abc", "bm90LWEtY3Vyc29y", "%00%ff", "fA"):
        _, res = await client.get(f"/api/images?cursor={cursor}")
        body = assert_error_shape(res, 400)
        assert "cursor" in body["error"], (cursor, body)


# -- reading one --------------------------------------------------------------------------------


@no_worker
async def test_get_by_id_returns_the_upload_record(client, cfg):
    data = jpeg_bytes((50, 70))
    body = await upload_ok(client, data, "portrait.jpg")
    image_id = body["data"]["image_id"]
    _, res = await client.get(f"/api/images/{image_id}")
    assert res.status == 200
    assert res.json == body
    assert_no_server_path(res, cfg)
