"""Dense tasks on the synthetic scenes: teachers trained from small configs by ``distiq
teacher`` (the shipped ``recipes/teacher-{segformer,rtdetr,depth}.yaml``), then rtn, gptq, qat
and qad at W4A8 (4-bit per-channel weights, 8-bit static activations) from each teacher with
equal budgets (the shipped ``recipes/qad-w4a8-*.yaml``; qat is the same recipe with the task term
only, rtn / gptq the same quantization without training), over several seeds; the qad runs
exported to ONNX (the precision their layers fit), scored on the test split in onnxruntime and
timed against their fp32 export.

    .venv/bin/python benchmarks/dense_tasks.py [--out DIR] [--tasks segmentation detection depth]
        [--seeds 0 1 2] [--count 3000] [--teacher-steps N] [--steps N] [--threads 1]

Writes the runs' report (``distiq.report``) into ``--out/report``, and
``benchmarks/results/dense_tasks.json``: the machine and the command, each teacher's
record, every run's record (``distiq.results.ResultRecord``: task, metric, value, retention,
seed, steps, wall seconds; None for a run reused from an earlier invocation with the same
recipe), the ONNX parity and latency of the qad runs, and the goals:

- segmentation: W4A8 qad keeps >= 98 % of the teacher's mIoU (mean over seeds) and is ahead of
  rtn, gptq and qat (mean over seeds, and in how many seeds);
- detection: the same with >= 95 % of the teacher's COCO mAP;
- depth (reported, no goal set): delta < 1.25 retention.

Numbers are reported as measured; a goal that is not met says so (``"met": false``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "segmentation": ("teacher-segformer", "qad-w4a8-segformer", 0.98),
    "detection": ("teacher-rtdetr", "qad-w4a8-rtdetr", 0.95),
    "depth": ("teacher-depth", "qad-w4a8-depth", None),
}
METHODS = ("rtn", "gptq", "qat", "qad")


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())


def _with_scenes(data: dict, scenes: Path) -> dict:
    """A recipe's data section on the benchmark's scene set (generated here with --count)."""
    return {**{k: v for k, v in data.items() if k != "generate"}, "scenes": str(scenes)}


def _with_steps(train: dict, steps: int) -> dict:
    """``train`` with ``steps``; warm-up and evaluation intervals shrink with a shorter run."""
    return {
        **train,
        "steps": steps,
        "warmup_steps": min(train.get("warmup_steps", 0), steps // 10),
        "eval_every": min(train.get("eval_every", steps), steps),
    }


def _teacher(task: str, args: argparse.Namespace, scenes: Path) -> Path:
    """The task's teacher directory, trained once with its shipped recipe."""
    from distiq.results import read_records
    from distiq.train.dense_teacher import dense_teacher_recipe_from_dict, train_dense_teacher

    data = _yaml(TASKS[task][0])
    output = args.out / "teachers" / TASKS[task][0]
    if (output / "results.json").is_file() and read_records(output / "results.json"):
        return output  # trained before with the same recipe (recipe.yaml is beside it)
    data["output"] = str(output)
    data["data"] = _with_scenes(data.get("data", {}), scenes)
    if args.teacher_steps:
        data["train"] = _with_steps(data["train"], args.teacher_steps)
    started = time.perf_counter()
    train_dense_teacher(dense_teacher_recipe_from_dict(data), overwrite=True)
    logging.info("teacher %s in %.0f s", task, time.perf_counter() - started)
    return output


def _student_recipe(task: str, method: str, seed: int, args, scenes: Path, teacher: Path):
    """The shipped qad recipe as ``method``: qat keeps the task term only, rtn / gptq drop the
    training; the same quantization, data, steps, batch size and schedule for all."""
    from distiq.train.recipe import recipe_from_dict

    data = _yaml(TASKS[task][1])
    data.update(
        method=method,
        seed=seed,
        teacher=str(teacher),
        output=str(args.out / "runs" / f"{method}-{task}-s{seed}"),
        name=f"{method}-w4a8-{task}-s{seed}",
    )
    data["data"] = _with_scenes(data["data"], scenes)
    data["train"] = {**data["train"], "seed": seed}
    if args.steps:
        data["train"] = _with_steps(data["train"], args.steps)
    if method == "qat":
        data["objective"] = {"terms": {"task": {"weight": 1.0}}}
    if method in ("rtn", "gptq"):
        data.pop("objective", None)
    return recipe_from_dict(data, source=f"{method}-{task}")


