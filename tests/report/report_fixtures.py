"""Builders of report inputs for tests: a results file, runs' metrics.jsonl and predictions.jsonl,
written the way distiq.results, distiq.train.metrics and distiq.train.methods write them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from distiq.results import ResultRecord, write_records

MACHINE = {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0"}
UNAVAILABLE = {"available": False, "reason": "precision 'int4' needs quantized weights"}


def bench_extra(threads: int = 2, **median_ms: float) -> dict:
    """``extra["bench"]`` as distiq.bench.run writes it: the language model's timing on each
    backend (keyword names with ``_`` for ``-``: ``ort_fp32=2.5``), the threads, the machine."""
    per_backend = {
        name.replace("_", "-"): {"available": True, "reason": None, "median_ms": ms, "repeats": 30}
        for name, ms in median_ms.items()
    }
    per_backend.setdefault("ort-int4", UNAVAILABLE)
    return {"threads": threads, "machine": MACHINE, "batch_size": 1, "language_model": per_backend}


def demo_records() -> list[ResultRecord]:
    """A teacher and the demo's methods at W4A8 and W2A16 (group 64), every goal met. Latency:
    the teacher on ort-fp32; kd faster there; qad-w4a8 faster on ort-fp32 but deployed on
    ort-int4, slower than the teacher; qad-w2a16 slower on ort-fp32."""
    return [
        ResultRecord(
            "teacher",
            "teacher",
            params=1_100_000,
            size_mb=4.4,
            value=92.0,
            latency_ms=3.0,
            latency_backend="ort-fp32",
            extra={
                "blind_baseline": {
                    "accuracy": 48.25,
                    "by_question_type": {"count": 30.0, "colour": 20.0},
                },
                "machine": MACHINE,
                "by_question_type": {"count": 90.0, "colour": 95.0},
                "bench": bench_extra(pytorch_fp32=9.0, ort_fp32=3.0),
            },
        ),
        ResultRecord(
            "kd",
            "kd",
            size_mb=2.0,
            value=88.0,
            latency_ms=2.0,
            latency_backend="ort-fp32",
            extra={"bench": bench_extra(ort_fp32=2.0)},
        ),
        ResultRecord("rtn-w4a8", "rtn", 4, 8, 64, size_mb=0.7, value=80.0),
        ResultRecord("gptq-w4a8", "gptq", 4, 8, 64, size_mb=0.7, value=85.0),
        ResultRecord("qat-w4a8", "qat", 4, 8, 64, size_mb=0.7, value=89.0),
        ResultRecord(
            "qad-w4a8",
            "qad",
            4,
            8,
            64,
            size_mb=0.7,
            value=91.5,
            latency_ms=3.75,
            latency_backend="ort-int4",
            extra={
                "machine": MACHINE,
                "vqa_accuracy/question_type/count": 0.875,
                "vqa_accuracy/question_type/colour": 0.9375,
                "bench": bench_extra(ort_fp32=2.5, ort_int4=3.75),
            },
        ),
        ResultRecord("gptq-w2a16", "gptq", 2, 16, 64, size_mb=0.4, value=60.0),
        ResultRecord(
            "qad-w2a16",
            "qad",
            2,
            16,
            64,
            size_mb=0.4,
            value=85.0,
            latency_ms=4.0,
            latency_backend="ort-fp32",
            extra={"bench": bench_extra(ort_fp32=4.0)},
        ),
    ]


# name, method, w_bits, a_bits, group, size MB, accuracy, ms on the headline backend, on ort-fp32
_CROWDED = [
    ("teacher", "teacher", 16, 16, None, 3.74, 89.79, 2.50, 2.50),
    ("kd-small", "kd", 16, 16, None, 2.61, 65.76, 1.59, 1.59),
    ("rtn-w4a8", "rtn", 4, 8, None, 0.73, 89.59, 3.00, 2.21),
    ("gptq-w4a8", "gptq", 4, 8, None, 0.73, 89.61, 3.27, 2.74),
    ("qat-w4a8", "qat", 4, 8, None, 0.73, 89.43, 3.40, 2.85),
    ("qad-w4a8", "qad", 4, 8, None, 0.73, 89.67, 3.41, 2.11),
    ("rtn-w2a16-g64", "rtn", 2, 16, 64, 0.53, 81.92, 2.72, 2.72),
    ("gptq-w2a16-g64", "gptq", 2, 16, 64, 0.53, 88.48, 2.57, 2.57),
    ("qat-w2a16-g64", "qat", 2, 16, 64, 0.53, 88.88, 2.40, 2.40),
    ("qad-w2a16-g64", "qad", 2, 16, 64, 0.53, 89.08, 2.52, 2.52),
]


def crowded_records() -> list[ResultRecord]:
    """The full demo's records as one real run reported them (accuracies within a few tenths of
    each other at each size), with the latencies distiq bench gave: points crowd together."""
    records = []
    for name, method, w, a, group, size, value, ms, fp32_ms in _CROWDED:
        backend = "ort-int4" if w == 4 else "ort-fp32"
        timings = {"ort_fp32": fp32_ms, **({"ort_int4": ms} if w == 4 else {})}
        records.append(
            ResultRecord(
                name,
                method,
                w,
                a,
                group,
                size_mb=size,
                value=value,
                latency_ms=ms,
                latency_backend=backend,
                extra={"bench": bench_extra(**timings)},
            )
        )
    return records


HOSTILE = {
    "name": "<script>window.injected=1</script>$x^2$ \"q\" & 'a'",
    "type": '<img src=x onerror="window.injected=2">',
    "term": "<b>kd</b> $\\frac{a}{b}$ & co",
    "machine": "</li><script>window.injected=3</script>",
    "run_dir": "<svg onload=\"window.injected=4\"> $a$ & 'q'",
}
"""Untrusted strings that reach a report: a record name, a question type, an objective term, a
machine description and a run directory's name, with HTML, quotes, ``&`` and mathtext."""


