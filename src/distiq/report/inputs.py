"""What a report is made of: result records (results JSON) and the metrics lines of runs.

``collect_inputs(paths)`` takes what a user passes to ``distiq report``:

- a results file (``*.json``, a JSON list of records, see :mod:`distiq.results`), with the
  ``predictions.jsonl`` beside it when the file is a ``results.json``;
- a run directory: its ``results.json`` (if any), its ``metrics.jsonl`` (training curves) and its
  ``predictions.jsonl`` (each test question's score, :mod:`distiq.report.predictions`);
- a demo output directory: its ``results.json``, every ``runs/NAME/`` below it and its
  ``teacher/`` (each read as a run directory: ``runs/NAME/metrics.jsonl`` gives run ``NAME``'s
  curves, ``runs/NAME/results.json`` more records).

A ``predictions.jsonl`` belongs to the record of its directory: the one record of the
``results.json`` beside it, else the record named like the directory. Runs without one (older
runs) are reported all the same; their comparisons say that they could not be tested.

Records with the same ``name`` are merged as :func:`distiq.results.upsert_records` merges them
(later non-None fields win, ``extra`` dicts are merged); ``retention`` is then filled in from the
teacher record of the same task and metric. A metrics file is read strictly: a line that is not
JSON is an error naming the file and line, except a torn *last* line (a run killed while writing).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distiq.config import ConfigError
from distiq.report.predictions import PREDICTIONS_FILE, QuestionScores, read_predictions
from distiq.results import ResultRecord, merge_records, read_records, with_retention

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
RUNS_DIR = "runs"
TEACHER_DIR = "teacher"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunCurves:
    """Training curves of one run, from its ``metrics.jsonl``.

    ``train_steps`` (N,) optimizer steps of the train lines; ``terms[name]`` (N,) the logged value
    of objective term ``name`` at those steps (NaN where a line lacks it or logged a non-finite
    value); ``total`` (N,) the weighted total loss; ``eval_steps`` (M,) and ``eval_metrics[name]``
    (M,) the validation metrics. Every value is the mean over the steps since the previous line,
    as the training loop logs it."""

    name: str
    path: Path
    train_steps: tuple[int, ...] = ()
    total: tuple[float, ...] = ()
    terms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    eval_steps: tuple[int, ...] = ()
    eval_metrics: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.train_steps and not self.eval_steps


@dataclass(frozen=True)
class ReportInputs:
    """Everything a report renders: merged ``records`` (retention filled in), the training
    ``curves`` of each run (in the order found), the ``sources`` files that were read and the
    per-question scores of the runs that left them (``predictions[record name]``)."""

    records: list[ResultRecord]
    curves: list[RunCurves]
    sources: list[Path]
    predictions: dict[str, QuestionScores] = field(default_factory=dict)


def _number(value: Any) -> float:
    """A metrics value as a float: numbers as they are, "nan"/"inf" strings (how the training
    loop writes non-finite values) as float, anything else NaN."""
    if isinstance(value, bool):
        return float("nan")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return float("nan")
    return float("nan")


def _series(lines: list[dict[str, Any]], key: str) -> dict[str, tuple[float, ...]]:
    names: list[str] = []
    for line in lines:
        values = line.get(key)
        if isinstance(values, dict):
            names += [str(k) for k in values if str(k) not in names]
    return {
        name: tuple(
            _number(line[key].get(name)) if isinstance(line.get(key), dict) else math.nan
            for line in lines
        )
        for name in names
    }


def read_curves(path: str | os.PathLike, name: str | None = None) -> RunCurves:
    """Read a run's ``metrics.jsonl`` (line kinds as :mod:`distiq.train.metrics` writes them).

    Raises ``ConfigError`` naming the file and line for a corrupt line (a torn last line is
    skipped) and ``FileNotFoundError`` when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    raw_lines = path.read_text(encoding="utf-8").splitlines()
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    lines: list[dict[str, Any]] = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            if number == len(raw_lines):
                continue  # torn by a crash while writing; every earlier line is complete
            raise ConfigError(f"line {number} is not valid JSON: {exc}", str(path)) from None
        if not isinstance(line, dict):
            raise ConfigError(f"line {number} is not a JSON object", str(path))
        lines.append(line)
    train = [ln for ln in lines if ln.get("kind", "train") == "train" and "step" in ln]
    evals = [ln for ln in lines if ln.get("kind") == "eval" and "step" in ln]
    eval_metrics = {
        key: values
        for key, values in _series(evals, "metrics").items()
        if "/" not in key and key != "num_questions"  # per-type breakdowns go in tables
    }
    return RunCurves(
        name=name or path.parent.name,
        path=path,
        train_steps=tuple(int(_number(ln["step"])) for ln in train),
        total=tuple(_number(ln.get("total")) for ln in train),
        terms=_series(train, "terms"),
        eval_steps=tuple(int(_number(ln["step"])) for ln in evals),
        eval_metrics=eval_metrics,
    )


