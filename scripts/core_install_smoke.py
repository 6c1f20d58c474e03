"""The smallest real end-to-end demo on distiq's core install (run by check_core_install.sh).

Usage: python scripts/core_install_smoke.py OUT

Runs :func:`distiq.demo.run_demo` over the shipped recipes with their step counts and batches
cut (copies in OUT/recipes, found through ``DISTIQ_RECIPES``) and 2 worker processes, output not
a terminal, and checks what a core install must do: the teacher trains data-parallel through
accelerate (a core dependency) with its vision-only warm-up named on the validation line, the
nine compression runs go in forked workers, every model is measured with PyTorch alone (the
onnx extra is missing, said in one line), the best model is exported packed only, and the
report is written. Exits non-zero naming the first thing that is wrong.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr
from pathlib import Path

import yaml

from distiq.demo import DemoSettings, run_demo
from distiq.demo.plan import RUNS, TEACHER

SETTINGS = DemoSettings(
    scenes=160,
    teacher_steps=6,
    teacher_vision_steps=2,
    student_steps=2,
    eval_every=2,
    val_questions=16,
    test_questions=24,
    calibration_samples=8,
    bench_repeats=1,
    bench_workloads=("language_model",),
)


def tiny_recipes(folder: Path) -> Path:
    """The shipped recipes with a learning-rate warm-up short enough for a few steps and small
    batches (the teacher's still splits over 2 processes: 8 images each)."""
    import distiq

    shipped = Path(distiq.__file__).resolve().parent / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    for path in shipped.glob("*.yaml"):
        recipe = yaml.safe_load(path.read_text())
        train = recipe.get("train")
        if isinstance(train, dict):
            train["warmup_steps"] = 1
            train["batch_size"] = 16 if recipe.get("method") == TEACHER else 8
        (folder / path.name).write_text(yaml.safe_dump(recipe))
    return folder


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"core install smoke: {message}")


def main(out: Path) -> None:
    import os

    os.environ["DISTIQ_RECIPES"] = str(tiny_recipes(out / "recipes"))
    log = io.StringIO()
    with redirect_stderr(log):
        result = run_demo(out / "demo", SETTINGS, jobs=2)
    text = log.getvalue()
    sys.stderr.write(text)
    warmup = "(vision-only warm-up: the language model has not trained yet)"
    lines = text.splitlines()
    check("teacher: data-parallel over 2 processes" in lines, "the teacher ran in one process")
    check(any(line.startswith("teacher step 2: validation") and line.endswith(warmup)
              for line in lines), "no warm-up note on the validation in the warm-up")  # fmt: skip
    check(not any(line.startswith("teacher step 4:") and warmup in line for line in lines),
          "a warm-up note after the warm-up")  # fmt: skip
    for name in ("scenes", TEACHER, *RUNS, "bench", "export", "report"):
        check(any(line.startswith(f"stage {name}: done in") for line in lines), f"no end of {name}")
    check("not installed: latency is timed in PyTorch only" in text, "no line about onnx")
    records = {r.name: r for r in result["records"]}
    check(set(records) == {TEACHER, *RUNS}, f"records {sorted(records)}")
    for record in records.values():
        check(record.value is not None, f"{record.name} has no accuracy")
        check(record.latency_backend.startswith("pytorch-"), f"{record.name} latency backend")
        ort = record.extra["bench"]["language_model"]["ort-int8"]
        check("pip install 'distiq[onnx]'" in ort["reason"], f"{record.name}: {ort['reason']}")
    best = result["best"]
    exported = next(r for r in result["records"] if r.name == best.name).extra["exported"]
    check([Path(p).name for p in exported] == ["packed"], f"exports {exported}")
    check(Path(result["report"].html).is_file(), "no report")
    times = json.loads((out / "demo" / "demo_times.json").read_text())["seconds"]
    print("core install smoke: demo stages (s): " + json.dumps(times))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/core_install_smoke.py OUT")
    main(Path(sys.argv[1]))
