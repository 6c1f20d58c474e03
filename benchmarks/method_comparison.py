"""Method comparison of issue 6 §5: rtn, gptq, qat and qad at W4A8 and at W2A16 (group 64), plus
kd, from one teacher, with equal budgets (the shipped recipes: every trained method gets the same
steps, batch size, data order and learning-rate schedule), evaluated on the synthetic test split.

    .venv/bin/python benchmarks/method_comparison.py --scenes DATA_DIR [--teacher DIR]
        [--out DIR] [--steps N] [--test-questions N] [--runs rtn-w4a8 qad-w4a8 ...]

``--scenes`` is a generated scene set (``distiq.data.generate_scenes``); without ``--teacher``
the teacher is trained first with ``recipes/teacher.yaml``. Every run directory lands under
``--out`` (default ``bench-runs/method-comparison``). Prints a table and writes
``benchmarks/results/method_comparison.json`` with the machine, the command, every run's
accuracy (overall and per question type), retention vs the teacher, wall seconds, and the goals:

- W4A8: qad keeps >= 99 % of the teacher's accuracy and beats rtn, gptq and qat;
- W2A16 g64: qad keeps >= 90 % and beats gptq by a wide margin (>= 10 points).

Numbers are reported as measured; a goal that is not met says so (``"met": false``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RUNS = (
    "rtn-w4a8",
    "gptq-w4a8",
    "qat-w4a8",
    "qad-w4a8",
    "rtn-w2a16-g64",
    "gptq-w2a16-g64",
    "qat-w2a16-g64",
    "qad-w2a16-g64",
    "kd-small",
)
WIDE_MARGIN = 10.0  # points of accuracy


def _recipe(name: str, args: argparse.Namespace, teacher: Path):
    from distiq.config import load_yaml
    from distiq.train.recipe import recipe_from_dict

    data = load_yaml(ROOT / "recipes" / f"{name}.yaml")
    data["output"] = str(args.out / name)
    data.setdefault("data", {})["scenes"] = str(args.scenes)
    if args.test_questions is not None:
        data["data"]["test_questions"] = args.test_questions
    if name != "teacher":
        data["teacher"] = str(teacher)
    if args.steps is not None and "train" in data and name != "teacher":
        data["train"]["steps"] = args.steps
    if args.teacher_steps is not None and name == "teacher":
        data["train"]["steps"] = args.teacher_steps
    return recipe_from_dict(data, source=name)


def _run(name: str, args: argparse.Namespace, teacher: Path) -> dict:
    from distiq.results import read_records
    from distiq.train.methods import compress

    recipe = _recipe(name, args, teacher)
    started = time.perf_counter()
    run_dir = compress(recipe, overwrite=True)
    seconds = time.perf_counter() - started
    (record,) = [r for r in read_records(run_dir / "results.json") if r.name == recipe.run_name]
    return {
        "name": name,
        "method": record.method,
        "w_bits": record.w_bits,
        "a_bits": record.a_bits,
        "group_size": record.group_size,
        "steps": record.steps,
        "accuracy": record.value,
        "retention": record.retention,
        "by_question_type": record.extra.get("by_question_type"),
        "wall_seconds": round(seconds, 1),
        "extra": {
            k: v for k, v in record.extra.items() if k not in ("by_question_type", "blind_baseline")
        },
    }


def _goals(results: dict[str, dict], teacher_value: float) -> list[dict]:
    def value(name: str) -> float | None:
        return results[name]["accuracy"] if name in results else None

    goals = []
    qad4 = value("qad-w4a8")
    if qad4 is not None:
        others = {
            n: value(n) for n in ("rtn-w4a8", "gptq-w4a8", "qat-w4a8") if value(n) is not None
        }
        goals.append(
            {
                "goal": "W4A8: qad >= 99 % of the teacher and beats rtn, gptq, qat",
                "qad": qad4,
                "retention": qad4 / teacher_value,
                "others": others,
                "met": qad4 >= 0.99 * teacher_value and all(qad4 > v for v in others.values()),
            }
        )
    qad2, gptq2 = value("qad-w2a16-g64"), value("gptq-w2a16-g64")
    if qad2 is not None:
        goals.append(
            {
                "goal": f"W2A16 g64: qad >= 90 % of the teacher and beats gptq by >= {WIDE_MARGIN} points",
                "qad": qad2,
                "retention": qad2 / teacher_value,
                "gptq": gptq2,
                "met": qad2 >= 0.9 * teacher_value
                and (gptq2 is None or qad2 - gptq2 >= WIDE_MARGIN),
            }
        )
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="a generated scene set")
    parser.add_argument("--teacher", type=Path, help="an existing teacher directory")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/method-comparison"))
    parser.add_argument("--steps", type=int, help="override every student's steps (equal)")
    parser.add_argument("--teacher-steps", type=int, help="override the teacher's steps")
    parser.add_argument("--test-questions", type=int, help="limit the test questions")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "method_comparison.json"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from distiq.results import read_records

    started = time.perf_counter()
    teacher = args.teacher
    teacher_seconds = None
    if teacher is None:
        from distiq.train.methods import compress

        t0 = time.perf_counter()
        teacher = compress(_recipe("teacher", args, Path()), overwrite=True)
        teacher_seconds = round(time.perf_counter() - t0, 1)
    (teacher_record,) = [r for r in read_records(teacher / "results.json") if r.method == "teacher"]
    results = {}
    for name in args.runs:
        results[name] = _run(name, args, teacher)
        row = results[name]
        print(
            f"{name:<16} {row['accuracy']:6.2f} %  retention {row['retention'] or 0:.3f}  "
            f"{row['wall_seconds']:7.1f} s",
            flush=True,
        )
    goals = _goals(results, teacher_record.value)
    report = {
        "benchmark": "method_comparison",
        "machine": machine_info(),
        "teacher": {
            "dir": str(teacher),
            "accuracy": teacher_record.value,
            "blind_baseline": teacher_record.extra.get("blind_baseline"),
            "by_question_type": teacher_record.extra.get("by_question_type"),
            "steps": teacher_record.steps,
            "train_seconds": teacher_record.extra.get("train_seconds"),
            "wall_seconds": teacher_seconds,
        },
        "runs": list(results.values()),
        "goals": goals,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nteacher {teacher_record.value:.2f} %")
    print(f"{'run':<16} {'acc %':>7} {'retention':>9} {'seconds':>8}")
    for row in results.values():
        print(
            f"{row['name']:<16} {row['accuracy']:7.2f} {row['retention'] or 0:9.3f} "
            f"{row['wall_seconds']:8.1f}"
        )
    for goal in goals:
        print(f"{'MET ' if goal['met'] else 'NOT MET'}  {goal['goal']}")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
