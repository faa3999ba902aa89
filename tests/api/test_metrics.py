"""GET /metrics through the app: uploads, failed uploads, finished jobs and caption batches move
their series; the jobs table is read at scrape time; HTTP series carry route names, never paths or
ids; who may scrape in keys mode. Several processes: tests/system/test_metrics_processes.py.

The instruments belong to the test process, not to one app: each test compares a scrape after
with one before."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import running_app, wait_for
from job_helpers import upload, wait_jobs
from metrics_helpers import Series, parse, value
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sanic import Sanic
from sanic_testing.testing import SanicASGITestClient

from imgapi_core import metrics
from imgapi_core import settings as settings_mod
from imgapi_core.access import scopes, tokens
from imgapi_core.store import JOB_KINDS, JOB_STATES, ApiKey
from imgapi_core.timestamps import now_iso


def jpeg(size: tuple[int, int] = (96, 64)) -> bytes:
    """A JPEG of its own bytes each time (a new sha256: its jobs run)."""
    out = io.BytesIO()
    colour = tuple(uuid.uuid4().bytes[:3])
    Image.new("RGB", size, colour).save(out, "JPEG", comment=uuid.uuid4().hex.encode())
    return out.getvalue()


async def scrape(client: SanicASGITestClient, headers: dict[str, str] | None = None) -> Series:
    _, res = await client.get("/metrics", headers=headers or {})
    assert res.status == 200, res.text
    assert res.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(res.text)


async def test_an_upload_a_failed_upload_and_finished_jobs_move_their_series(
    client: SanicASGITestClient,
) -> None:
    before = await scrape(client)
    data = jpeg()
    stored = await upload(client, data)
    await upload(client, b"not an image at all", "broken.jpg", status=415)
    image_id = stored["data"]["image_id"]
    await wait_jobs(client, image_id, kinds=("thumbnail", "exif"), states=("done",))

    after: Series = {}

    async def jobs_counted() -> bool:
        # The job's state is committed just before its run is counted: read until both agree.
        after.update(await scrape(client))
        return all(
            value(after, "imgapi_jobs_total", kind=kind, state="done")
            - value(before, "imgapi_jobs_total", kind=kind, state="done")
            == 1
            for kind in ("thumbnail", "exif")
        )

    await wait_for(jobs_counted)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imgapi_uploads_total", status="success") == 1
    assert delta("imgapi_uploads_total", status="failed") == 1
    assert delta("imgapi_upload_bytes_total") == len(data)
    assert delta("imgapi_upload_duration_seconds_count") == 2
    assert delta("imgapi_upload_duration_seconds_bucket", le="+Inf") == 2
    assert delta("imgapi_upload_duration_seconds_sum") > 0
    for kind in ("thumbnail", "exif"):
        assert delta("imgapi_job_duration_seconds_count", kind=kind) == 1
        assert delta("imgapi_jobs_total", kind=kind, state="failed") == 0
    # CAPTION_MODEL=none: the caption job is skipped when the upload is recorded; it never runs.
    assert delta("imgapi_jobs_total", kind="caption", state="skipped") == 0
    # The jobs table of this test's own database, read at the scrape: every kind and state.
    for kind in JOB_KINDS:
        for state in JOB_STATES:
            expected = (
                1
                if (kind, state)
                in {
                    ("thumbnail", "done"),
                    ("exif", "done"),
                    ("caption", "skipped"),
                }
                else 0
            )
            assert value(after, "imgapi_jobs", kind=kind, state=state) == expected, (kind, state)
    # The HTTP answers of those requests.
    assert delta("imgapi_http_requests_total", route="images.upload", method="POST", status="201")
    assert delta("imgapi_http_requests_total", route="images.upload", method="POST", status="415")


async def test_a_failed_job_is_counted_as_failed(app: Sanic, client: SanicASGITestClient) -> None:
    before = await scrape(client)

    async def gone(sha256: str) -> None:
        return None

    # The jobs find no original (as if deleted meanwhile): a permanent failure, no retries.
    app.ctx.store.original_of = gone
    record = await upload(client, jpeg())
    await wait_jobs(client, record["data"]["image_id"], states=("failed",))

    async def counted() -> bool:
        after = await scrape(client)
        return all(
            value(after, "imgapi_jobs_total", kind=kind, state="failed")
            - value(before, "imgapi_jobs_total", kind=kind, state="failed")
            == 1
            for kind in ("thumbnail", "exif")
        )

    await wait_for(counted)


def test_a_retried_run_is_counted_and_a_run_that_did_not_happen_is_not() -> None:
    def snapshot() -> Series:
        return parse(metrics.generate_latest(metrics.scrape_registry()).decode())

    before = snapshot()
    metrics.job_ran("exif", "retrying", 0.5)
    metrics.job_ran("exif", "not run: running", 0.0)  # another runner had claimed it
    after = snapshot()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imgapi_jobs_total", kind="exif", state="retried") == 1
    assert delta("imgapi_job_duration_seconds_count", kind="exif") == 1
    assert not any(dict(labels).get("state", "").startswith("not run") for _, labels in after)


async def test_labels_carry_route_names_never_paths_or_ids(client: SanicASGITestClient) -> None:
    record = await upload(client, jpeg())
    image_id = record["data"]["image_id"]
    for path in (
        f"/api/images/{image_id}",
        f"/api/images/{image_id}/thumbnails/small",
        f"/api/images/{image_id}/original",
        "/api/images/no-such-id",
        f"/no/such/route/{image_id}",
    ):
        await client.get(path)
    _, res = await client.get("/metrics")
    assert image_id not in res.text
    series = parse(res.text)
    routes = {
        dict(labels)["route"]
        for name, labels in series
        if name.startswith("imgapi_http_request") and "route" in dict(labels)
    }
    assert {"images.get_image", "media.get_thumbnail", "media.get_original", "unmatched"} <= routes
    assert all("/" not in route for route in routes), routes
    assert value(
        series, "imgapi_http_requests_total", route="images.get_image", method="GET", status="404"
    )
    assert value(
        series, "imgapi_http_requests_total", route="unmatched", method="GET", status="404"
    )
    assert value(series, "imgapi_http_request_duration_seconds_count", route="images.get_image")


async def test_an_unknown_method_is_one_label(client: SanicASGITestClient) -> None:
    await client.request("BREW", "/api/stats")
    series = await scrape(client)
    methods = {
        dict(labels).get("method") for name, labels in series if name.startswith("imgapi_http")
    }
    assert "BREW" not in methods


def test_caption_batches_are_observed() -> None:
    before = parse(metrics.generate_latest(metrics.scrape_registry()).decode())
    metrics.caption_batch(3)
    after = parse(metrics.generate_latest(metrics.scrape_registry()).decode())
    count = "imgapi_caption_batch_size_count"
    assert value(after, count) - value(before, count) == 1
    le4 = "imgapi_caption_batch_size_bucket"
    assert value(after, le4, le="4.0") - value(before, le4, le="4.0") == 1
    assert value(after, le4, le="2.0") - value(before, le4, le="2.0") == 0


@pytest.mark.caption
async def test_the_captioner_reports_its_batches(
    make_settings: Callable[..., settings_mod.Settings], tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_blip import build_tiny_blip

    model = build_tiny_blip(tmp_path / "tiny-blip")
    cfg = make_settings(CAPTION_MODEL=str(model), CAPTION_BATCH="4", CAPTION_MAX_WAIT_MS="200")
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        before = await scrape(client)
        records = [await upload(client, jpeg((64 + i, 48))) for i in range(3)]
        for record in records:
            await wait_jobs(
                client, record["data"]["image_id"], kinds=("caption",), states=("done",)
            )
        after = await scrape(client)
    count = "imgapi_caption_batch_size_count"
    total = "imgapi_caption_batch_size_sum"
    batches = value(after, count) - value(before, count)
    assert 1 <= batches <= 3
    assert value(after, total) - value(before, total) == 3  # every image in exactly one batch


# -- who may scrape -----------------------------------------------------------------------------


async def make_key(app: Sanic, name: str, *granted: str) -> str:
    key_id, token = tokens.new_key_token()
    await app.ctx.store.create_key(
        ApiKey(name, key_id, tokens.hash_token(token), granted, now_iso())
    )
    await app.ctx.guard.keys.reload()
    return token


@pytest.mark.parametrize(
    ("metrics_public", "caller", "status"),
    [
        ("0", "none", 401),
        ("0", scopes.READ, 403),
        ("0", scopes.UPLOAD, 403),
        ("0", scopes.ADMIN, 200),
        ("1", "none", 200),
        ("1", scopes.READ, 200),
    ],
)
async def test_who_may_scrape_in_keys_mode(
    make_settings: Callable[..., settings_mod.Settings],
    metrics_public: str,
    caller: str,
    status: int,
) -> None:
    cfg = make_settings(AUTH="keys", METRICS_PUBLIC=metrics_public)
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        headers = {}
        if caller != "none":
            headers = {"Authorization": f"Bearer {await make_key(app, caller, caller)}"}
        _, res = await client.get("/metrics", headers=headers)
        assert res.status == status, res.text
        if status == 401:
            assert res.headers["www-authenticate"].startswith("Bearer")
        # METRICS_PUBLIC opens /metrics only: the rest still needs its scope.
        _, stats = await client.get("/api/stats")
        assert stats.status == 401


async def test_open_mode_needs_no_key_for_metrics(client: SanicASGITestClient) -> None:
    _, res = await client.get("/metrics")
    assert res.status == 200


def test_a_route_cannot_be_made_public_by_a_setting_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        scopes.public_when("metrics_publik")


def test_the_multiprocess_folder_is_new_and_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(metrics.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "/somewhere/stale")
    with metrics.shared_folder() as folder:
        assert Path(folder).parent == tmp_path
        assert Path(folder).is_dir() and not any(Path(folder).iterdir())
        assert metrics.multiprocess_folder() == folder
    assert not Path(folder).exists()
    assert metrics.multiprocess_folder() == "/somewhere/stale"


def test_a_start_removes_the_folders_of_killed_services_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(metrics.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f"{metrics.FOLDER_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{metrics.FOLDER_PREFIX}{os.getppid()}-def"  # a process that runs
    # An earlier process's that had this pid (a restarted container): this one has none yet.
    earlier = tmp_path / f"{metrics.FOLDER_PREFIX}{os.getpid()}-ghi"
    other = tmp_path / "imgapi-metrics-notapid"
    for folder in (abandoned, live, earlier, other):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"")
    with metrics.shared_folder():
        pass
    assert not abandoned.exists() and not earlier.exists()
    assert live.is_dir() and other.is_dir()


async def test_the_exposition_has_the_documented_families_and_labels(
    client: SanicASGITestClient,
) -> None:
    await upload(client, jpeg())
    _, res = await client.get("/metrics")
    labels = {
        (family.name, family.type): (
            {key for sample in family.samples for key in sample.labels} - {"le"}
        )
        for family in text_string_to_metric_families(res.text)
    }
    assert labels == {
        ("imgapi_uploads", "counter"): {"status"},
        ("imgapi_upload_bytes", "counter"): set(),
        ("imgapi_upload_duration_seconds", "histogram"): set(),
        ("imgapi_jobs", "counter"): {"kind", "state"},
        ("imgapi_jobs", "gauge"): {"kind", "state"},
        ("imgapi_job_duration_seconds", "histogram"): {"kind"},
        ("imgapi_caption_batch_size", "histogram"): set(),
        ("imgapi_http_requests", "counter"): {"route", "method", "status"},
        ("imgapi_http_request_duration_seconds", "histogram"): {"route"},
    }
