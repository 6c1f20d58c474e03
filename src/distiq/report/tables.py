"""The report's tables as plain cells (lists of strings), shared by the Markdown and HTML writers.

Missing numbers are shown as ``—``, never as 0. Accuracy is the record's ``value`` (0-100),
retention is ``value / teacher value`` in percent.

Per-question-type accuracy comes from a record's ``extra``, in either form:

- ``extra["by_question_type"] = {type: accuracy in %}`` (0-100, like ``value``; what
  ``distiq.train`` writes);
- flat keys ``extra["<metric>/question_type/<type>"]`` as :class:`distiq.tasks.vqa.VQAAccuracy`
  computes them, in [0, 1] (multiplied by 100 here).

The blind-question baseline (answering from the question alone, no image) is read from
``extra["blind_baseline"]`` of any record: a number (%) or ``{"accuracy": %, "by_question_type":
{type: %}}``. The machine a record was measured on from
``extra["machine"]`` or ``extra["bench"]["machine"]`` (``distiq.bench``'s place; a mapping such
as ``{"cpu": ..., "cores": ..., "torch": ...}`` or a string).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from distiq.report import latency
from distiq.results import ResultRecord

DASH = "—"
METHOD_ORDER = ("teacher", "fp", "kd", "rtn", "gptq", "qat", "qad", "qlora-kd")

Table = tuple[list[str], list[list[str]]]  # (header, rows)


def fmt_number(value: float | None, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or ``—`` when missing or not finite."""
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.{digits}f}"


def fmt_size(size_mb: float | None) -> str:
    """Sizes in MB with three significant digits (tiny models are fractions of a MB)."""
    if size_mb is None or not math.isfinite(size_mb):
        return DASH
    if size_mb >= 100:
        return f"{size_mb:.0f}"
    if size_mb >= 10:
        return f"{size_mb:.1f}"
    if size_mb >= 0.1:
        return f"{size_mb:.2f}"
    return f"{size_mb:.3f}"


def fmt_bits(record: ResultRecord) -> str:
    return f"{record.w_bits}/{record.a_bits}"


def fmt_group(record: ResultRecord) -> str:
    if record.w_bits >= 16:
        return DASH
    return "per-channel" if record.group_size is None else str(record.group_size)


def fmt_latency(record: ResultRecord) -> tuple[str, str]:
    """``(latency ms, where it was timed)`` cells: ``("1.25", "ort-int8, 2 threads")``."""
    timing = latency.headline(record)
    if timing is None:
        return DASH, DASH
    return fmt_number(timing.ms), timing.where


def sort_key(record: ResultRecord) -> tuple:
    """Teacher and full-precision models first, then by falling bit widths, group size, method."""
    method = METHOD_ORDER.index(record.method) if record.method in METHOD_ORDER else 99
    group = -1 if record.group_size is None else record.group_size
    return (-record.w_bits, -record.a_bits, group, method, record.name)


def group_by_metric(records: list[ResultRecord]) -> dict[tuple[str, str], list[ResultRecord]]:
    """Records grouped by ``(task, metric)`` (first-seen order), each group sorted by
    :func:`sort_key`."""
    groups: dict[tuple[str, str], list[ResultRecord]] = {}
    for record in records:
        groups.setdefault((record.task, record.metric), []).append(record)
    return {key: sorted(group, key=sort_key) for key, group in groups.items()}


def results_table(records: list[ResultRecord]) -> Table:
    """One row per record (every run, its seed last). Speed vs teacher compares each record with
    the teacher of its task and metric on one backend and thread count
    (:mod:`distiq.report.latency`)."""
    header = [
        "name",
        "method",
        "bits W/A",
        "group",
        "size MB",
        "accuracy",
        "retention",
        "latency ms",
        "latency backend",
        "speed vs teacher",
        "seed",
    ]
    teachers = {key: latency.teacher_of(group) for key, group in group_by_metric(records).items()}
    rows = [
        [
            r.name,
            r.method,
            fmt_bits(r),
            fmt_group(r),
            fmt_size(r.size_mb),
            fmt_number(r.value),
            DASH if r.retention is None else f"{100 * r.retention:.1f} %",
            *fmt_latency(r),
            latency.speed_cell(r, teachers[(r.task, r.metric)]),
            DASH if r.seed is None else str(r.seed),
        ]
        for r in records
    ]
    return header, rows


