"""Result records: one JSON object per evaluated model, shared by train, bench and report.

A record is written by whoever measures something (``distiq.train`` the accuracy, ``distiq.bench``
size and latency) and read by ``distiq.report``, which renders from these records only. A results
file is a JSON list of records; ``upsert_records`` merges records by ``name`` (later measurements
fill in or replace fields), atomically.

Fields (docs/design.md): ``name``, ``method`` (teacher, rtn, gptq, qat, kd, qad, qlora-kd), ``w_bits``,
``a_bits`` (16 = unquantized activations), ``group_size`` (None = per channel), ``params``,
``size_mb``, ``task``, ``metric`` (e.g. ``vqa_accuracy``), ``value`` (0-100), ``retention``
(value / teacher value), ``latency_ms`` with ``latency_backend``, ``seed``, ``steps``; ``extra``
holds anything else (per-question-type accuracy, peak memory, the machine, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distiq.config import ConfigError, atomic_write, from_dict, to_dict

Method = Literal["teacher", "rtn", "gptq", "qat", "kd", "qad", "qlora-kd", "fp"]


@dataclass(frozen=True)
class ResultRecord:
    """One evaluated model (see the module docstring)."""

    name: str
    method: Method
    w_bits: int = 16
    a_bits: int = 16
    group_size: int | None = None
    params: int | None = None
    size_mb: float | None = None
    task: str = "vqa"
    metric: str = "vqa_accuracy"
    value: float | None = None
    retention: float | None = None
    latency_ms: float | None = None
    latency_backend: str | None = None
    seed: int | None = None
    steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _validate(self) -> list[str]:
        errors = []
        if self.value is not None and not 0 <= self.value <= 100:
            errors.append(f"value must be a percentage in [0, 100], got {self.value}")
        if not 1 <= self.w_bits <= 32 or not 1 <= self.a_bits <= 32:
            errors.append(f"w_bits/a_bits out of range: {self.w_bits}/{self.a_bits}")
        return errors

    def replace(self, **changes: Any) -> ResultRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ResultRecord:
        return from_dict(cls, data)


def read_records(path: str | os.PathLike) -> list[ResultRecord]:
    """Read a results file (a JSON list of records); a missing file is an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}", str(path)) from None
    if not isinstance(data, list):
        raise ConfigError("a results file holds a JSON list of records", str(path))
    return [
        from_dict(ResultRecord, item, source=str(path), where=f"[{i}]")
        for i, item in enumerate(data)
    ]


def write_records(path: str | os.PathLike, records: list[ResultRecord]) -> Path:
    """Write records as a JSON list, atomically."""
    return atomic_write(path, json.dumps([r.to_dict() for r in records], indent=2) + "\n")


def merge_records(records: list[ResultRecord]) -> list[ResultRecord]:
    """Merge records by ``name``, in order: a later record's fields that are not None replace the
    earlier ones (``extra`` dicts are merged); new names are appended."""
    merged: dict[str, ResultRecord] = {}
    for new in records:
        old = merged.get(new.name)
        if old is None:
            merged[new.name] = new
            continue
        changes = {
            f.name: getattr(new, f.name)
            for f in dataclasses.fields(new)
            if f.name != "extra" and getattr(new, f.name) is not None
        }
        merged[new.name] = old.replace(**changes, extra={**old.extra, **new.extra})
    return list(merged.values())


def upsert_records(path: str | os.PathLike, records: list[ResultRecord]) -> list[ResultRecord]:
    """Merge ``records`` into the file by ``name`` (``merge_records``), atomically. Returns the
    merged list."""
    out = merge_records([*read_records(path), *records])
    write_records(path, out)
    return out


def with_retention(records: list[ResultRecord]) -> list[ResultRecord]:
    """Fill ``retention`` = value / teacher value for records of the same task and metric."""
    teachers = {(r.task, r.metric): r.value for r in records if r.method == "teacher" and r.value}
    out = []
    for r in records:
        ref = teachers.get((r.task, r.metric))
        out.append(r.replace(retention=r.value / ref) if ref and r.value is not None else r)
    return out
