"""Thumbnail speed: imaging.render_thumbnails against pyvips and the seed's naive Pillow code.

Run: python bench/bench_thumbnails.py [--repeat N] [--min-megapixels M] [--json-out FILE]

For every corpus photo of at least --min-megapixels, each method makes the small (256) and medium
(768) JPEG q85 thumbnails into bytes. Methods run round-robin per image, after one warm-up each, so
file-cache and CPU-frequency drift hit them alike. Prints JSON, then a markdown table. pyvips is a
bench-only dependency (pip install pyvips pyvips-binary).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgapi_core import imaging  # noqa: E402  (needs the repo root on sys.path when run as a script)

CORPUS = Path(os.environ.get("IMGAPI_CORPUS", REPO.parent / "shared" / "corpus"))
BOXES = tuple(sorted(imaging.THUMB_SIZES.values(), reverse=True))


def ours(path: Path) -> list[bytes]:
    return list(imaging.render_thumbnails(path).values())


def naive(path: Path) -> list[bytes]:
    """The seed's way: full decode, convert, thumbnail() twice from the full image, optimize."""
    from PIL import Image

    with Image.open(path) as im:
        full = im.convert("RGB")
    out = []
    for box in BOXES:
        thumb = full.copy()
        thumb.thumbnail((box, box))
        buffer = io.BytesIO()
        thumb.save(buffer, "JPEG", quality=85, optimize=True)
        out.append(buffer.getvalue())
    return out


def vips_twice(path: Path) -> list[bytes]:
    """pyvips thumbnail() from the file for each size (shrink-on-load each time)."""
    import pyvips

    return [
        pyvips.Image.thumbnail(str(path), box, height=box, size="down").jpegsave_buffer(
            Q=85, keep="none"
        )
        for box in BOXES
    ]


def vips_chain(path: Path) -> list[bytes]:
    """pyvips thumbnail() for the largest size, the smaller ones from it (one decode)."""
    import pyvips

    current = pyvips.Image.thumbnail(str(path), BOXES[0], height=BOXES[0], size="down")
    out = []
    for box in BOXES:
        if box != BOXES[0]:
            current = current.thumbnail_image(box, height=box, size="down")
        current = current.copy_memory()
        out.append(current.jpegsave_buffer(Q=85, keep="none"))
    return out


