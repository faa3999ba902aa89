"""Prometheus metrics: the instruments, the multiprocess set-up, and the exposition.

Instruments are built on first use in each process, never at import. Recording is a call to one
of the functions below (uploads from the pipeline, jobs from the runtime, HTTP answers from the
app's middleware, caption batches from the captioner's callback).

Several server processes (`python imgapi.py --workers N`) share one folder,
PROMETHEUS_MULTIPROC_DIR, where prometheus_client keeps each process's values in files; a scrape
of any process then sums them all. prometheus_client reads that variable once, when it is first
imported, so it must be in the environment before the server processes start
(`shared_folder()`, around Sanic's process manager). Without it (one process, the tests' ASGI
client, an arq worker) each process serves its own values.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from imgapi_core.store import JOB_KINDS, JOB_STATES

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from imgapi_core.store import Store

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format: every Prometheus reads it, and it is what generate_latest writes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

FINISHED = ("done", "failed", "skipped", "unavailable")
# Runtime.run's answer for a job that failed and was queued again with a backoff.
RETRYING, RETRIED = "retrying", "retried"
# The route label of a request that matched no route: its path is the client's, and paths
# (ids, probes) would make a series per request.
UNMATCHED = "unmatched"
# Methods beyond these are one label value: a client may send any token as a method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Uploads run up to MAX_UPLOAD_BYTES over a slow link; captions on a CPU take seconds.
UPLOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Instruments:
    registry: CollectorRegistry
    uploads: Counter
    upload_bytes: Counter
    upload_duration: Histogram
    jobs: Counter
    job_duration: Histogram
    caption_batch: Histogram
    http_requests: Counter
    http_duration: Histogram


@functools.cache
def instruments() -> Instruments:
    """This process's instruments, built on first use. In their own registry rather than the
    library's global one: single-process answers show ours only, and in multiprocess mode a
    registry holding them must not be scraped beside the collector (duplicates)."""
    # Counters and histograms would each carry a `_created` series in one process and none in
    # multiprocess mode: left out, so the answer has one shape whichever mode runs.
    disable_created_metrics()
    registry = CollectorRegistry()
    made = Instruments(
        registry=registry,
        uploads=Counter(
            "imgapi_uploads",
            "Uploads recorded, by outcome (failed: refused with a 4xx or 507, or interrupted)",
            ["status"],
            registry=registry,
        ),
        upload_bytes=Counter(
            "imgapi_upload_bytes",
            "Bytes of the uploads stored (successful ones)",
            registry=registry,
        ),
        upload_duration=Histogram(
            "imgapi_upload_duration_seconds",
            "Seconds from an upload request's handler (before its body is read) to its recorded"
            " outcome: the answer, less any ?wait=",
            buckets=UPLOAD_BUCKETS,
            registry=registry,
        ),
        jobs=Counter(
            "imgapi_jobs",
            "Job runs by kind and final state (retried: failed and queued again)",
            ["kind", "state"],
            registry=registry,
        ),
        job_duration=Histogram(
            "imgapi_job_duration_seconds",
            "Seconds one job run took, from its claim to its recorded state",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=registry,
        ),
        caption_batch=Histogram(
            "imgapi_caption_batch_size",
            "Images captioned in one generate call",
            buckets=BATCH_BUCKETS,
            registry=registry,
        ),
        http_requests=Counter(
            "imgapi_http_requests",
            "HTTP answers by route name, method and status",
            ["route", "method", "status"],
            registry=registry,
        ),
        http_duration=Histogram(
            "imgapi_http_request_duration_seconds",
            "Seconds from a request's arrival to its answer's headers, by route name",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        ),
    )
    # Every series an alert may read exists from the start, at 0: a rate over a series that
    # appears only with its first event misses that event.
    for status in ("success", "failed"):
        made.uploads.labels(status=status)
    for kind in JOB_KINDS:
        made.job_duration.labels(kind=kind)
        for state in (*FINISHED, RETRIED):
            made.jobs.labels(kind=kind, state=state)
    return made


# -- recording -----------------------------------------------------------------------------------


def upload_recorded(stored: bool, size_bytes: int, seconds: float) -> None:
    made = instruments()
    made.uploads.labels(status="success" if stored else "failed").inc()
    if stored:
        made.upload_bytes.inc(size_bytes)
    made.upload_duration.observe(seconds)


def job_ran(kind: str, state: str, seconds: float) -> None:
    """One run of a job that was claimed: its final state, or "retrying". Other answers (not
    claimed: another runner has it, or it is gone) ran nothing and are not counted."""
    if state == RETRYING:
        state = RETRIED
    elif state not in FINISHED:
        return
    made = instruments()
    made.jobs.labels(kind=kind, state=state).inc()
    made.job_duration.labels(kind=kind).observe(seconds)


def caption_batch(size: int) -> None:
    instruments().caption_batch.observe(size)


def http_answered(route_name: str | None, method: str, status: int, seconds: float | None) -> None:
    """`route_name` is Sanic's "app.blueprint.name" (the label drops the app), None for a request
    that matched no route."""
    route = route_name.split(".", 1)[-1] if route_name else UNMATCHED
    made = instruments()
    made.http_requests.labels(
        route=route, method=method if method in METHODS else "other", status=str(status)
    ).inc()
    if seconds is not None:
        made.http_duration.labels(route=route).observe(seconds)


# -- the jobs table, read at scrape time ---------------------------------------------------------


def jobs_family(counts: Mapping[tuple[str, str], int]) -> GaugeMetricFamily:
    """imgapi_jobs{kind,state}: every kind and state, 0 where there is none."""
    family = GaugeMetricFamily(
        "imgapi_jobs", "Jobs in the jobs table by kind and state", labels=["kind", "state"]
    )
    kinds = dict.fromkeys([*JOB_KINDS, *(kind for kind, _ in counts)])
    states = dict.fromkeys([*JOB_STATES, *(state for _, state in counts)])
    for kind in kinds:
        for state in states:
            family.add_metric([kind, state], counts.get((kind, state), 0))
    return family


# -- exposition ------------------------------------------------------------------------------------


class _Families:
    """A collector of metric families computed before the scrape (the jobs table)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def multiprocess_folder() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def scrape_registry(extra: Iterable[Metric] = ()) -> CollectorRegistry:
    """A registry for one scrape: every process's values (multiprocess mode) or this process's,
    plus `extra`. Built per scrape, as prometheus_client's multiprocess guide asks."""
    registry = CollectorRegistry()
    folder = multiprocess_folder()
    if folder:
        instruments()  # this process's series at 0 are in the folder too
        MultiProcessCollector(registry, path=folder)
    else:
        registry.register(instruments().registry)
    registry.register(_Families(extra))
    return registry


