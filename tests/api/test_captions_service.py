"""Captions through the service: upload, the caption job, the record. A tiny random BLIP is built
at test time and loaded by path through the production loader (models/loader.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import multipart, wait_for
from PIL import Image
from sanic_testing.testing import SanicASGITestClient
from tiny_blip import WORDS, build_tiny_blip

from imgapi_core import app as imgapi_app
from imgapi_core.background import Jobs

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.caption


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("service-models") / "tiny-blip")


def jpeg(colour: str, tmp_path: Path) -> bytes:
    path = tmp_path / f"{colour}.jpg"
    Image.new("RGB", (320, 240), colour).save(path, quality=90)
    return path.read_bytes()


async def upload_all(client: SanicASGITestClient, bodies: list[bytes]) -> list[str]:
    ids = []
    for index, body in enumerate(bodies):
        _, res = await client.post("/api/images", files=multipart(body, f"p{index}.jpg"))
        assert res.status == 201, res.text
        ids.append(res.json["data"]["image_id"])
    return ids


async def job_of(client: SanicASGITestClient, image_id: str, kind: str) -> dict:
    _, res = await client.get(f"/api/images/{image_id}")
    return res.json["data"]["jobs"][kind]


@pytest.mark.parametrize("cfg_env", [{}], ids=["tiny-blip"])
async def test_an_upload_gets_a_caption_in_its_record(
    make_settings, tiny_model: Path, tmp_path: Path, cfg_env: dict
) -> None:
    cfg = make_settings(CAPTION_MODEL=str(tiny_model), CAPTION_BATCH="4", CAPTION_MAX_WAIT_MS="200")
    app = imgapi_app.create_app(cfg, own_resources=False)
    await imgapi_app.open_resources(app)
    try:
        client = SanicASGITestClient(app)
        colours = ["black", "white", "red", "blue"]
        ids = await upload_all(client, [jpeg(c, tmp_path) for c in colours])

        async def all_captioned() -> bool:
            states = [(await job_of(client, i, "caption"))["state"] for i in ids]
            assert "failed" not in states, states
            return all(s == "done" for s in states)

        await wait_for(all_captioned, within=60)
        for image_id in ids:
            _, res = await client.get(f"/api/images/{image_id}")
            caption = res.json["data"]["metadata"]["caption"]
            assert isinstance(caption, str) and caption.strip()
            assert set(caption.split()) <= set(WORDS), caption  # the tiny model's vocabulary
        captioner = app.ctx.jobs.runtime.captioner
        # Loaded once for the process, and the four concurrent jobs shared generate calls.
        assert captioner.loads == 1
        assert captioner.generate_calls < len(ids)
        # The thumbnail and EXIF jobs ran as usual beside the captions.
        for image_id in ids:
            assert (await job_of(client, image_id, "thumbnail"))["state"] == "done"
            assert (await job_of(client, image_id, "exif"))["state"] == "done"
    finally:
        await imgapi_app.close_resources(app)


async def test_a_hub_model_that_is_not_downloaded_ends_the_caption_job_unavailable_and_clearly(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty cache: the model is not there and nothing may be fetched.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = make_settings(CAPTION_MODEL="Salesforce/blip-image-captioning-base")
    app = imgapi_app.create_app(cfg, own_resources=False)
    await imgapi_app.open_resources(app)
    try:
        client = SanicASGITestClient(app)
        (image_id,) = await upload_all(client, [jpeg("red", tmp_path)])

        async def caption_finished() -> bool:
            state = (await job_of(client, image_id, "caption"))["state"]
            return state in ("done", "failed", "unavailable")

        # Failing fast is the point; how fast is a benchmark's business, not an assertion's.
        await wait_for(caption_finished, within=30)
        job = await job_of(client, image_id, "caption")
        assert job["state"] == "unavailable"  # not "failed": nothing is wrong with the image
        assert job["attempts"] == 1  # no retries against a model that is not there
        assert "blip-image-captioning-base" in job["error"]
        assert "download" in job["error"]  # says what to do about it
        # Uploads and the other jobs are unaffected.
        await wait_for(
            lambda: _both_done(client, image_id),
            within=20,
        )
        _, res = await client.post("/api/images", files=multipart(jpeg("blue", tmp_path), "b.jpg"))
        assert res.status == 201
    finally:
        await imgapi_app.close_resources(app)


async def _both_done(client: SanicASGITestClient, image_id: str) -> bool:
    states = [(await job_of(client, image_id, k))["state"] for k in ("thumbnail", "exif")]
    return states == ["done", "done"]


async def test_captions_off_records_the_job_as_skipped(
    client: SanicASGITestClient, tmp_path
) -> None:
    # The default test settings have CAPTION_MODEL=none.
    (image_id,) = await upload_all(client, [jpeg("white", tmp_path)])
    job = await job_of(client, image_id, "caption")
    assert job["state"] == "skipped"
    assert "CAPTION_MODEL=none" in job["error"]
    await asyncio.sleep(0)


def test_jobs_facade_skips_captions_only_when_off(make_settings, tiny_model: Path) -> None:
    on = Jobs(make_settings(CAPTION_MODEL=str(tiny_model)), store=None, media=None)  # type: ignore[arg-type]
    off = Jobs(make_settings(CAPTION_MODEL="none"), store=None, media=None)  # type: ignore[arg-type]
    assert on.initial_states()["caption"] == ("queued", None)
    assert off.initial_states()["caption"][0] == "skipped"
