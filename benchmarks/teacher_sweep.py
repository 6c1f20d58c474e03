"""Teacher recipe variants on the demo's scenes: test VQA accuracy per question type and time.

    python benchmarks/teacher_sweep.py --scenes DIR --out-dir RUNS \\
        --variant NAME '{"train": {"steps": 2000}, "seed": 1}' [--variant ...] [--threads 1]
        [--summary benchmarks/results/teacher_sweep.json]

Each variant is ``recipes/teacher.yaml`` with the JSON overrides deep-merged into it (any recipe
key: ``seed``, ``train.steps``, ``teacher.model.text_layers``, ``teacher.relation_layer`` …),
trained with ``distiq.train.compress`` in this process (``--threads`` torch threads; run two
variants side by side with one thread each on a 2-core machine). ``--summarize-only`` rebuilds the
summary from existing run directories. The summary lists, per run: the overrides, the test VQA
accuracy and its per-question-type split, the blind baseline, the best validation step and the
training seconds (the run's ``results.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "teacher.yaml"


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` deep-merged (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def summary_row(run: Path) -> dict:
    from distiq.config import load_yaml

    record = json.loads((run / "results.json").read_text())[0]
    extra = record["extra"]
    recipe = load_yaml(run / "recipe.yaml")
    return {
        "name": run.name,
        "seed": recipe.get("seed"),
        "steps": recipe["train"]["steps"],
        "teacher": {k: v for k, v in recipe["teacher"].items() if k != "weights"},
        "test_vqa_accuracy": record["value"],
        "by_question_type": extra["by_question_type"],
        "blind_baseline": extra["blind_baseline"]["accuracy"],
        "best_val_accuracy": extra.get("best_val_accuracy"),
        "best_step": extra.get("best_step"),
        "train_seconds": extra.get("train_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarize-only", nargs="*", metavar="NAME")
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--note", default="", help="stored with the summary (e.g. the commit)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from distiq.config import load_yaml
    from distiq.demo.recipe import teacher_recipe_from_dict
    from distiq.demo.teacher import train_teacher

    torch.set_num_threads(args.threads)
    names = list(args.summarize_only or [])
    for name, overrides in args.variant:
        data = merged(load_yaml(RECIPE), {"output": str(args.out_dir / name)})
        data = merged(data, {"data": {"scenes": str(args.scenes)}})
        data = merged(data, json.loads(overrides))
        train_teacher(teacher_recipe_from_dict(data, source=f"variant {name}"), overwrite=True)
        names.append(name)
    rows = [summary_row(args.out_dir / name) for name in names]
    for row in rows:
        types = " ".join(f"{k} {v:.1f}" for k, v in row["by_question_type"].items())
        print(f"{row['name']:<8} {row['test_vqa_accuracy']:6.2f}  {types}")
    if args.summary:
        result = {"machine": machine_info(), "threads": args.threads, "note": args.note}
        result["runs"] = rows
        args.summary.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.summary}")


if __name__ == "__main__":
    main()
