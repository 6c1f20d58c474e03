"""Median step times of teacher runs, from their metrics JSONL (what the README's step times cite).

    python benchmarks/teacher_step_times.py METRICS.jsonl [...] [--out FILE.json]

A teacher's ``metrics.jsonl`` logs, every ``log_every`` steps, the mean seconds per step since the
last line. Lines whose loss terms have no ``vqa`` are the vision-only warm-up (no language
model); the others are full steps. Per file: the median of each kind and their ratio (full /
vision-only). The vision-only steps serve as a control when two runs differ in the language
model: if both kinds are slower by the same factor, the host was slower, not the change.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def step_times(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [x for x in lines if x.get("kind") == "train"]
    full = [x["seconds"] for x in train if "vqa" in x.get("terms", {})]
    vision = [x["seconds"] for x in train if "vqa" not in x.get("terms", {})]
    out = {"file": str(path), "full_lines": len(full), "vision_lines": len(vision)}
    out["median_full_s"] = round(statistics.median(full), 4) if full else None
    out["median_vision_s"] = round(statistics.median(vision), 4) if vision else None
    if full and vision:
        out["full_over_vision"] = round(out["median_full_s"] / out["median_vision_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [step_times(p) for p in args.metrics]
    for r in rows:
        print(
            f"{Path(r['file']).name:<34} full {r['median_full_s']} s  vision-only "
            f"{r['median_vision_s']} s  ratio {r.get('full_over_vision')}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"benchmark": "teacher_step_times", "runs": rows}, indent=1) + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