def _onnx(run_dir: Path, record, threads: int) -> dict:
    """The run exported to ONNX, scored on the test split in onnxruntime, and timed."""
    from distiq.bench.run import bench_run
    from distiq.export.onnx_dense import OrtDenseEngine
    from distiq.export.run_export import export_run
    from distiq.results import read_records
    from distiq.train import load_recipe
    from distiq.train.engine_tasks import engine_task

    export = export_run(run_dir, "onnx")
    recipe = load_recipe(run_dir / "recipe.yaml")
    task = engine_task(recipe)
    engine = OrtDenseEngine(export, threads=threads)
    test = task.load_test(recipe, engine.adapter)
    onnx_value = task.evaluate(engine, test, recipe).value
    bench_run(run_dir, threads=threads, repeats=50)
    (benched,) = [r for r in read_records(run_dir / "results.json") if r.name == record.name]
    timings = benched.extra["bench"]["dense"]
    return {
        "export": export.name,
        "onnx_value": onnx_value,
        "torch_value": record.value,
        "parity_gap": abs(onnx_value - record.value),
        "latency_ms": {k: v.get("median_ms") for k, v in timings.items()},
        "unavailable": {k: v["reason"] for k, v in timings.items() if not v["available"]},
        "latency_backend": benched.latency_backend,
        "size_mb": benched.size_mb,
    }


def _goals(task: str, records: list, teacher_value: float) -> dict:
    threshold = TASKS[task][2]
    by_method = {m: [r.value for r in records if r.method == m] for m in METHODS}
    means = {m: statistics.fmean(v) for m, v in by_method.items() if v}
    qad = by_method["qad"]
    wins = {
        m: sum(a > b for a, b in zip(qad, by_method[m]))
        for m in ("rtn", "gptq", "qat")
        if by_method[m]
    }
    retention = means["qad"] / teacher_value if teacher_value else None
    goal = {
        "teacher_value": teacher_value,
        "mean_by_method": means,
        "std_by_method": {m: statistics.pstdev(v) for m, v in by_method.items() if v},
        "qad_retention": retention,
        "qad_seeds_ahead": wins,
        "seeds": len(qad),
    }
    if threshold is not None:
        goal["retention_goal"] = threshold
        goal["retention_met"] = retention is not None and retention >= threshold
        goal["ahead_met"] = all(means["qad"] > means[m] for m in wins)
        goal["met"] = goal["retention_met"] and goal["ahead_met"]
    return goal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-runs/dense-tasks"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--count", type=int, default=3000, help="scenes (train/val/test 80/10/10)")
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="every trained student's steps")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "dense_tasks.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from distiq.data import generate_scenes
    from distiq.demo.plan import cache_action
    from distiq.results import read_records
    from distiq.train.methods import compress
    from distiq.train.recipe import recipe_from_dict, recipe_to_dict

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    scenes = generate_scenes(args.out / "data", count=args.count, image_size=64).root
    report: dict = {
        "benchmark": "dense_tasks",
        "machine": machine_info(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scenes": str(scenes),
        "tasks": {},
    }
    report_dirs: list[Path] = []  # the teachers and runs of this invocation, for the report

    def normalize(written: dict) -> dict:  # a stored recipe through the current schema
        return recipe_to_dict(recipe_from_dict(written))

    for task in args.tasks:
        teacher = _teacher(task, args, scenes)
        report_dirs.append(teacher)
        (teacher_record,) = read_records(teacher / "results.json")
        records, onnx = [], {}
        for seed in args.seeds:
            for method in args.methods:
                recipe = _student_recipe(task, method, seed, args, scenes, teacher)
                run_started = time.perf_counter()
                run_dir = Path(recipe.output)
                reused = cache_action(run_dir, recipe_to_dict(recipe), normalize) == "reuse"
                if not reused:  # the same recipe run before (another seed list) is reused
                    compress(recipe, overwrite=True)
                report_dirs.append(run_dir)
                (record,) = [r for r in read_records(run_dir / "results.json")]
                wall = None if reused else round(time.perf_counter() - run_started, 1)
                record = record.replace(extra={**record.extra, "wall_seconds": wall})
                records.append(record)
                logging.info("%s %s seed %d: %.2f", task, method, seed, record.value)
                if method == "qad" and seed == args.seeds[0]:
                    onnx[record.name] = _onnx(run_dir, record, args.threads)
        report["tasks"][task] = {
            "teacher": teacher_record.to_dict(),
            "runs": [r.to_dict() for r in records],
            "onnx": onnx,
            "goals": _goals(task, records, teacher_record.value),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")  # after each task
    from distiq.report import collect_inputs, write_report

    files = write_report(collect_inputs(report_dirs), args.out / "report", goals=())
    report["report"] = str(files.markdown)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    for task, body in report["tasks"].items():
        goals = body["goals"]
        print(
            f"{task}: teacher {goals['teacher_value']:.2f}; "
            + ", ".join(f"{m} {v:.2f}" for m, v in goals["mean_by_method"].items())
            + f"; qad retention {goals['qad_retention']:.3f}; met: {goals.get('met', 'n/a')}",
            file=sys.stdout,
        )


if __name__ == "__main__":
    main()
