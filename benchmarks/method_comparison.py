"""The demo's method comparison: rtn, gptq, qat and qad at W4A8 and at W2A16 (group 64), plus
kd, from one teacher, with equal budgets (the shipped recipes: every trained method gets the same
steps, batch size, data order and learning-rate schedule), evaluated on the synthetic test split.

    .venv/bin/python benchmarks/method_comparison.py --scenes DATA_DIR [--teacher DIR]
        [--out DIR] [--steps N] [--test-questions N] [--runs rtn-w4a8 qad-w4a8 ...]
        [--init qat=gptq --init qad=gptq] [--quantization JSON] [--set JSON] [--tag NAME]

``--scenes`` is a generated scene set (``distiq.data.generate_scenes``); without ``--teacher``
the teacher is trained first with ``recipes/teacher.yaml``. The recipes get the same changes as in
``distiq demo`` (``distiq.demo.plan``); run directories land in ``--out/runs/NAME`` (default
``--out``: ``bench-runs/method-comparison``). ``--init METHOD=INIT`` starts every run of a trained
quantized method from a post-training solution (``init: none | rtn | gptq``; its run directory is
``NAME+init-INIT``), e.g. to see how much of qad's lead over qat is its initialisation.
``--quantization JSON`` deep-merges into every run's ``quantization`` section, e.g.
``'{"weight": {"bits": 4}, "targets": ["vision", "patch_embedding", "projector",
"language_model", "lm_head"]}'`` (every weight matrix in 4 bits); ``--set JSON`` deep-merges
into every student's whole recipe, e.g. ``'{"train": {"lr": 1.0e-4}, "data": {"val_questions":
null}}'`` (a learning rate, validated on every validation question: hyperparameters are chosen
on the validation split, never on test); ``--tag NAME`` names the run directories of either
``NAME+NAME``. Prints a table and writes
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
from distiq.demo.plan import RUNS, DemoSettings, planned_recipe
from teacher_sweep import merged

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name: str, args: argparse.Namespace, teacher: Path):
    """The shipped recipe ``name`` with the demo's changes (``distiq.demo.plan``): paths,
    ``--steps`` for every trained student, ``--teacher-steps``, ``--test-questions``."""
    from distiq.demo.recipe import teacher_recipe_from_dict
    from distiq.train.recipe import recipe_from_dict

    settings = DemoSettings(
        scenes=0,  # unused: the scenes exist already
        teacher_steps=args.teacher_steps,
        student_steps=args.steps,
        test_questions=args.test_questions,
    )
    data = planned_recipe(name, settings, args.out, args.scenes, recipes=ROOT / "recipes")
    if name != "teacher":
        data["teacher"] = str(teacher)
    changed = False
    if args.quantization and data.get("quantization") is not None:
        data["quantization"] = merged(data["quantization"], json.loads(args.quantization))
        changed = True
    if args.set and name != "teacher":
        data, changed = merged(data, json.loads(args.set)), True
    if changed:
        data["output"] = f"{data['output']}+{args.tag}"
    init = dict(args.init).get(data.get("method"))
    if init is not None and init != data.get("init", "none"):
        data["init"] = init
        data["output"] = f"{data['output']}+init-{init}"
    build = teacher_recipe_from_dict if name == "teacher" else recipe_from_dict
    return build(data, source=name)


def _method_init(text: str) -> tuple[str, str]:
    method, sep, init = text.partition("=")
    if not sep or method not in ("qat", "qad") or init not in ("none", "rtn", "gptq"):
        raise argparse.ArgumentTypeError(f"{text!r}: write qat=gptq, qad=none, ... ")
    return method, init


def _run(name: str, args: argparse.Namespace, teacher: Path) -> tuple:
    from distiq.demo.teacher import train_teacher
    from distiq.results import read_records
    from distiq.train.methods import compress

    recipe = _recipe(name, args, teacher)
    started = time.perf_counter()
    run = train_teacher if name == "teacher" else compress
    run_dir = run(recipe, overwrite=True)
    seconds = time.perf_counter() - started
    (record,) = [r for r in read_records(run_dir / "results.json") if r.name == recipe.run_name]
    return record, {
        "name": name,
        "run_dir": str(run_dir),
        "init": recipe.init,
        "method": record.method,
        "w_bits": record.w_bits,
        "a_bits": record.a_bits,
        "group_size": record.group_size,
        "steps": record.steps,
        "accuracy": record.value,
        "val_accuracy": _final_val_accuracy(run_dir),
        "retention": record.retention,
        "by_question_type": record.extra.get("by_question_type"),
        "wall_seconds": round(seconds, 1),
        "extra": {
            k: v for k, v in record.extra.items() if k not in ("by_question_type", "blind_baseline")
        },
    }


def _final_val_accuracy(run_dir: Path) -> float | None:
    """The validation accuracy of the last evaluation in the run's metrics (None: no training,
    so no validation: PTQ runs)."""
    from distiq.report.inputs import read_curves

    if not (run_dir / "metrics.jsonl").is_file():
        return None
    values = read_curves(run_dir / "metrics.jsonl").eval_metrics.get("vqa_accuracy", ())
    return values[-1] if values else None


def _goals(records: list) -> list[dict]:
    """The demo's goals checked by ``distiq.report.check_goals`` (the same rules as the report)."""
    from distiq.report import check_goals

    return [
        {
            "goal": c.goal,
            "measured": c.measured,
            "status": c.status,
            "value": c.value,
            "target": c.target,
        }
        for c in check_goals(records)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="a generated scene set")
    parser.add_argument("--teacher", type=Path, help="an existing teacher directory")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/method-comparison"))
    parser.add_argument("--steps", type=int, help="override every student's steps (equal)")
    parser.add_argument("--teacher-steps", type=int, help="override the teacher's steps")
    parser.add_argument("--test-questions", type=int, help="limit the test questions")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS)
    parser.add_argument(
        "--init", type=_method_init, action="append", default=[], metavar="METHOD=INIT",
        help="start qat / qad runs from a PTQ solution: qat=gptq, qad=none, ...",
    )  # fmt: skip
    parser.add_argument("--quantization", help="JSON merged into every run's quantization")
    parser.add_argument("--set", help="JSON merged into every student's recipe")
    parser.add_argument(
        "--tag", default="quant", help="run-directory suffix for --quantization/--set"
    )
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
        from distiq.demo.teacher import train_teacher

        t0 = time.perf_counter()
        teacher = train_teacher(_recipe("teacher", args, Path()), overwrite=True)
        teacher_seconds = round(time.perf_counter() - t0, 1)
    (teacher_record,) = [r for r in read_records(teacher / "results.json") if r.method == "teacher"]
    results, records = {}, [teacher_record]
    for name in args.runs:
        record, results[name] = _run(name, args, teacher)
        records.append(record)
        row = results[name]
        print(
            f"{name:<16} {row['accuracy']:6.2f} %  retention {row['retention'] or 0:.3f}  "
            f"{row['wall_seconds']:7.1f} s",
            flush=True,
        )
    goals = _goals(records)
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
        "command": " ".join(["python", *sys.argv]),
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
        print(f"{goal['status']:<13} {goal['goal']}: {goal['measured']}")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
