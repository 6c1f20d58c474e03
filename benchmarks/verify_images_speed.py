"""Speed of ``distiq.data.records.verify_images`` (the pre-training check of a split's images)
against decoding every file (``decode=True``, what loading with ``check_images=True`` does).

Writes ``--count`` random RGB images in two kinds into a temporary folder: demo-sized PNGs
(``--png-size`` px square, the generated scenes' kind) and COCO-sized JPEGs (640×480, VQA v2's
kind), then times each check ``--repeats`` times on each kind (median wall seconds, images per
second). The files are just written, so they come from the page cache: a cold disk is slower.

    .venv/bin/python benchmarks/verify_images_speed.py [--count 2000] [--repeats 3]

Writes ``benchmarks/results/verify_images_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script
from distiq.data.formats import save_png
from distiq.data.records import find_bad_images, verify_images


def write_images(folder: Path, count: int, png_size: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    kinds: dict[str, list[Path]] = {f"png {png_size}x{png_size}": [], "jpeg 640x480": []}
    for i in range(count):
        path = folder / f"scene{i}.png"
        save_png(path, rng.integers(0, 256, (png_size, png_size, 3), dtype=np.uint8))
        kinds[f"png {png_size}x{png_size}"].append(path)
    for i in range(count):
        path = folder / f"coco{i}.jpg"
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        kinds["jpeg 640x480"].append(path)
    return kinds


def timed(check, paths: list[Path], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        check(paths)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png-size", type=int, default=64)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/verify_images_speed.json")
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, paths in write_images(Path(tmp), args.count, args.png_size).items():
            verify = timed(lambda p, where=kind: verify_images(p, where), paths, args.repeats)
            decode = timed(lambda p: find_bad_images(p, decode=True), paths, args.repeats)
            rows.append(
                {
                    "kind": kind,
                    "images": len(paths),
                    "verify_s": round(verify, 3),
                    "verify_images_per_s": round(len(paths) / verify),
                    "decode_s": round(decode, 3),
                    "decode_images_per_s": round(len(paths) / decode),
                }
            )
            print(
                f"{kind:>14}: verify {verify:.3f} s ({len(paths) / verify:,.0f}/s), "
                f"decode {decode:.3f} s ({len(paths) / decode:,.0f}/s)"
            )
    args.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
