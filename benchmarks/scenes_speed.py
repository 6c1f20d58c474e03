"""Speed of the synthetic edge-scenes generator (target: 20,000 training scenes in < 60 s on
2 cores).

Generates ``--count`` scenes (default 25,000 = 20,000 train + 2,500 val + 2,500 test at the
default 0.8/0.1/0.1 split) into a fresh temporary folder ``--repeats`` times with ``--workers``
processes, and a baseline of the same count with one process in the same run. Reports the
median wall time, CPU seconds (this process + workers, user + sys), scenes per second, the
speed-up over the one-process baseline, the 1-minute load average before each run (other jobs
on the machine slow wall times down) and an idle-machine estimate, main-process CPU seconds +
worker CPU seconds / workers, and the blind baseline of the generated set.

    .venv/bin/python benchmarks/scenes_speed.py [--count 25000] [--repeats 3] [--workers 2]

Writes ``benchmarks/results/scenes_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script
from distiq.data.scenes import generate_scenes


def _cpu_seconds() -> tuple[float, float]:
    """(this process, finished child processes): user + system CPU seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def run_once(count: int, workers: int, seed: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="scenes_speed_"))
    try:
        load = os.getloadavg()[0]
        (own0, children0), t0 = _cpu_seconds(), time.perf_counter()
        paths = generate_scenes(out, count=count, seed=seed, workers=workers)
        wall = time.perf_counter() - t0
        own1, children1 = _cpu_seconds()
        own, children = own1 - own0, children1 - children0
        meta = paths.read_meta()
        size = sum(p.stat().st_size for p in paths.root.rglob("*") if p.is_file())
        return {
            "wall_s": wall,
            "cpu_s": own + children,
            "cpu_main_s": own,
            "cpu_workers_s": children,
            # the wall time on an otherwise idle machine: serial part + parallel part / workers
            "idle_wall_estimate_s": own + children / workers,
            "load_avg_1min_before": load,
            "train_scenes": meta["splits"]["train"]["images"],
            "questions": sum(s["questions"] for s in meta["splits"].values()),
            "disk_mb": size / 2**20,
            "blind_baseline": meta.get("blind_baseline"),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(name: str, runs: list[dict], count: int, workers: int) -> dict:
    wall = statistics.median(r["wall_s"] for r in runs)
    cpu = statistics.median(r["cpu_s"] for r in runs)
    return {
        "name": name,
        "count": count,
        "workers": workers,
        "repeats": len(runs),
        "median_wall_s": round(wall, 2),
        "median_cpu_s": round(cpu, 2),
        "scenes_per_s": round(count / wall, 1),
        "cpu_ms_per_scene": round(1000 * cpu / count, 3),
        "idle_wall_estimate_s": round(
            statistics.median(r["idle_wall_estimate_s"] for r in runs), 1
        ),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=25_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "scenes_speed.json")
    )
    args = parser.parse_args()

    measured = [run_once(args.count, args.workers, args.seed) for _ in range(args.repeats)]
    baseline = [run_once(args.count, 1, args.seed) for _ in range(args.baseline_repeats)]
    rows = [
        summarise(f"{args.workers} workers", measured, args.count, args.workers),
        summarise("1 process (baseline)", baseline, args.count, 1),
    ]
    speedup = rows[1]["median_wall_s"] / rows[0]["median_wall_s"]
    train = measured[0]["train_scenes"]
    print(
        f"{'config':<22}{'scenes':>8}{'train':>8}{'wall s':>9}{'cpu s':>9}{'scenes/s':>10}{'idle est s':>12}{'load':>7}"
    )
    for row in rows:
        load = statistics.median(r["load_avg_1min_before"] for r in row["runs"])
        print(
            f"{row['name']:<22}{row['count']:>8}{train:>8}{row['median_wall_s']:>9.1f}{row['median_cpu_s']:>9.1f}"
            f"{row['scenes_per_s']:>10.0f}{row['idle_wall_estimate_s']:>12.1f}{load:>7.1f}"
        )
    print(f"speed-up of {args.workers} workers over 1 process: {speedup:.2f}x")
    blind = measured[0]["blind_baseline"]
    if blind:
        print(f"blind (question-only) baseline accuracy: {blind['accuracy']:.4f}")
    result = {
        "benchmark": "scenes_speed",
        "machine": machine_info(),
        "target": "20,000 training scenes in < 60 s on 2 cores",
        "results": rows,
        "ratios": {f"speedup_{args.workers}_workers_vs_1": round(speedup, 3)},
        "blind_baseline": blind,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