def merge_table(records: list[ResultRecord]) -> Table | None:
    """What merging LoRA adapters and re-quantizing cost (``qlora-kd`` runs): accuracy as trained
    (quantized base + adapters, ``extra["qlora_unmerged_value"]``), as deployed (merged and
    re-quantized: the record's ``value``) and the drop in points. ``None`` when no record has
    the numbers."""
    rows = []
    for r in records:
        unmerged = r.extra.get("qlora_unmerged_value")
        if not _is_number(unmerged) or r.value is None:
            continue
        rows.append(
            [
                r.name,
                fmt_bits(r),
                fmt_number(float(unmerged)),
                fmt_number(r.value),
                fmt_number(float(unmerged) - r.value),
            ]
        )
    if not rows:
        return None
    header = ["name", "bits W/A", "as trained (base + adapters)", "merged + re-quantized", "drop"]
    return header, rows


def per_question_type(record: ResultRecord) -> dict[str, float]:
    """``{question type: accuracy in %}`` from ``record.extra`` (both forms, see the module
    docstring); empty when the record carries none."""
    out: dict[str, float] = {}
    nested = record.extra.get("by_question_type")
    if isinstance(nested, Mapping):
        for key, value in nested.items():
            if _is_number(value):
                out[str(key)] = float(value)
    prefix = f"{record.metric}/question_type/"
    for key, value in record.extra.items():
        if key.startswith(prefix) and _is_number(value):
            out.setdefault(key[len(prefix) :], 100.0 * float(value))
    return out


def question_type_table(records: list[ResultRecord]) -> Table | None:
    """Rows: records that carry per-type accuracy, then the blind baseline's per-type accuracy
    when recorded; columns: every question type seen (sorted). ``None`` when no record carries
    any."""
    per_record = [(r.name, fmt_bits(r), per_question_type(r)) for r in records]
    per_record = [row for row in per_record if row[2]]
    if not per_record:
        return None
    blind = blind_baseline_by_type(records)
    if blind:
        per_record.append(("blind baseline (question only)", DASH, blind))
    types = sorted({t for _, _, found in per_record for t in found})
    header = ["name", "bits W/A", *types]
    rows = [
        [name, bits, *(fmt_number(found.get(t), 1) for t in types)]
        for name, bits, found in per_record
    ]
    return header, rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def blind_baseline(records: list[ResultRecord]) -> float | None:
    """The blind-question baseline accuracy (%) recorded in any record's extra, if any."""
    for record in records:
        value = record.extra.get("blind_baseline")
        if isinstance(value, Mapping):
            value = value.get("accuracy")
        if _is_number(value):
            return float(value)
    return None


def blind_baseline_by_type(records: list[ResultRecord]) -> dict[str, float]:
    """The blind baseline's ``{question type: accuracy in %}`` from any record, if recorded."""
    for record in records:
        value = record.extra.get("blind_baseline")
        if isinstance(value, Mapping) and isinstance(value.get("by_question_type"), Mapping):
            found = {
                str(k): float(v) for k, v in value["by_question_type"].items() if _is_number(v)
            }
            if found:
                return found
    return {}


def describe_machine(machine: Any) -> str:
    """A machine description (mapping or string) as one line."""
    if isinstance(machine, Mapping):
        return ", ".join(f"{key}: {value}" for key, value in machine.items())
    return str(machine)


def machine_of(record: ResultRecord) -> Any:
    """The machine a record names: ``extra["machine"]``, or ``extra["bench"]["machine"]`` (with
    the thread count) as ``distiq.bench`` writes it; ``None`` when it names none."""
    machine = record.extra.get("machine")
    if machine:
        return machine
    bench = record.extra.get("bench")
    if isinstance(bench, Mapping) and bench.get("machine"):
        machine = bench["machine"]
        if isinstance(machine, Mapping) and "threads" in bench:
            machine = {**machine, "threads": bench["threads"]}
        return machine
    return None


def machines(records: list[ResultRecord]) -> list[tuple[str, list[str]]]:
    """``[(machine description, [record names measured on it])]`` in first-seen order."""
    found: dict[str, list[str]] = {}
    for record in records:
        machine = machine_of(record)
        if machine:
            found.setdefault(describe_machine(machine), []).append(record.name)
    return list(found.items())