async def exposition(store: Store) -> bytes:
    """The API's /metrics answer: the instruments of every server process and the jobs table."""
    registry = scrape_registry([jobs_family(await store.job_counts())])
    # Reading every process's files and writing the text is file I/O and parsing: off the loop.
    return await asyncio.to_thread(generate_latest, registry)


class MetricsServer:
    """An arq worker's own metrics on a port of their own (it has no HTTP server): its job
    runs, durations and caption batches, served from a thread by prometheus_client."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        # One registry for every scrape: it holds no instrument itself, only the collectors,
        # which read the current values each time.
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, addr=host, registry=scrape_registry())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# -- the multiprocess folder -----------------------------------------------------------------------


FOLDER_PREFIX = "imgapi-metrics-"


@contextlib.contextmanager
def shared_folder() -> Iterator[str]:
    """For the time of a multi-process server: a new, empty PROMETHEUS_MULTIPROC_DIR in the
    environment its processes inherit, removed afterwards. New at every start, as the library
    requires: files left by an earlier run would be summed into this one's counters. An inherited
    value is replaced for that reason too."""
    parent = Path(tempfile.gettempdir())
    remove_abandoned(parent)
    # The manager's pid in the name: a later start can tell a folder whose service was killed.
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent)
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned(parent: Path) -> None:
    """Removes the folders of services that were killed before they could remove their own (a
    SIGKILL, an OOM kill), found by the pid in their names. A folder of a live process, or of a
    process this one may not signal (another user's), is kept. One with this process's own pid
    is an earlier one's (a restarted container often gets the same pid): this one has none yet."""
    for folder in parent.glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as another user
        return True
    return True
