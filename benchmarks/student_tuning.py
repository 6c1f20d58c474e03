"""Equal tuning effort for qat and qad: a grid of configurations per method, each a
``benchmarks/method_comparison.py`` run from one teacher, chosen on the validation split (every
validation question), with the test accuracy of every run reported beside it.

    python benchmarks/student_tuning.py --scenes DATA_DIR --teacher DIR [--setting w2a16|w4a8]
        [--out DIR] [--jobs 2] [--json-dir DIR] [--summary FILE.json] [--summarize-only]

``--setting w2a16`` (the default; :data:`GRIDS`, six configurations per method at the default
parts, summary ``benchmarks/results/student_tuning.json``):

- ``qat``: learning rate 5e-5, 1e-4, 2e-4 (the shipped recipe), 4e-4, 8e-4, 1.6e-3;
- ``qad``: learning rate 1e-4, 2e-4, 4e-4, each with the prediction-difference term ``pd``
  (weight 0.5) and without it;

plus rtn and gptq (no training, no choice); and every weight matrix in 2 bits (the ``patch_embedding`` and ``lm_head`` parts too): rtn,
gptq, qat and qad with and without ``pd``, at the shipped learning rate.

``--setting w4a8`` (summary ``benchmarks/results/student_tuning_w4a8.json``): qat and qad each at
learning rate 1e-4, 2e-4, 4e-4, each from the round-to-nearest start and from GPTQ
(``init: gptq``); plus rtn and gptq. The recipes used to ship 2e-4 from round-to-nearest; after
this grid they ship qat from GPTQ at 1e-4 and qad from round-to-nearest at 1e-4. Every trained run gets
the same steps, batch, data order and schedule (the shipped recipes through ``distiq demo``'s
plan). ``--jobs`` runs that many configurations side by side, one torch thread each;
``--summarize-only`` rebuilds the summary from the per-run JSONs in ``--json-dir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
EVERY_MATRIX = {"targets": ["vision", "patch_embedding", "projector", "language_model", "lm_head"]}
VALIDATE_ALL = {"data": {"val_questions": None}}
PD = {"weight": 0.5, "divergence": "forward_kl"}


def _set(lr: float | None = None, pd: str | None = None) -> dict:
    out: dict = dict(VALIDATE_ALL)
    if lr is not None:
        out["train"] = {"lr": lr}
    if pd is not None:
        out["objective"] = {"terms": {"pd": PD if pd == "0.5" else None}}
    return out


def _lr(lr: float) -> str:
    return f"lr{lr:.1e}".replace("e-0", "e-")  # lr1.0e-4


GRID_W2A16: list[tuple[str, str, dict, dict | None]] = [
    # (tag, shipped run, recipe overrides, quantization overrides)
    *[
        (_lr(lr), "qat-w2a16-g64", _set(lr), None)
        for lr in (5.0e-5, 1.0e-4, 2.0e-4, 4.0e-4, 8.0e-4, 1.6e-3)
    ],
    *[
        (f"{_lr(lr)}-pd{pd}", "qad-w2a16-g64", _set(lr, pd), None)
        for pd in ("0.5", "0")
        for lr in (1.0e-4, 2.0e-4, 4.0e-4)
    ],
    ("default", "rtn-w2a16-g64", _set(), None),
    ("default", "gptq-w2a16-g64", _set(), None),
    ("every", "rtn-w2a16-g64", _set(), EVERY_MATRIX),
    ("every", "gptq-w2a16-g64", _set(), EVERY_MATRIX),
    ("every", "qat-w2a16-g64", _set(), EVERY_MATRIX),
    ("every", "qad-w2a16-g64", _set(pd="0.5"), EVERY_MATRIX),
    ("every-pd0", "qad-w2a16-g64", _set(pd="0"), EVERY_MATRIX),
]
GRID_W4A8: list[tuple[str, str, dict, dict | None]] = [
    *[
        (
            f"{_lr(lr)}{'-gptq' if init else ''}",
            run,
            {**_set(lr), **({"init": init} if init else {})},
            None,
        )
        for run in ("qat-w4a8", "qad-w4a8")
        for init in (None, "gptq")
        for lr in (1.0e-4, 2.0e-4, 4.0e-4)
    ],
    ("default", "rtn-w4a8", _set(), None),
    ("default", "gptq-w4a8", _set(), None),
]
GRIDS = {"w2a16": GRID_W2A16, "w4a8": GRID_W4A8}
SUMMARIES = {"w2a16": "student_tuning.json", "w4a8": "student_tuning_w4a8.json"}


def _json_path(json_dir: Path, tag: str, run: str) -> Path:
    return json_dir / f"{tag}-{run}.json"


def _run(args: argparse.Namespace, tag: str, run: str, overrides: dict, quant: dict | None) -> int:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "method_comparison.py"),
        "--scenes", str(args.scenes), "--teacher", str(args.teacher), "--out", str(args.out),
        "--threads", "1", "--runs", run, "--set", json.dumps(overrides), "--tag", tag,
        "--json", str(_json_path(args.json_dir, tag, run)),
    ]  # fmt: skip
    if quant is not None:
        command += ["--quantization", json.dumps(quant)]
    log = args.json_dir / f"{tag}-{run}.log"
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    print(f"{run:<16} {tag:<16} exit {code} (log {log})", flush=True)
    return code


def _row(tag: str, run: str, overrides: dict, quant: dict | None, path: Path) -> dict:
    data = json.loads(path.read_text())
    (record,) = data["runs"]
    terms = overrides.get("objective", {}).get("terms", {})
    return {
        "run": run,
        "tag": tag,
        "method": record["method"],
        "every_matrix": quant is not None,
        "lr": overrides.get("train", {}).get("lr"),
        "init": overrides.get("init"),
        "pd": ("none" if terms["pd"] is None else terms["pd"]["weight"]) if "pd" in terms else None,
        "val_accuracy": record["val_accuracy"],
        "test_accuracy": record["accuracy"],
        "retention": record["retention"],
        "by_question_type": record["by_question_type"],
        "teacher_accuracy": data["teacher"]["accuracy"],
        "wall_seconds": record["wall_seconds"],
        "terms_first_last": _terms_first_last(Path(record["run_dir"])),
        "command": data["command"],
    }


def _terms_first_last(run_dir: Path) -> dict[str, list[float]] | None:
    """Each objective term's first and last logged value (a mean over the steps since the
    previous log line; None: no training, or the run directory is gone)."""
    from distiq.report.inputs import read_curves

    if not (run_dir / "metrics.jsonl").is_file():
        return None
    curves = read_curves(run_dir / "metrics.jsonl")
    return {name: [round(v[0], 4), round(v[-1], 4)] for name, v in curves.terms.items() if v}


def _chosen(rows: list[dict]) -> list[dict]:
    """Per (method, every_matrix): the run with the best validation accuracy (PTQ runs have no
    training and so no validation: their one run)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["every_matrix"]), []).append(row)
    chosen = []
    for (method, every), group in groups.items():
        best = max(group, key=lambda r: r["val_accuracy"] or 0.0)  # PTQ: None, one run
        chosen.append(
            {
                "method": method,
                "every_matrix": every,
                "configurations": len(group),
                "chosen": best["tag"],
                "val_accuracy": best["val_accuracy"],
                "test_accuracy": best["test_accuracy"],
            }
        )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="a generated scene set")
    parser.add_argument("--teacher", type=Path, required=True, help="a trained teacher directory")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/student-tuning"))
    parser.add_argument("--json-dir", type=Path, default=Path("bench-runs/student-tuning/json"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--setting", choices=sorted(GRIDS), default="w2a16")
    parser.add_argument(
        "--summary", type=Path, help="default: benchmarks/results/" + str(SUMMARIES)
    )
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    grid = GRIDS[args.setting]
    if args.summary is None:
        args.summary = ROOT / "benchmarks" / "results" / SUMMARIES[args.setting]
    args.json_dir.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = list(pool.map(lambda entry: _run(args, *entry), grid))
        if any(codes):
            raise SystemExit(f"{sum(1 for c in codes if c)} runs failed; see the logs")
    missing = [p for t, r, *_ in grid if not (p := _json_path(args.json_dir, t, r)).is_file()]
    if missing:
        raise SystemExit(f"no results for {len(missing)} runs, e.g. {missing[0]}: run without "
                         "--summarize-only first")  # fmt: skip
    rows = [_row(t, r, o, q, _json_path(args.json_dir, t, r)) for t, r, o, q in grid]
    summary = {
        "benchmark": "student_tuning",
        "machine": machine_info(),
        "command": " ".join(["python", *sys.argv]),
        "teacher": str(args.teacher),
        "setting": args.setting,
        "selection": "best validation accuracy (every validation question) per method",
        "chosen": _chosen(rows),
        "runs": rows,
    }
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'run':<16} {'tag':<14} {'val %':>7} {'test %':>7}")
    for row in rows:
        val = "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.2f}"
        print(f"{row['run']:<16} {row['tag']:<14} {val:>7} {row['test_accuracy']:7.2f}")
    for row in summary["chosen"]:
        val = "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.2f}"
        print(f"chosen {row['method']:<5} every_matrix={row['every_matrix']!s:<5} "
              f"{row['chosen']:<14} val {val} test {row['test_accuracy']:.2f} "
              f"of {row['configurations']}")  # fmt: skip
    print(f"wrote {args.summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
