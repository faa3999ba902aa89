"""Captions that cannot run here end in the job state `unavailable`, with the reason: counted apart
from `failed`, the image's record otherwise normal, said once in the log, and the bulk retry runs
them once captioning works. A tiny random BLIP is built at test time into the folder CAPTION_MODEL
names, after the failures, and loaded through the production loader."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import media_view
import pytest
from conftest import running_app
from job_helpers import original_key, upload, wait_jobs
from PIL import Image
from sanic_testing.testing import SanicASGITestClient
from tiny_blip import WORDS, build_tiny_blip

from models import NOT_INSTALLED

KINDS = ("thumbnail", "exif", "caption")
ENDED = ("done", "failed", "skipped", "unavailable")
# A failed model load is remembered this long; the tests wait past it before trying again.
RETRY_S = 0.05
UNAVAILABLE_LINE = "captions unavailable: "


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def unavailable(self) -> list[str]:
        return [line for line in self.lines if line.startswith(UNAVAILABLE_LINE)]


@pytest.fixture
def job_log() -> Iterator[Lines]:
    """The warnings of the jobs logger, caught on the logger itself: the app's own logging set-up
    (setup_logging) stops them from reaching the root logger that caplog listens on."""
    handler = Lines()
    logger = logging.getLogger("imgapi.jobs")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def jpeg(tmp_path: Path, colour: str) -> bytes:
    path = tmp_path / f"{colour}.jpg"
    Image.new("RGB", (320, 240), colour).save(path, quality=90)
    return path.read_bytes()


async def upload_image(client: SanicASGITestClient, tmp_path: Path, colour: str) -> str:
    return (await upload(client, jpeg(tmp_path, colour), f"{colour}.jpg"))["data"]["image_id"]


async def ended(client: SanicASGITestClient, image_id: str) -> dict:
    return await wait_jobs(client, image_id, KINDS, ENDED, within=60)


async def stats(client: SanicASGITestClient) -> dict:
    _, res = await client.get("/api/stats")
    assert res.status == 200, res.text
    return res.json


@pytest.mark.caption
async def test_a_missing_model_is_unavailable_until_it_is_there_then_the_retry_captions(
    make_settings, tmp_path: Path, job_log: Lines
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model = tmp_path / "models" / "my-blip"  # not there yet
    cfg = make_settings(CAPTION_MODEL=str(model), CAPTION_RETRY_SECONDS=str(RETRY_S))
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        ids = [await upload_image(client, tmp_path, colour) for colour in ("red", "blue")]
        for image_id in ids:
            rec = await ended(client, image_id)
            jobs = rec["data"]["jobs"]
            assert jobs["caption"] == {
                "state": "unavailable",
                "attempts": 1,  # no retries against a model that is not there
                "error": "caption model 'my-blip' cannot be loaded: no such directory",
            }
            # Nothing else about the image is touched: it does not look broken.
            assert jobs["thumbnail"]["state"] == jobs["exif"]["state"] == "done"
            assert rec["status"] == "success" and rec["error"] is None
            assert rec["data"]["metadata"]["caption"] is None
            assert rec["data"]["metadata"]["width"] == 320
            _, thumb = await client.get(f"/api/images/{image_id}/thumbnails/small")
            assert thumb.status == 200
        counts = await stats(client)
        assert counts["jobs"]["unavailable"] == 2
        assert counts["jobs"]["failed"] == counts["failed_jobs"] == 0
        assert counts["failed"] == 0 and counts["processing"] == 0
        assert counts["success_rate"] == "100.00%"
        # Said once for the process (the start-up preload, or the first job), not once per job,
        # with the reason and what to do.
        (line,) = job_log.unavailable()
        assert "'my-blip' cannot be loaded: no such directory" in line
        assert "POST /api/jobs/retry?kind=caption" in line
        assert str(tmp_path) not in line

        # An empty folder is not a model either; the one job retried gets the new reason.
        model.mkdir(parents=True)
        await asyncio.sleep(RETRY_S * 3)  # past the window in which the failed load is remembered
        _, res = await client.post(f"/api/images/{ids[0]}/jobs/caption/retry")
        assert res.status == 202, res.text
        job = (await ended(client, ids[0]))["data"]["jobs"]["caption"]
        assert job["state"] == "unavailable"
        assert "'my-blip' cannot be loaded: the folder has no config.json" in job["error"]
        assert str(tmp_path) not in job["error"]
        assert len(job_log.unavailable()) == 2  # a new reason is said once too
        assert "no config.json" in job_log.unavailable()[1]

        # The model arrives: the bulk retry (failed and unavailable by default) captions both.
        await asyncio.to_thread(build_tiny_blip, model)
        await asyncio.sleep(RETRY_S * 3)
        _, res = await client.post("/api/jobs/retry?kind=caption")
        assert res.status == 200, res.text
        assert res.json == {"kind": "caption", "state": "failed,unavailable", "retried": 2}
        for image_id in ids:
            rec = await ended(client, image_id)
            assert rec["data"]["jobs"]["caption"] == {"state": "done", "attempts": 1}
            caption = rec["data"]["metadata"]["caption"]
            assert isinstance(caption, str) and set(caption.split()) <= set(WORDS), caption
        counts = await stats(client)
        assert counts["jobs"]["unavailable"] == counts["jobs"]["failed"] == 0
        assert counts["jobs"]["done"] == 6 and counts["processing"] == 0
        assert len(job_log.unavailable()) == 2


async def test_captioning_not_installed_is_unavailable(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job_log: Lines
) -> None:
    # What the loader imports first; None in sys.modules makes `import torch` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch", None)
    cfg = make_settings(CAPTION_MODEL=str(tmp_path / "my-blip"))
    async with running_app(cfg) as app:
        client = SanicASGITestClient(app)
        image_id = await upload_image(client, tmp_path, "green")
        jobs = (await ended(client, image_id))["data"]["jobs"]
        assert jobs["caption"] == {"state": "unavailable", "attempts": 1, "error": NOT_INSTALLED}
        assert jobs["thumbnail"]["state"] == jobs["exif"]["state"] == "done"
        counts = await stats(client)
        assert counts["jobs"]["unavailable"] == 1 and counts["failed_jobs"] == 0
    (line,) = job_log.unavailable()
    assert NOT_INSTALLED in line


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_tiny_blip(tmp_path_factory.mktemp("unavailable-models") / "tiny-blip")


@pytest.mark.caption
async def test_an_image_the_captioner_cannot_decode_fails_its_caption_job(
    make_settings, tmp_path: Path, tiny_model: Path
) -> None:
    # Uploads check the image, so the original is spoilt in storage between the upload (no runner)
    # and the jobs (a runner started on the same database): one image's fault, not the model's.
    queued_only = make_settings(CAPTION_MODEL=str(tiny_model), WORKER="off")
    async with running_app(queued_only) as app:
        image_id = await upload_image(SanicASGITestClient(app), tmp_path, "white")
    spoilt = b"\xff\xd8\xff\xe0 not a JPEG any more" * 20
    media_view.write(queued_only, original_key(queued_only, image_id), spoilt)

    async with running_app(make_settings(CAPTION_MODEL=str(tiny_model))) as app:
        client = SanicASGITestClient(app)
        rec = await wait_jobs(client, image_id, ("caption",), ENDED, within=60)
        job = rec["data"]["jobs"]["caption"]
        assert job["state"] == "failed"
        assert job["error"].startswith("cannot decode image: ")
        assert str(tmp_path) not in job["error"] and "s3://" not in job["error"]
        counts = await stats(client)
        assert counts["jobs"]["unavailable"] == 0 and counts["jobs"]["failed"] >= 1
        # The model itself is fine: another image gets its caption.
        other = await upload_image(client, tmp_path, "black")
        rec = await wait_jobs(client, other, ("caption",), ENDED, within=60)
        assert rec["data"]["jobs"]["caption"]["state"] == "done"


async def test_the_bulk_retry_takes_one_state_or_a_list(make_settings, tmp_path: Path) -> None:
    # CAPTION_MODEL=none (the test default): the caption job is skipped.
    async with running_app(make_settings()) as app:
        client = SanicASGITestClient(app)
        image_id = await upload_image(client, tmp_path, "yellow")
        await ended(client, image_id)

        async def retry(query: str) -> tuple[int, dict]:
            _, res = await client.post(f"/api/jobs/retry?{query}")
            return res.status, res.json

        # Skipped jobs were skipped on purpose: the default leaves them alone.
        assert await retry("kind=caption") == (
            200,
            {"kind": "caption", "state": "failed,unavailable", "retried": 0},
        )
        assert await retry("kind=caption&state=unavailable,%20failed,unavailable") == (
            200,
            {"kind": "caption", "state": "unavailable,failed", "retried": 0},
        )
        assert await retry("kind=exif&state=failed&state=unavailable") == (
            200,
            {"kind": "exif", "state": "failed,unavailable", "retried": 0},
        )
        for bad in ("done", "", "failed,", "failed,done", "FAILED", "queued"):
            status, body = await retry(f"kind=caption&state={bad}")
            assert status == 400, bad
            assert body["error"].startswith("state must be one of failed, skipped, unavailable")
        assert await retry("kind=caption&state=skipped,unavailable") == (
            200,
            {"kind": "caption", "state": "skipped,unavailable", "retried": 1},
        )
