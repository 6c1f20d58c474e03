"""Builders of report inputs for tests: a results file and runs' metrics.jsonl, written the way
distiq.results and distiq.train.metrics write them."""

from __future__ import annotations

import json
from pathlib import Path

from distiq.results import ResultRecord, write_records

MACHINE = {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0"}


def demo_records() -> list[ResultRecord]:
    """A teacher and the demo's methods at W4A8 and W2A16 (group 64), every goal met."""
    return [
        ResultRecord(
            "teacher",
            "teacher",
            params=1_100_000,
            size_mb=4.4,
            value=92.0,
            latency_ms=3.0,
            latency_backend="torch-fp32",
            extra={
                "blind_baseline": {
                    "accuracy": 48.25,
                    "by_question_type": {"count": 30.0, "colour": 20.0},
                },
                "machine": MACHINE,
                "by_question_type": {"count": 90.0, "colour": 95.0},
            },
        ),
        ResultRecord("kd", "kd", size_mb=2.0, value=88.0),
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
            latency_ms=1.25,
            latency_backend="onnxruntime-int8",
            extra={
                "machine": MACHINE,
                "vqa_accuracy/question_type/count": 0.875,
                "vqa_accuracy/question_type/colour": 0.9375,
            },
        ),
        ResultRecord("gptq-w2a16", "gptq", 2, 16, 64, size_mb=0.4, value=60.0),
        ResultRecord("qad-w2a16", "qad", 2, 16, 64, size_mb=0.4, value=85.0),
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


def write_demo_dir(root: Path, records: list[ResultRecord] | None = None) -> Path:
    """``root/results.json`` and ``root/runs/{qad-w4a8,rtn-w4a8}/metrics.jsonl``, as `distiq
    demo --out root` leaves them."""
    root.mkdir(parents=True, exist_ok=True)
    write_records(root / "results.json", demo_records() if records is None else records)
    write_metrics(root / "runs" / "qad-w4a8" / "metrics.jsonl", metrics_lines())
    write_metrics(root / "runs" / "rtn-w4a8" / "metrics.jsonl", metrics_lines(steps=3))
    return root