def photos(min_pixels: float) -> list[tuple[Path, int]]:
    folder = CORPUS / "photos"
    lines = (folder / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    chosen = []
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t"), strict=True))
        # pillow13 column: "ok: JPEG RGB 4000x3000; exif ..."
        dims = row["pillow13"].split(";")[0].split()[-1]
        width, height = (int(n) for n in dims.split("x"))
        if width * height >= min_pixels:
            chosen.append((folder / row["file"], width * height))
    return chosen


def timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per image and method")
    parser.add_argument(
        "--min-megapixels",
        type=float,
        default=7.9,
        help="smallest photo to include (7.9 keeps the iPhone 6 Plus's '8 MP', 7.99 MP)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    try:
        import pyvips
    except ImportError:
        sys.exit("pyvips is needed for this benchmark: pip install pyvips pyvips-binary")

    load_before = list(os.getloadavg())
    chosen = photos(args.min_megapixels * 1e6)
    if not chosen:
        sys.exit(f"no photos of {args.min_megapixels} MP or more under {CORPUS / 'photos'}")

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench")

    def in_pool(fn: Callable[[Path], object]) -> Callable[[Path], tuple[float, float]]:
        # Timed inside the worker thread, as the service would run it.
        return lambda path: pool.submit(timed, lambda: fn(path)).result()

    def in_main(fn: Callable[[Path], object]) -> Callable[[Path], tuple[float, float]]:
        return lambda path: timed(lambda: fn(path))

    methods: dict[str, Callable[[Path], tuple[float, float]]] = {
        "ours (pool thread)": in_pool(ours),
        "pyvips thumbnail x2 (pool thread)": in_pool(vips_twice),
        "pyvips thumbnail + thumbnail_image (pool thread)": in_pool(vips_chain),
        "naive (main thread)": in_main(naive),
        "naive (pool thread)": in_pool(naive),
    }

    per_image: dict[str, dict[str, dict[str, float]]] = {name: {} for name in methods}
    for path, _pixels in chosen:
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        for run in methods.values():
            run(path)  # warm-up: file cache, plugin imports, libvips start
        for _ in range(args.repeat):
            for name, run in methods.items():
                samples[name].append(run(path))
        for name, runs in samples.items():
            per_image[name][path.name] = {
                "wall_ms": statistics.median(wall for wall, _ in runs),
                "cpu_ms": statistics.median(cpu for _, cpu in runs),
            }
        print(f"  done {path.name}", file=sys.stderr)
    pool.shutdown()

    summary = {}
    for name, images in per_image.items():
        walls = [v["wall_ms"] for v in images.values()]
        cpus = [v["cpu_ms"] for v in images.values()]
        summary[name] = {
            "mean_ms": round(statistics.fmean(walls), 1),
            "median_ms": round(statistics.median(walls), 1),
            "mean_cpu_ms": round(statistics.fmean(cpus), 1),
        }
    ours_mean = summary["ours (pool thread)"]["mean_ms"]
    for row in summary.values():
        row["ratio_to_ours"] = round(row["mean_ms"] / ours_mean, 2)

    for row in summary.values():
        row["cpu_ratio_to_ours"] = round(
            row["mean_cpu_ms"] / summary["ours (pool thread)"]["mean_cpu_ms"], 2
        )

    vips_names = (
        "pyvips thumbnail x2 (pool thread)",
        "pyvips thumbnail + thumbnail_image (pool thread)",
    )
    vips_best = min(vips_names, key=lambda name: summary[name]["mean_ms"])
    # Wall time is what a caller waits for; CPU time is steadier on a machine shared with other
    # work, so the goals are given for both.
    goals: dict[str, object] = {"best_pyvips": vips_best}
    for unit, key in (("wall", "mean_ms"), ("cpu", "mean_cpu_ms")):
        ours_value = summary["ours (pool thread)"][key]
        vips = summary[vips_best][key]
        naive_main = summary["naive (main thread)"][key] / ours_value
        naive_pool = summary["naive (pool thread)"][key] / ours_value
        goals[unit] = {
            "ours_over_pyvips": round(ours_value / vips, 2),
            "ours_within_1.2x_of_pyvips": ours_value <= 1.2 * vips,
            "naive_main_over_ours": round(naive_main, 2),
            "naive_pool_over_ours": round(naive_pool, 2),
            "4.5x_vs_naive_main": naive_main >= 4.5,
            "4.5x_vs_naive_pool": naive_pool >= 4.5,
        }

    from PIL import __version__ as pillow_version

    report = {
        "images": [{"file": p.name, "megapixels": round(px / 1e6, 2)} for p, px in chosen],
        "repeat": args.repeat,
        "sizes": imaging.THUMB_SIZES,
        "versions": {
            "python": platform.python_version(),
            "pillow": pillow_version,
            "libvips": ".".join(str(pyvips.version(i)) for i in range(3)),
        },
        "cpus": os.cpu_count(),
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "summary": summary,
        "goals": goals,
        "per_image": per_image,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")

    print()
    print(f"{len(chosen)} photos >= {args.min_megapixels} MP, median of {args.repeat} runs each")
    print()
    print(
        "| method | mean ms/image | median ms/image | mean CPU ms | x ours (wall) | x ours (CPU) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in summary.items():
        print(
            f"| {name} | {row['mean_ms']} | {row['median_ms']} | {row['mean_cpu_ms']} "
            f"| {row['ratio_to_ours']} | {row['cpu_ratio_to_ours']} |"
        )
    print()
    names = list(per_image)
    print("| image | MP | " + " | ".join(names) + " |")
    print("| --- | ---: |" + " ---: |" * len(names))
    for path, pixels in chosen:
        cells = " | ".join(f"{per_image[n][path.name]['wall_ms']:.1f}" for n in names)
        print(f"| {path.name} | {pixels / 1e6:.1f} | {cells} |")
    print()
    print(f"load average before/after: {report['load_average_before_after']}")
    for unit in ("wall", "cpu"):
        goal = goals[unit]
        print(
            f"{unit}: ours / best pyvips ({vips_best}): {goal['ours_over_pyvips']}x (goal <= 1.2); "
            f"naive main / ours: {goal['naive_main_over_ours']}x, "
            f"naive pool / ours: {goal['naive_pool_over_ours']}x (goal >= 4.5)"
        )


if __name__ == "__main__":
    main()
