"""The method study: where the combined objective earns its place, over seeds, with equal tuning.

    python benchmarks/study.py --teacher DIR --scenes DIR --out DIR [--seeds 0 1 2] [--jobs 2]
        [--regimes tune w4a4 labels small ablation ablation-small] [--steps N] [--small-steps N]

Every run is a shipped recipe (``recipes/*-w4a8.yaml``, with the demo's paths) and the changes
its name says, on one teacher and one scene set, so every method gets the same data, steps,
batch size and data order. Regimes:

- ``tune`` (seed 0): qat and qad at W4A4 (int4 per-channel weights, static per-tensor int4
  activations) get the same grid — learning rate 1e-4 / 2e-4 / 4e-4, from round-to-nearest and
  from GPTQ, six configurations each — chosen on all validation questions, never on test.
- ``w4a4``: rtn, gptq and the chosen qat / qad at W4A4 over the seeds.
- ``labels``: qat and qad at W4A8 and W4A4 without labels (``data.labels: false``: the teacher's
  answers stand in for the human ones), with their labelled settings, beside the labelled runs.
- ``small``: a student of 2 + 2 of the teacher's 3 + 3 layers (its own layers to start), W4A8,
  trained ``--small-steps``: task loss only (qat) against the whole objective (qad: task, kd,
  feature and attention distillation on the language model); the float distilled twin (kd).
- ``ablation`` (at W4A4) and ``ablation-small`` (the small student): terms added one at a time:
  task, + kd, + feat, + attn, + pd, + qk_entropy, + rounding.

Records get ``extra["variant"]`` (label-free, small student), ``extra["ablation"]`` (the terms)
and ``extra["config"]`` (the tuned settings), and each run keeps ``predictions.jsonl``, so the
report (``distiq.report``, written into ``--out``) compares groups of seeds question by
question. Runs already done with the same recipe are reused. ``--jobs`` runs side by side in
forked workers, one torch thread each. Writes ``--out/study.json`` (every record, the choices,
the wall times and the machine).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
LRS = (1.0e-4, 2.0e-4, 4.0e-4)
INITS = ("none", "gptq")
A4 = {"bits": 4, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"}
LANGUAGE = ["language_model"]
TERMS = {
    "task": {"task": {"weight": 1.0}},
    "kd": {"kd": {"weight": 1.0, "divergence": "forward_kl", "temperature": 2.0}},
    "feat": {"feat": {"weight": 0.1, "student_layers": LANGUAGE, "teacher_layers": LANGUAGE}},
    "attn": {"attn": {"weight": 0.1, "student_layers": LANGUAGE, "teacher_layers": LANGUAGE}},
    "pd": {"pd": {"weight": 0.5, "divergence": "forward_kl"}},
    "qk_entropy": {
        "qk_entropy": {"weight": 1.0e-3, "query_modules": LANGUAGE, "key_modules": LANGUAGE}
    },
    "rounding": {"rounding": {"weight": 1.0e-4}},
}
ABLATION = ("task", "kd", "feat", "attn", "pd", "qk_entropy", "rounding")
SMALL = {"depth": 2, "vision_depth": 2}
REGIMES = ("tune", "w4a4", "labels", "small", "ablation", "ablation-small")


def merged(base: dict, change: dict) -> dict:
    """``base`` with ``change`` deep-merged into it (a ``None`` value deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def objective(*names: str) -> dict:
    terms: dict = {}
    for name in names:
        terms.update(TERMS[name])
    return {"terms": terms}


class Study:
    """The recipes of the study and the runs they made."""

    def __init__(self, args: argparse.Namespace) -> None:
        from distiq.config import load_yaml

        self.args = args
        self.base = {
            method: load_yaml(ROOT / "recipes" / f"{method}-w4a8.yaml")
            for method in ("rtn", "gptq", "qat", "qad")
        }
        self.planned: dict[str, dict] = {}  # run name -> recipe mapping
        self.notes: dict[str, dict] = {}  # run name -> extra fields for its record

    def add(self, name: str, method: str, change: dict, notes: dict | None = None) -> str:
        """Plan run ``name``: the shipped ``method`` recipe with ``change`` deep-merged into it
        (an ``objective`` in ``change`` replaces the recipe's whole)."""
        data = merged(self.base[method], {k: v for k, v in change.items() if k != "objective"})
        if "objective" in change:
            data["objective"] = copy.deepcopy(change["objective"])
        data = merged(
            data,
            {
                "output": str(self.args.out / "runs" / name),
                "name": name,
                "teacher": str(self.args.teacher),
                "data": {"scenes": str(self.args.scenes)},
            },
        )
        if method in ("qat", "qad") and "steps" not in change.get("train", {}):
            data = merged(data, {"train": {"steps": self.args.steps}})
        self.planned[name] = data
        self.notes[name] = notes or {}
        return name


def w4a4(change: dict | None = None) -> dict:
    """The W4A4 quantization over the W4A8 recipes (activations to static per-tensor int4)."""
    return merged({"quantization": {"activation": A4}}, change or {})


def seeded(seed: int) -> dict:
    return {"seed": seed, "train": {"seed": seed}}


W4A4_QAD = objective("task", "kd", "feat", "attn", "pd", "qk_entropy")


def plan_tuning(study: Study) -> list[str]:
    names = []
    for method in ("qat", "qad"):
        for lr in LRS:
            for init in INITS:
                config = f"lr{lr:.0e}-{init}"
                change = w4a4({"train": {"lr": lr}, "init": init})
                if method == "qad":
                    change["objective"] = W4A4_QAD
                # validated once, after the last step, on every validation question
                change = merged(
                    change,
                    {"train": {"eval_every": study.args.steps, "best_metric": "vqa_accuracy"}},
                )
                name = study.add(
                    f"tune-{method}-w4a4-{config}",
                    method,
                    change,
                    {"config": {"lr": lr, "init": init}, "tuning": True},
                )
                study.planned[name]["data"]["val_questions"] = None  # null: all of them
                names.append(name)
    return names


def chosen(study: Study, method: str) -> dict:
    """The tuned run of ``method`` with the best validation accuracy: its changes."""
    from distiq.results import read_records

    best, best_value = None, -1.0
    for name, data in study.planned.items():
        if not name.startswith(f"tune-{method}-"):
            continue
        records = read_records(Path(data["output"]) / "results.json")
        value = records[0].extra.get("best_val_accuracy") if records else None
        if value is not None and value > best_value:
            best, best_value = study.notes[name]["config"], value
    if best is None:
        raise SystemExit(f"no tuning run of {method} finished: run --regimes tune first")
    return {"train": {"lr": best["lr"]}, "init": best["init"]}


def plan_regimes(study: Study, regimes: list[str]) -> list[str]:
    names: list[str] = []
    tuned = {m: chosen(study, m) for m in ("qat", "qad")} if set(regimes) - {"tune"} else {}
    for seed in study.args.seeds:
        s = seeded(seed)
        if "w4a4" in regimes:
            for method in ("rtn", "gptq"):  # no training: the seed draws the calibration images
                names.append(
                    study.add(f"w4a4-{method}-s{seed}", method, merged(w4a4(), {"seed": seed}))
                )
            for method in ("qat", "qad"):
                change = w4a4(tuned[method])
                if method == "qad":
                    change["objective"] = W4A4_QAD
                names.append(
                    study.add(
                        f"w4a4-{method}-s{seed}", method, merged(change, s),
                        {"config": tuned[method]},
                    )
                )  # fmt: skip
        if "labels" in regimes:
            for setting, quant in (("w4a8", {}), ("w4a4", w4a4())):
                for method in ("qat", "qad"):
                    settings = tuned[method] if setting == "w4a4" else {}
                    if setting == "w4a4" and method == "qad":
                        settings = {**settings, "objective": W4A4_QAD}
                    for labels in (True, False):
                        tag = "" if labels else "-nolabels"
                        change = merged(merged(quant, settings), s)
                        change = merged(change, {"data": {"labels": labels}})
                        notes = {} if labels else {"variant": "label-free"}
                        names.append(
                            study.add(f"{setting}-{method}{tag}-s{seed}", method, change, notes)
                        )
        if "small" in regimes:
            small = {"student": SMALL, "train": {"steps": study.args.small_steps, "lr": 2.0e-4}}
            names.append(
                study.add(f"small-qat-w4a8-s{seed}", "qat", merged(small, s), {"variant": "small"})
            )
            full = objective("task", "kd", "feat", "attn")
            names.append(
                study.add(
                    f"small-qad-w4a8-s{seed}",
                    "qad",
                    merged(merged(small, {"objective": full}), s),
                    {"variant": "small"},
                )
            )
            kd = {**merged(small, s), "objective": full, "quantization": None, "method": "kd"}
            names.append(study.add(f"small-kd-s{seed}", "qad", kd, {"variant": "small"}))
        if "ablation" in regimes or "ablation-small" in regimes:
            for index in range(len(ABLATION)):
                terms = ABLATION[: index + 1]
                label = "+".join(terms)
                change = {"objective": objective(*terms)}
                if "kd" not in terms:  # qad needs a kd term: task alone is qat's objective
                    method = "qat"
                else:
                    method = "qad"
                if "ablation" in regimes:
                    names.append(
                        study.add(
                            f"ablation-w4a4-{label}-s{seed}",
                            method,
                            merged(merged(w4a4(tuned[method]), change), s),
                            {"ablation": label},
                        )
                    )
                if "ablation-small" in regimes:
                    small = {"student": SMALL, "train": {"steps": study.args.small_steps}}
                    names.append(
                        study.add(
                            f"ablation-small-{label}-s{seed}",
                            method,
                            merged(merged(small, change), s),
                            {"ablation": label, "variant": "small"},
                        )
                    )
    return list(dict.fromkeys(names))


def run(study: Study, names: list[str], jobs: int) -> dict[str, float]:
    """Run (or reuse) the planned runs ``names``; returns their wall seconds."""
    from distiq.demo.jobs import Job, run_jobs
    from distiq.demo.plan import cache_action
    from distiq.train import compress, recipe_from_dict, recipe_to_dict, run_data

    recipes = {n: recipe_from_dict(study.planned[n], source=n) for n in names}
    todo = []
    for name, recipe in recipes.items():
        action = cache_action(
            Path(recipe.output),
            recipe_to_dict(recipe),
            lambda written: recipe_to_dict(recipe_from_dict(written)),
        )
        if action != "reuse":
            todo.append(Job(name, compress, recipe, action))
    if not todo:
        return {}
    loaded: dict[Any, Any] = {}  # the splits, read once per data section (labels aside)
    for index, job in enumerate(todo):
        key = repr(dataclasses.replace(job.recipe.data, labels=True))
        if key not in loaded:
            loaded[key] = run_data(job.recipe)
        todo[index] = Job(job.name, job.compress, job.recipe, job.action, loaded[key])
    seconds, _ = run_jobs(todo, max(1, min(jobs, len(todo))))
    return seconds


def annotate(study: Study, names: list[str]) -> list:
    """The runs' records with the study's notes in their ``extra`` (written back)."""
    from distiq.results import read_records, upsert_records

    records = []
    for name in names:
        path = Path(study.planned[name]["output"]) / "results.json"
        found = read_records(path)
        if not found:
            continue
        notes = study.notes[name]
        updated = [r.replace(extra={**r.extra, **notes}) for r in found]
        records += upsert_records(path, updated)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="a trained demo teacher")
    parser.add_argument("--scenes", type=Path, required=True, help="its generated scene set")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument(
        "--regimes", nargs="+", default=list(REGIMES), choices=REGIMES,
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=100, help="steps of qat / qad runs")
    parser.add_argument("--small-steps", type=int, default=600, help="steps of small students")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only (re)write the report")
    args = parser.parse_args()
    started = time.perf_counter()
    study = Study(args)
    seconds: dict[str, float] = {}
    tuning = plan_tuning(study)
    if "tune" in args.regimes and not args.report:
        seconds.update(run(study, tuning, args.jobs))
    names = plan_regimes(study, [r for r in args.regimes if r != "tune"])
    if not args.report:
        seconds.update(run(study, names, args.jobs))
    records = annotate(study, tuning + names)
    from distiq.report import report

    # the tuning runs chose the settings on validation; the report compares the regimes' runs
    runs = [Path(study.planned[n]["output"]) for n in names]
    files = report([args.teacher, *[r for r in runs if (r / "results.json").is_file()]], args.out)
    summary = {
        "benchmark": "study",
        "machine": machine_info(),
        "command": " ".join(["python", *sys.argv]),
        "teacher": str(args.teacher),
        "chosen": {m: chosen(study, m) for m in ("qat", "qad")}
        if any((Path(study.planned[n]["output"]) / "results.json").is_file() for n in tuning)
        else None,
        "seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
        "records": [r.to_dict() for r in records],
    }
    (args.out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"report: {files.markdown}\nstudy: {args.out / 'study.json'}")


if __name__ == "__main__":
    main()
