"""Shared helpers for the HTTP benchmarks: corpus lookup, byte-unique JPEG bodies, multipart
framing, percentiles, JSON + markdown output, and the server's process-group RSS and CPU.

Imported by the bench scripts with the bench folder on sys.path (`import common`). Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("IMGAPI_CORPUS", REPO.parent / "shared" / "corpus"))
LOCK = "/tmp/imgapi-bench.lock"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def repo_imports() -> None:
    """Puts the repository root and tests/ (procs.py) on sys.path for a script run by path."""
    for folder in (REPO, REPO / "tests"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


# -- the corpus ----------------------------------------------------------------------------------


def manifest(name: str) -> list[dict[str, str]]:
    folder = CORPUS / name
    path = folder / "MANIFEST.tsv"
    if not path.is_file():
        sys.exit(f"corpus folder {folder} is absent (set IMGAPI_CORPUS)")
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:] if line]


def largest_photos(count: int, suffix: str = ".jpg") -> list[Path]:
    """The `count` largest valid photos of the corpus (by file size), largest first."""
    rows = [
        r for r in manifest("photos") if r["expected"] == "valid" and r["file"].endswith(suffix)
    ]
    rows.sort(key=lambda r: int(r["bytes"]), reverse=True)
    return [CORPUS / "photos" / r["file"] for r in rows[:count]]


# -- request bodies ------------------------------------------------------------------------------


def jpeg_comment(payload: bytes) -> bytes:
    """A JPEG COM segment (FF FE, big-endian length including itself) carrying `payload`."""
    if len(payload) > 65533:
        raise ValueError("a COM segment holds at most 65533 bytes")
    return b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload


def unique_jpeg(jpeg: bytes | memoryview, payload: bytes) -> list[bytes | memoryview]:
    """The JPEG with a COM segment inserted right after SOI: still valid, new bytes, new SHA-256.

    Returned as pieces (SOI, COM, the rest as a view) so no copy of the image is made.
    """
    view = memoryview(jpeg)
    if bytes(view[:2]) != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    return [b"\xff\xd8", jpeg_comment(payload), view[2:]]


class Multipart:
    """One `file` part, framed once; `pieces(content)` wraps any content without copying it."""

    def __init__(self, filename: str, content_type: str = "image/jpeg") -> None:
        self.boundary = "imgapi-bench-" + secrets.token_hex(12)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.head = (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()

    def pieces(self, content: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        return [self.head, *content, self.tail]


def total_length(pieces: Sequence[bytes | memoryview]) -> int:
    return sum(len(p) for p in pieces)


# -- statistics and output -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in seconds, in milliseconds (0.1 ms)."""
    if not seconds:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(percentile(ms, 50), 1),
        "p95": round(percentile(ms, 95), 1),
        "p99": round(percentile(ms, 99), 1),
        "max": round(max(ms), 1),
        "mean": round(sum(ms) / len(ms), 1),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; columns holding only numbers are right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, float):
            return f"{value:g}" if abs(value) >= 1e5 else f"{value:.1f}".rstrip("0").rstrip(".")
        return str(value)

    def numeric(column: int) -> bool:
        values = [row[column] for row in rows]
        return bool(values) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        )

    rule = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def emit(report: dict[str, Any], tables: Sequence[str], json_out: Path | None) -> None:
    """The JSON document first (machine-readable), then the markdown tables."""
    text = json.dumps(report, indent=2)
    print(text)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    for table in tables:
        print()
        print(table)
    sys.stdout.flush()


# -- the server's processes ----------------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (the API and any worker processes it forked)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(entry.path, "stat").read_text()
            # Field 5 (pgrp) comes after the ")" that closes the command name.
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(entry.name))
    return pids


_VMRSS = re.compile(rb"VmRSS:\s+(\d+) kB")


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status", "rb") as f:
                match = _VMRSS.search(f.read())
            if match:
                total += int(match.group(1)) * 1024
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """user + system CPU time of the live processes (children that already exited not counted)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


class RssSampler:
    """Samples the summed VmRSS of a process group every `interval` s in a background thread.

    `peak()` is the highest sample since the last `reset()`; the group's member list is refreshed
    every second (Sanic's worker processes appear after start-up).
    """

    def __init__(self, pgid: int, interval: float = 0.02) -> None:
        self.pgid = pgid
        self.interval = interval
        self._pids = group_pids(pgid)
        self._peak = 0
        self._last = 0
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed > 1.0:
                self._pids = group_pids(self.pgid) or self._pids
                refreshed = now
            value = rss_bytes(self._pids)
            with self._lock:
                self._last = value
                self._peak = max(self._peak, value)
                self._count += 1
            self._stop.wait(self.interval)

    def reset(self) -> None:
        with self._lock:
            self._peak = self._last
            self._count = 0

    def peak(self) -> int:
        with self._lock:
            return self._peak

    def samples(self) -> int:
        with self._lock:
            return self._count

    def current(self) -> int:
        return rss_bytes(self._pids)


def mib(value: float) -> float:
    return round(value / 2**20, 1)


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Wall and this process's CPU seconds over a block: {"wall": .., "cpu": ..} after it."""
    out: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall"] = time.perf_counter() - wall
        out["cpu"] = time.process_time() - cpu


def service_settings(workdir: Path, **extra: str) -> dict[str, str]:
    """Settings env for a benchmarked API on its own database and media folder under workdir."""
    repo_imports()
    import procs  # tests/procs.py

    return procs.settings_for(workdir, **{"REDIS_URL": "", **extra})


_SLOW = re.compile(r"Executing (.*) took (\d+(?:\.\d+)?) seconds")
_ADDRESSES = re.compile(r" at 0x[0-9a-f]+|name='Task-\d+'")


def slow_callbacks(log_text: str) -> list[tuple[float, str]]:
    """asyncio debug mode's "Executing <handle> took X seconds" lines: (ms, handle), slowest
    first, with object addresses and task numbers removed so that repeats look alike."""
    found = [
        (round(float(m.group(2)) * 1000, 1), _ADDRESSES.sub("", m.group(1)))
        for m in _SLOW.finditer(log_text)
    ]
    return sorted(found, reverse=True)
