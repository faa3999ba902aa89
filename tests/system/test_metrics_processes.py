"""Metrics across real processes: `python imgapi.py --workers 2` (two server processes, WORKER=off)
and an `arq jobs.WorkerSettings` worker with WORKER_METRICS_PORT, on a private Redis. Uploads that
both server processes answered are all in one scrape of /metrics, whichever process answers it;
the worker's port serves the jobs it ran; the metrics folder is new at start and gone at stop."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import seeded_jpeg
from metrics_helpers import Series, parse, value
from procs import (
    Proc,
    RedisServer,
    free_port,
    settings_for,
    start_api,
    start_worker,
    wait_until,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from imgapi_core.metrics import MULTIPROC_ENV

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# Liveness bounds only: far above what the steps take.
WITHIN_S = 60
# Uploads until each server process has answered some; the kernel hands connections to either.
MAX_UPLOADS = 200


@dataclass
class Stack:
    api: Proc
    worker: Proc
    worker_metrics: str  # the worker's metrics URL


@pytest.fixture
def stack(tmp_path: Path, private_redis: RedisServer) -> Iterator[Stack]:
    env = settings_for(tmp_path, REDIS_URL=private_redis.url, WORKER="off")
    port = free_port()
    started: list[Proc] = []
    try:
        api = start_api(env, tmp_path / "api.log", workers=2)
        started.append(api)
        worker = start_worker({**env, "WORKER_METRICS_PORT": str(port)}, tmp_path / "worker.log")
        started.append(worker)
        yield Stack(api, worker, f"http://127.0.0.1:{port}/metrics")
    finally:
        for proc in started:
            proc.kill()
    for proc in started:
        assert "Traceback" not in proc.output(), proc.output()[-3000:]


def upload(api: Proc, data: bytes, name: str = "photo.jpg") -> httpx.Response:
    # A connection of its own each time, so either server process may accept it.
    return httpx.post(
        f"{api.url}/api/images", files={"file": (name, data, "image/jpeg")}, timeout=WITHIN_S
    )


def scrape(url: str) -> Series:
    res = httpx.get(url, timeout=WITHIN_S)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/plain")
    return parse(res.text)


def children_with_the_folder(api: Proc) -> dict[int, Path]:
    """The processes Sanic started for this API (its server processes, and a helper of its own
    that serves no request), each with the metrics folder it inherited."""
    found: dict[int, Path] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if parent != api.pid:
            continue
        env = dict(item.split("=", 1) for item in environ if "=" in item)
        if MULTIPROC_ENV in env:
            found[int(entry.name)] = Path(env[MULTIPROC_ENV])
    return found


def uploads_of(folder: Path, pid: int) -> float:
    """The successful uploads one process counted: its own files, read on their own."""
    with tempfile.TemporaryDirectory() as alone:
        for file in folder.glob(f"*_{pid}.db"):
            shutil.copy(file, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)
        series = parse(generate_latest(registry).decode())
    return value(series, "imgapi_uploads_total", status="success")


def test_one_scrape_counts_the_uploads_of_every_server_process_and_the_worker_its_jobs(
    stack: Stack,
) -> None:
    children = children_with_the_folder(stack.api)
    assert len(children) >= 2, children
    (folder,) = set(children.values())
    assert folder.is_dir()

    def answering() -> dict[int, float]:
        """The processes that counted uploads, and how many each."""
        counts = {pid: uploads_of(folder, pid) for pid in children}
        return {pid: n for pid, n in counts.items() if n}

    stored = 0
    while stored < MAX_UPLOADS:
        res = upload(stack.api, seeded_jpeg(stored))
        assert res.status_code == 201, res.text
        stored += 1
        if stored >= 4 and len(answering()) == 2:
            break
    per_process = answering()
    assert len(per_process) == 2, f"not two server processes answering uploads: {per_process}"
    assert sum(per_process.values()) == stored
    failed = upload(stack.api, b"not an image", "broken.jpg")
    assert failed.status_code == 415, failed.text

    # Whichever process answers a scrape, it counts every process's uploads.
    for _ in range(6):
        series = scrape(stack.api.url + "/metrics")
        assert value(series, "imgapi_uploads_total", status="success") == stored
        assert value(series, "imgapi_uploads_total", status="failed") == 1
        assert value(series, "imgapi_upload_duration_seconds_count") == stored + 1
        assert (
            value(
                series,
                "imgapi_http_requests_total",
                route="images.upload",
                method="POST",
                status="201",
            )
            == stored
        )

    # The worker runs the jobs (WORKER=off on the API): the jobs table, read by the API, says
    # when they are done; the worker's own port says it ran them.
    def all_done() -> bool:
        series = scrape(stack.api.url + "/metrics")
        return all(
            value(series, "imgapi_jobs", kind=kind, state="done") == stored
            for kind in ("thumbnail", "exif")
        )

    wait_until(all_done, WITHIN_S, "every thumbnail and EXIF job done")
    api_series = scrape(stack.api.url + "/metrics")
    worker_series = scrape(stack.worker_metrics)
    for kind in ("thumbnail", "exif"):
        assert value(worker_series, "imgapi_jobs_total", kind=kind, state="done") == stored
        assert value(worker_series, "imgapi_job_duration_seconds_count", kind=kind) == stored
        assert value(api_series, "imgapi_jobs_total", kind=kind, state="done") == 0
    # The worker serves its own process's metrics: no uploads, and not the jobs table.
    assert value(worker_series, "imgapi_uploads_total", status="success") == 0
    assert not any(name == "imgapi_jobs" for name, _ in worker_series)

    # A clean stop removes the folder; the next start gets a new one.
    assert stack.api.stop() == 0
    assert not folder.exists()