def _run_dirs(directory: Path) -> list[Path]:
    """The run directories of a demo output directory: ``runs/*/`` and ``teacher/``."""
    runs = directory / RUNS_DIR
    found = []
    if runs.is_dir():
        found = sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))
    if found and (directory / TEACHER_DIR).is_dir():
        found.insert(0, directory / TEACHER_DIR)
    return found


def _owner(directory: Path, results: Path) -> str | None:
    """The record name a directory's ``predictions.jsonl`` belongs to (module docstring)."""
    names = [r.name for r in read_records(results)] if results.is_file() else []
    if len(set(names)) == 1:
        return names[0]
    if not names or directory.name in names:
        return directory.name
    return None


def collect_inputs(paths: list[str | os.PathLike]) -> ReportInputs:
    """Read every results file and metrics file reachable from ``paths`` (see the module
    docstring). Raises ``FileNotFoundError`` for a path that does not exist or holds nothing to
    report, ``ConfigError`` for a corrupt file (naming it)."""
    if not paths:
        raise ValueError("give at least one run directory, demo output directory or results file")
    records: list[ResultRecord] = []
    curves: list[RunCurves] = []
    sources: list[Path] = []
    predictions: dict[str, QuestionScores] = {}
    seen: set[Path] = set()

    def first_time(file: Path) -> bool:
        resolved = file.resolve()
        if resolved in seen:
            return False
        seen.add(resolved)
        return True

    def add_results(file: Path) -> None:
        if not first_time(file):
            return
        records.extend(read_records(file))
        sources.append(file)

    def add_predictions(directory: Path) -> bool:
        file = directory / PREDICTIONS_FILE
        if not file.is_file():
            return False
        if not first_time(file):
            return True
        name = _owner(directory.resolve(), directory / RESULTS_FILE)
        if name is None:
            logger.warning(
                "%s: its results.json holds several records and none is named %s; the "
                "predictions are not used",
                file,
                directory.resolve().name,
            )
            return True
        owner = next((r for r in records if r.name == name), None)
        if owner is not None and owner.task != "vqa":
            # dense tasks keep per-image metrics there, not per-question scores to pair
            return True
        if name in predictions:
            logger.warning("%s replaces %s for %s", file, predictions[name].path, name)
        predictions[name] = read_predictions(file, name)
        sources.append(file)
        return True

    def add_metrics(file: Path, name: str) -> None:
        if not first_time(file):
            return
        run = read_curves(file, name=name)
        sources.append(file)
        if not run.empty:
            curves.append(run)

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a run directory, a demo output directory or a "
                "results JSON file"
            )
        if path.is_file():
            if path.name == PREDICTIONS_FILE:
                add_predictions(path.parent)
            elif path.name.endswith(".jsonl"):
                add_metrics(path, path.parent.name)
            else:
                add_results(path)
                if path.name == RESULTS_FILE:
                    add_predictions(path.parent)
            continue
        found = False
        if (path / RESULTS_FILE).is_file():
            add_results(path / RESULTS_FILE)
            found = True
        if (path / METRICS_FILE).is_file():
            add_metrics(path / METRICS_FILE, path.resolve().name)
            found = True
        found = add_predictions(path) or found
        for run in _run_dirs(path):
            if (run / RESULTS_FILE).is_file():
                add_results(run / RESULTS_FILE)
                found = True
            if (run / METRICS_FILE).is_file():
                add_metrics(run / METRICS_FILE, run.name)
                found = True
            found = add_predictions(run) or found
        if not found:
            raise FileNotFoundError(
                f"nothing to report in {path}: it holds no {RESULTS_FILE}, no {METRICS_FILE} and "
                f"no {RUNS_DIR}/*/ with them; pass a run directory made by `distiq compress`, a "
                "`distiq demo` output directory or a results JSON file"
            )
    return ReportInputs(
        records=with_retention(merge_records(records)),
        curves=curves,
        sources=sources,
        predictions=predictions,
    )
