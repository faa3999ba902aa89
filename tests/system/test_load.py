"""Load: 1000 uploads at concurrency 64 against a real API process, mixed valid photos,
duplicates, hostile files and oversize bodies; afterwards the database, the files on disk and
the stats must all agree with what the clients were answered.

Mode 1 (no Redis, jobs run in the API process): the test needs nothing but Python, and the API
is under upload load and job load at once. Mode 3 under load is in test_faults.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import corpus_folder, manifest
from PIL import Image, ImageDraw
from procs import Proc, db_rows, start_api

pytestmark = [pytest.mark.slow]

TOTAL = 1000
CONCURRENCY = 64
MAX_UPLOAD = 256 * 1024
# Photos and PNGs from the corpus small enough for the cap; they go through the real decoders.
CORPUS_PHOTOS = (
    "cmyk-adobe.jpg",
    "fujifilm-x100f-seed.jpg",
    "nikon-p6000-gps.jpg",
    "png-gray8.png",
    "png-palette-trns.png",
)


@dataclass
class Upload:
    kind: str  # valid | duplicate | hostile | oversize
    name: str
    data: bytes
    content_type: str


@dataclass
class Answer:
    upload: Upload
    status: int
    body: dict
    seconds: float


def small_image(rng: random.Random, fmt: str) -> bytes:
    size = (rng.randrange(48, 320), rng.randrange(48, 320))
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.ellipse((x, y, x + 30, y + 20), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG")
    else:
        exif = Image.Exif()
        exif[0x010F] = "imgapi-load"  # Make
        image.save(buffer, "JPEG", quality=85, exif=exif)
    return buffer.getvalue()


def workload(seed: int = 6) -> list[Upload]:
    """560 new valid images (5 from the corpus), 200 duplicates of them, 140 hostile files,
    100 bodies over the cap, shuffled so that duplicates race their originals."""
    rng = random.Random(seed)
    photos = corpus_folder("photos")
    hostile = corpus_folder("hostile")
    valid = [
        Upload("valid", name, (photos / name).read_bytes(), _mime(name)) for name in CORPUS_PHOTOS
    ]
    while len(valid) < 560:
        fmt = "png" if len(valid) % 4 == 0 else "jpeg"
        name = f"gen-{len(valid)}.{'png' if fmt == 'png' else 'jpg'}"
        valid.append(Upload("valid", name, small_image(rng, fmt), _mime(name)))
    duplicates = [
        Upload("duplicate", f"dup-{i}-{u.name}", u.data, u.content_type)
        for i, u in enumerate(rng.choices(valid, k=200))
    ]
    hostile_files = [
        row["file"]
        for row in manifest("hostile")
        if int(row["bytes"]) < MAX_UPLOAD // 2 and row["expected"] == "reject"
    ]
    bad = [
        Upload("hostile", name, (hostile / name).read_bytes(), "application/octet-stream")
        for name in hostile_files
    ]
    made_up = [
        ("random.jpg", rng.randbytes(2000), "image/jpeg"),
        ("script.png", b"#!/bin/sh\necho hi\n", "image/png"),
        ("page.html", b"<html><script>alert(1)</script></html>", "text/html"),
        ("photo.gif", b"GIF89a" + rng.randbytes(100), "image/gif"),
    ]
    while len(bad) < 140:
        name, data, ctype = made_up[len(bad) % len(made_up)]
        bad.append(Upload("hostile", name, data, ctype))
    oversize = []
    for i in range(100):
        size = rng.randrange(MAX_UPLOAD + 1, 2 * MAX_UPLOAD)
        oversize.append(
            Upload("oversize", f"big-{i}.jpg", b"\xff\xd8\xff" + rng.randbytes(size), "image/jpeg")
        )
    uploads = valid + duplicates + bad + oversize
    assert len(uploads) == TOTAL
    rng.shuffle(uploads)
    return uploads


def _mime(name: str) -> str:
    return "image/png" if name.endswith(".png") else "image/jpeg"


async def send_all(url: str, uploads: list[Upload]) -> tuple[list[Answer], float]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(http: httpx.AsyncClient, upload: Upload) -> Answer:
        async with gate:
            began = time.monotonic()
            files = {"file": (upload.name, upload.data, upload.content_type)}
            try:
                res = await http.post("/api/images", files=files)
            except httpx.HTTPError as exc:
                # No answer at all: recorded as status 0 so that the test names the cause.
                return Answer(upload, 0, {"error": repr(exc)}, time.monotonic() - began)
            return Answer(upload, res.status_code, res.json(), time.monotonic() - began)

    began = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        answers = await asyncio.gather(*(one(http, u) for u in uploads))
    return answers, time.monotonic() - began


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Proc, dict[str, str]]]:
    env = {
        "DB_PATH": str(tmp_path / "data" / "imgapi.db"),
        "MEDIA_DIR": str(tmp_path / "media"),
        "CAPTION_MODEL": "none",
        "UPLOAD_RATE_LIMIT": "0",
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "SWEEP_SECONDS": "0.5",
        "ARQ_QUEUE": f"imgapi-test:{uuid.uuid4().hex}",
        "LOG_LEVEL": "warning",
    }
    proc = start_api(env, tmp_path / "api.log")
    try:
        yield proc, env
    finally:
        proc.kill()


async def test_mixed_load(api: tuple[Proc, dict[str, str]]) -> None:
    proc, env = api
    uploads = workload()
    answers, seconds = await send_all(proc.url, uploads)
    db = env["DB_PATH"]

    unanswered = [a for a in answers if a.status == 0]
    assert not unanswered, f"{len(unanswered)} uploads got no answer, e.g. " + ", ".join(
        f"{a.upload.kind} {len(a.upload.data)} B: {a.body['error']}" for a in unanswered[:3]
    )
    assert not [a for a in answers if a.status >= 500], "server errors"
    by_kind: dict[str, Counter] = {}
    for a in answers:
        by_kind.setdefault(a.upload.kind, Counter())[a.status] += 1
    assert set(by_kind["valid"]) == {201}, by_kind
    assert set(by_kind["duplicate"]) == {201}, by_kind
    assert set(by_kind["oversize"]) == {413}, by_kind
    assert all(400 <= s < 500 or s == 201 for s in by_kind["hostile"]), by_kind
    for a in answers:
        if a.status >= 400:
            assert a.body["status"] == "failed" and a.body["error"], a.body

    ok = [a for a in answers if a.status == 201]
    failed = [a for a in answers if a.status != 201]

    # Every answer is one images row, and the successes are exactly the files under originals/.
    images = db_rows(db, "SELECT image_id, error, metadata_sha256, image_path FROM images")
    assert len(images) == len(answers)
    assert {r["image_id"] for r in images} == {a.body["data"]["image_id"] for a in answers}
    assert sum(r["error"] is None for r in images) == len(ok)
    originals = {p.stem: p for p in (Path(env["MEDIA_DIR"]) / "originals").iterdir()}
    assert set(originals) == {a.body["data"]["image_id"] for a in ok}

    # Stored bytes are the bytes sent, and their SHA-256 is the one recorded and answered.
    stored_sha = {r["image_id"]: r["metadata_sha256"] for r in images}
    for a in ok:
        sent = hashlib.sha256(a.upload.data).hexdigest()
        image_id = a.body["data"]["image_id"]
        assert a.body["data"]["metadata"]["sha256"] == sent
        assert stored_sha[image_id] == sent
        assert hashlib.sha256(originals[image_id].read_bytes()).hexdigest() == sent
    distinct = {hashlib.sha256(a.upload.data).hexdigest() for a in ok}
    assert len(db_rows(db, "SELECT sha256 FROM metadata")) == len(distinct)

    # Every job ends done, or failed with its error.
    began = time.monotonic()
    open_jobs = "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
    while db_rows(db, open_jobs)[0][0]:
        assert time.monotonic() - began < 90, "jobs still open 90 s after the last upload"
        await asyncio.sleep(0.2)
    drained = time.monotonic() - began
    jobs = db_rows(db, "SELECT kind, state, error FROM jobs")
    assert len(jobs) == 3 * len(distinct)
    for job in jobs:
        assert job["state"] in ("done", "failed", "skipped"), dict(job)
        if job["state"] == "failed":
            assert job["error"], dict(job)
    job_states = Counter(f"{j['kind']}:{j['state']}" for j in jobs)

    # The stats agree with the answers.
    async with httpx.AsyncClient(base_url=proc.url) as http:
        stats = (await http.get("/api/stats")).json()
    assert stats["total"] == len(answers)
    assert stats["failed"] == len(failed)
    assert stats["success_rate"] == f"{len(ok) / len(answers) * 100:.2f}%"
    assert stats["processing"] == 0 and stats["queued_jobs"] == 0
    assert stats["failed_jobs"] == sum(j["state"] == "failed" for j in jobs)

    latencies = sorted(a.seconds for a in answers)
    print(
        "RELIABILITY "
        + json.dumps(
            {
                "test": "load",
                "mode": 1,
                "uploads": len(answers),
                "concurrency": CONCURRENCY,
                "seconds": round(seconds, 2),
                "uploads_per_s": round(len(answers) / seconds, 1),
                "p50_s": round(statistics.median(latencies), 3),
                "p95_s": round(latencies[int(len(latencies) * 0.95)], 3),
                "max_s": round(latencies[-1], 3),
                "jobs_drained_after_last_upload_s": round(drained, 2),
                "answers": {k: dict(v) for k, v in by_kind.items()},
                "jobs": dict(job_states),
            },
            sort_keys=True,
        )
    )