def hostile_records() -> list[ResultRecord]:
    """A teacher and one run whose name, question type and machine are :data:`HOSTILE`."""
    return [
        ResultRecord(
            "teacher",
            "teacher",
            size_mb=4.0,
            value=90.0,
            latency_ms=2.0,
            latency_backend="ort-fp32",
            extra={"machine": HOSTILE["machine"], "by_question_type": {HOSTILE["type"]: 91.0}},
        ),
        ResultRecord(
            HOSTILE["name"],
            "qad",
            4,
            8,
            64,
            size_mb=1.0,
            value=88.0,
            latency_ms=2.5,
            latency_backend="ort-fp32",
            extra={"by_question_type": {HOSTILE["type"]: 87.5}},
        ),
    ]


def metrics_lines(steps: int = 6, nan_at: int | None = None) -> list[dict]:
    """Train lines every step (terms task, kd, rounding) and an eval line every 3 steps."""
    lines: list[dict] = []
    for step in range(1, steps + 1):
        rounding: float | str = "nan" if step == nan_at else 0.01
        lines.append(
            {
                "kind": "train",
                "step": step,
                "epoch": 0,
                "lr": 1e-3,
                "total": 3.0 / step,
                "terms": {"task": 2.0 / step, "kd": 1.0 / step, "rounding": rounding},
                "grad_norm": 1.0,
                "seconds": 0.1,
            }
        )
        if step % 3 == 0:
            lines.append(
                {
                    "kind": "eval",
                    "step": step,
                    "metrics": {
                        "vqa_accuracy": 0.5 + step / 100,
                        "num_questions": 64.0,
                        "vqa_accuracy/question_type/count": 0.4,
                    },
                    "best": True,
                    "seconds": 0.5,
                }
            )
    return lines


