"""GET /api/stats, /healthz and the OpenAPI document, through sanic-testing's ASGI client."""

from __future__ import annotations

from api_helpers import (
    XLSX,
    assert_no_server_path,
    distinct_jpeg,
    jobs_finished,
    jpeg_bytes,
    no_worker,
    upload,
    upload_ok,
)
from conftest import wait_for

# -- stats --------------------------------------------------------------------------------------


async def test_stats_counts_rate_and_average_time(client, cfg):
    _, res = await client.get("/api/stats")
    assert res.status == 200
    assert (res.json["total"], res.json["failed"]) == (0, 0)
    ids = []
    for i in range(3):
        ids.append((await upload_ok(client, distinct_jpeg(i), f"{i}.jpg"))["data"]["image_id"])
    res = await upload(client, XLSX, "x.xlsx", "application/octet-stream")
    assert res.status == 415
    for image_id in ids:
        await wait_for(lambda image_id=image_id: jobs_finished(client, image_id))
    _, res = await client.get("/api/stats")
    stats = res.json
    assert stats["total"] == 4
    assert stats["failed"] == 1
    assert stats["success_rate"] == "75.00%"
    average = stats["average_processing_time_seconds"]
    assert isinstance(average, (int, float)) and not isinstance(average, bool)
    assert 0 < average < 60
    assert round(average, 3) == average  # milliseconds, not more
    assert stats["queued_jobs"] == 0 and stats["failed_jobs"] == 0
    assert stats["jobs"]["done"] == 6 and stats["jobs"]["skipped"] == 3
    assert stats["jobs"]["queued"] == 0 and stats["jobs"]["failed"] == 0
    assert_no_server_path(res, cfg)


@no_worker
async def test_stats_show_queued_jobs(client):
    await upload_ok(client, jpeg_bytes())
    _, res = await client.get("/api/stats")
    assert res.json["queued_jobs"] == 2 and res.json["jobs"]["queued"] == 2
    assert res.json["average_processing_time_seconds"] == 0  # nothing finished yet


# -- health and docs ----------------------------------------------------------------------------


async def test_healthz_reports_the_database(client):
    _, res = await client.get("/healthz")
    assert res.status == 200
    assert res.json["database"] == "ok" and res.json["status"] == "ok"
    assert "redis" not in res.json  # no REDIS_URL: nothing to check


async def test_healthz_is_503_when_the_database_cannot_be_written(app, client, monkeypatch):
    """Readable is not healthy: a read-only database answers reads and fails every upload.
    (The store's own test makes a file read-only for real; this one checks the route.)"""
    from imgapi_core.store import NotWritable

    async def read_only() -> None:
        raise NotWritable("the database is read-only: attempt to write a readonly database")

    monkeypatch.setattr(app.ctx.store, "check_writable", read_only)
    _, res = await client.get("/healthz")
    assert res.status == 503
    assert res.json["status"] == "unavailable"
    assert "read-only" in res.json["database"]


async def test_openapi_document_lists_every_contract_path(client):
    _, res = await client.get("/docs/openapi.json")
    assert res.status == 200
    doc = res.json
    assert doc["openapi"].startswith("3.")
    # path -> method -> the answers the contract gives (at least these are documented)
    expected = {
        "/api/images": {"get": {"200", "400"}, "post": {"201", "400", "413", "415"}},
        "/api/images/{image_id}": {"get": {"200", "404"}, "delete": {"204", "404"}},
        "/api/images/{image_id}/thumbnails/{size}": {"get": {"200", "304", "400", "404"}},
        "/api/images/{image_id}/original": {"get": {"200", "404"}},
        "/api/stats": {"get": {"200"}},
        "/healthz": {"get": {"200"}},
    }
    for path, methods in expected.items():
        assert path in doc["paths"], path
        for method, codes in methods.items():
            operation = doc["paths"][path].get(method)
            assert operation is not None, (path, method)
            documented = set(operation.get("responses", {}))
            assert codes <= documented, (path, method, sorted(documented))
    _, ui = await client.get("/docs")
    assert ui.status == 200 and ui.headers["content-type"].startswith("text/html")
