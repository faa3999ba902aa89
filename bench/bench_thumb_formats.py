"""Thumbnail output formats: what the thumbnail job costs per image with THUMB_FORMATS=jpeg,
jpeg,webp and jpeg,webp,avif (every size of every format from one decode, as the job makes them),
and the bytes of each format's thumbnails for the corpus (median per size).

Run: python bench/bench_thumb_formats.py [--repeat N] [--json-out FILE]

Each configuration runs round-robin per image after a warm-up, so drift of a shared machine hits
them alike; times are thread CPU time and wall time of imaging.render_thumbnail_set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.repo_imports()

from imgapi_core import imaging  # noqa: E402

CONFIGS = {
    "jpeg": ("jpeg",),
    "jpeg,webp": ("jpeg", "webp"),
    "jpeg,webp,avif": ("jpeg", "webp", "avif"),
}


def photos() -> list[Path]:
    out = []
    for row in common.manifest("photos"):
        if row["expected"] == "valid":
            out.append(common.CORPUS / "photos" / row["file"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    paths = photos()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
    sizes: dict[tuple[str, str], list[int]] = {}
    for path in paths:
        for out_formats in CONFIGS.values():
            imaging.render_thumbnail_set(path, imaging.THUMB_SIZES, out_formats)  # warm-up
        for _ in range(args.repeat):
            for name, out_formats in CONFIGS.items():
                wall, thread = time.perf_counter(), time.thread_time()
                rendered = imaging.render_thumbnail_set(path, imaging.THUMB_SIZES, out_formats)
                times[name].append(time.perf_counter() - wall)
                cpu[name].append(time.thread_time() - thread)
        for fmt, by_size in rendered.items():
            for size, data in by_size.items():
                sizes.setdefault((fmt, size), []).append(len(data))

    base = statistics.mean(cpu["jpeg"])
    time_rows = [
        [
            name,
            round(1000 * statistics.mean(times[name]), 1),
            round(1000 * statistics.median(times[name]), 1),
            round(1000 * statistics.mean(cpu[name]), 1),
            round(statistics.mean(cpu[name]) / base, 2),
        ]
        for name in CONFIGS
    ]
    jpeg_median = {size: statistics.median(sizes[("jpeg", size)]) for size in imaging.THUMB_SIZES}
    size_rows = [
        [
            fmt,
            size,
            int(statistics.median(values)),
            round(statistics.median(values) / jpeg_median[size], 2),
        ]
        for (fmt, size), values in sorted(sizes.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
    report = {
        "benchmark": "thumbnail formats",
        "environment": common.environment(),
        "images": len(paths),
        "repeat": args.repeat,
        "time_ms": {
            row[0]: {"mean": row[1], "median": row[2], "cpu_mean": row[3]} for row in time_rows
        },
        "bytes_median": {
            f"{fmt}/{size}": int(statistics.median(v)) for (fmt, size), v in sizes.items()
        },
    }
    tables = [
        f"Thumbnail job per image ({len(paths)} corpus photos, {args.repeat} rounds)\n\n"
        + common.markdown_table(
            ["THUMB_FORMATS", "mean ms", "median ms", "mean CPU ms", "x jpeg (CPU)"], time_rows
        ),
        "Thumbnail bytes, median over the corpus\n\n"
        + common.markdown_table(["format", "size", "median bytes", "x jpeg"], size_rows),
    ]
    common.emit(report, tables, args.json_out)


if __name__ == "__main__":
    main()