def write_metrics(path: Path, lines: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return path


def write_predictions(directory: Path, scores: Sequence[float] | Mapping) -> Path:
    """``directory/predictions.jsonl`` as distiq.train.methods.write_predictions writes it:
    ``scores`` by question id (a mapping) or for ids 0, 1, ... (a sequence)."""
    items = scores.items() if isinstance(scores, Mapping) else enumerate(scores)
    rows = [{"question_id": q, "prediction": "yes" if s else "no", "score": s} for q, s in items]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "predictions.jsonl"
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    return path


def nested_scores(value: float, questions: int) -> list[float]:
    """Binary scores with the first ``value`` % of the questions right: the runs of a demo dir
    are nested (a better run is right wherever a worse one is)."""
    right = round(value * questions / 100)
    assert math.isclose(100 * right / questions, value), (value, questions)
    return [1.0] * right + [0.0] * (questions - right)


def write_demo_dir(
    root: Path,
    records: list[ResultRecord] | None = None,
    questions: int | None = 400,
) -> Path:
    """``root/results.json``, ``root/runs/{qad-w4a8,rtn-w4a8}/metrics.jsonl`` and (unless
    ``questions`` is None) every run's ``predictions.jsonl`` (nested binary scores, the
    teacher's in ``root/teacher/``), as `distiq demo --out root` leaves them (rtn-w4a8 evaluated
    once)."""
    records = demo_records() if records is None else records
    root.mkdir(parents=True, exist_ok=True)
    write_records(root / "results.json", records)
    write_metrics(root / "runs" / "qad-w4a8" / "metrics.jsonl", metrics_lines())
    write_metrics(root / "runs" / "rtn-w4a8" / "metrics.jsonl", metrics_lines(steps=3))
    if questions is not None:
        for r in records:
            folder = root / "teacher" if r.method == "teacher" else root / "runs" / r.name
            write_predictions(folder, nested_scores(r.value, questions))
    return root


# ------------------------------------------------------------------ seeds and paired questions
SEEDS = (0, 1, 2)
# method, w, a, group, variant, size MB, target accuracy: differences of 0.1-0.6 points
SEEDED_GROUPS = [
    ("rtn", 8, 8, None, None, 1.05, 89.70),
    ("gptq", 8, 8, None, None, 1.05, 89.72),
    ("qat", 8, 8, None, None, 1.05, 89.75),
    ("qad", 8, 8, None, None, 1.05, 89.78),
    ("rtn", 4, 8, None, None, 0.73, 88.90),
    ("gptq", 4, 8, None, None, 0.73, 89.30),
    ("qat", 4, 8, None, None, 0.73, 89.20),
    ("qad", 4, 8, None, None, 0.73, 89.60),
    ("rtn", 4, 4, None, None, 0.73, 84.00),
    ("gptq", 4, 4, None, None, 0.73, 86.50),
    ("qat", 4, 4, None, None, 0.73, 88.40),
    ("qad", 4, 4, None, None, 0.73, 88.90),
    ("rtn", 2, 16, 64, None, 0.53, 75.00),
    ("gptq", 2, 16, 64, None, 0.53, 86.00),
    ("qat", 2, 16, 64, None, 0.53, 87.00),
    ("qad", 2, 16, 64, None, 0.53, 88.00),
    ("gptq", 4, 8, None, "half-depth", 0.45, 83.00),
    ("qad", 4, 8, None, "half-depth", 0.45, 86.50),
    ("kd", 16, 16, None, "half-depth", 2.10, 87.50),
]
ABLATION = [  # label, target accuracy at W4A4 (qad)
    ("task", 88.40),
    ("task+kd", 88.60),
    ("task+kd+feat", 88.65),
    ("task+kd+feat+attn", 88.70),
    ("task+kd+feat+attn+pd", 88.85),
    ("task+kd+feat+attn+pd+qk_entropy", 88.88),
    ("task+kd+feat+attn+pd+qk_entropy+rounding", 88.90),
    ("full", 88.95),
]


def correlated_scores(
    accuracy: float, questions: int, seed: int, noise: float = 0.02
) -> list[float]:
    """Binary scores of a run with about ``accuracy`` % right: question q is right when its
    difficulty (the same for every run) plus the run's noise is below the accuracy, so runs
    agree on most questions as real models do."""
    difficulty = np.random.default_rng(12345).random(questions)
    jitter = np.random.default_rng(seed).normal(0.0, noise, questions)
    return [float(x) for x in (difficulty + jitter < accuracy / 100)]


def write_run(root: Path, record: ResultRecord, scores: Sequence[float]) -> ResultRecord:
    """``root/runs/NAME/`` with ``results.json`` (``record`` with the value its scores give) and
    ``predictions.jsonl``; returns the record written."""
    record = record.replace(value=100 * math.fsum(scores) / len(scores))
    folder = root / "runs" / record.name
    write_records(folder / "results.json", [record])
    write_predictions(folder, scores)
    return record


def write_seeded_dir(root: Path, questions: int = 1500) -> list[ResultRecord]:
    """A teacher, every method at W8A8 / W4A8 / W4A4 / W2A16 g64 and a half-depth student, a
    mixed-precision qad under a 0.6 MB budget, and the W4A4 ablation of the objective — every
    group with 3 seeds, every run with its predictions.jsonl (correlated binary scores).
    Returns the records."""
    records = [
        write_run(
            root,
            ResultRecord("teacher", "teacher", size_mb=3.74, seed=0, extra={"machine": MACHINE}),
            correlated_scores(89.9, questions, seed=99),
        )
    ]
    for index, (method, w, a, group, variant, size, target) in enumerate(SEEDED_GROUPS):
        for seed in SEEDS:
            name = f"{method}-w{w}a{a}" + (f"-g{group}" if group else "")
            name += (f"-{variant}" if variant else "") + f"-s{seed}"
            extra = {"variant": variant} if variant else {}
            record = ResultRecord(name, method, w, a, group, size_mb=size, seed=seed, extra=extra)
            scores = correlated_scores(target, questions, seed=1000 * index + seed)
            records.append(write_run(root, record, scores))
    for seed in SEEDS:
        extra = {
            "bits_allocation": {"vision": 8, "language_model": 4, "lm_head": 8},
            "size_budget_mb": 0.6,
        }
        record = ResultRecord(
            f"qad-mixed-0.6mb-s{seed}", "qad", 4, 8, size_mb=0.59, seed=seed, extra=extra
        )
        records.append(write_run(root, record, correlated_scores(89.0, questions, 500 + seed)))
    for index, (label, target) in enumerate(ABLATION):
        for seed in SEEDS:
            record = ResultRecord(
                f"ablation-{label.replace('+', '-')}-s{seed}",
                "qad",
                4,
                4,
                size_mb=0.73,
                seed=seed,
                extra={"ablation": label},
            )
            scores = correlated_scores(target, questions, seed=700 + 10 * index + seed)
            records.append(write_run(root, record, scores))
    return records


def write_hostile_dir(root: Path) -> Path:
    """A demo directory whose run name, question type, term and machine are :data:`HOSTILE`."""
    root.mkdir(parents=True, exist_ok=True)
    write_records(root / "results.json", hostile_records())
    lines = metrics_lines(steps=4)
    for line in lines:
        if line["kind"] == "train":
            line["terms"][HOSTILE["term"]] = line["terms"].pop("kd")
    write_metrics(root / "runs" / HOSTILE["run_dir"] / "metrics.jsonl", lines)
    return root
