"""Records grouped across seeds: one group per method at one setting, with mean ± std over seeds.

A group holds every record of one ``(task, metric, method, w_bits, a_bits, group_size)`` that
also agrees on the labels below, read from the record's ``extra``:

- ``extra["variant"]`` — a free label for a run that differs from the method's plain recipe in
  something the bit setting does not show: ``"label-free"`` (distilled without labels),
  ``"half-depth"`` (a smaller student), ... Records without it are the plain variant (``None``).
- ``extra["ablation"]`` — the objective terms an ablation run trained with, joined by ``+`` in
  the objective's order (``"task"``, ``"task+kd"``, ``"task+kd+feat"``, ...) or ``"full"``
  (:mod:`distiq.report.ablation`). Ablation groups get their own table and stay off the frontier
  and the comparisons between methods.
- ``extra["bits_allocation"]`` — a mixed-precision run's bits per part (a mapping such as
  ``{"vision": 8, "language_model": 4}``) with ``extra["size_budget_mb"]``, the size budget it
  was allocated under. Such records are grouped by method and budget (their nominal
  ``w_bits`` / ``a_bits`` / ``group_size`` are ignored) and labelled ``mixed (budget X MB)``.

The records of a group are its seeds: ``mean`` is their mean value, ``std`` the *sample*
standard deviation (divisor n − 1; ``None`` for a single seed), ``n`` the number of records with
a value. The report asks for at least :data:`MIN_SEEDS` seeds per group and marks groups with
fewer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distiq.report.tables import METHOD_ORDER, fmt_size
from distiq.results import ResultRecord

MIN_SEEDS = 3
"""Seeds a group needs for its spread to count; groups with fewer are marked in the report."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "PTQ": ("rtn", "gptq"),
    "QAT": ("qat",),
    "QAD": ("qad", "kd", "qlora-kd"),
}
"""Method families, one frontier line each: post-training quantization, quantization-aware
training, and quantization-aware distillation with the distilled students."""
REFERENCE_METHODS = ("teacher", "fp")


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class GroupKey:
    """What the records of one group share (see the module docstring); for a mixed-precision
    group ``w_bits``, ``a_bits`` and ``group_size`` are ``None``."""

    task: str
    metric: str
    method: str
    w_bits: int | None
    a_bits: int | None
    group_size: int | None
    variant: str | None = None
    ablation: str | None = None
    mixed: bool = False
    budget_mb: float | None = None


def key_of(record: ResultRecord) -> GroupKey:
    """The group ``record`` belongs to."""
    extra = record.extra
    variant, ablation = _text(extra.get("variant")), _text(extra.get("ablation"))
    common = dict(task=record.task, metric=record.metric, method=record.method)
    if isinstance(extra.get("bits_allocation"), Mapping):
        budget = _number(extra.get("size_budget_mb"))
        return GroupKey(
            **common,
            w_bits=None,
            a_bits=None,
            group_size=None,
            variant=variant,
            ablation=ablation,
            mixed=True,
            budget_mb=budget,
        )
    group = record.group_size if record.w_bits < 16 else None
    return GroupKey(
        **common,
        w_bits=record.w_bits,
        a_bits=record.a_bits,
        group_size=group,
        variant=variant,
        ablation=ablation,
    )


@dataclass(frozen=True)
class Group:
    """The records of one :class:`GroupKey` (its seeds), sorted by seed then name."""

    key: GroupKey
    records: tuple[ResultRecord, ...]

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.records if r.value is not None and math.isfinite(r.value)]

    @property
    def n(self) -> int:
        """Records with a value (seeds)."""
        return len(self.values)

    @property
    def mean(self) -> float | None:
        values = self.values
        return math.fsum(values) / len(values) if values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n − 1); ``None`` below two seeds."""
        values = self.values
        return statistics.stdev(values) if len(values) >= 2 else None

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.records]

    @property
    def size_mb(self) -> float | None:
        sizes = [r.size_mb for r in self.records if _number(r.size_mb) is not None]
        return math.fsum(sizes) / len(sizes) if sizes else None

    @property
    def method(self) -> str:
        return self.key.method

    @property
    def family(self) -> str | None:
        """The frontier line this group belongs to (``None`` for the teacher and others)."""
        return next((f for f, methods in FAMILIES.items() if self.method in methods), None)

    @property
    def bits_label(self) -> str:
        """The bit setting in short: ``W4A8``, ``W2A16 g64``, ``mixed (budget 0.60 MB)``."""
        key = self.key
        if key.mixed:
            budget = (
                "no budget" if key.budget_mb is None else f"budget {fmt_size(key.budget_mb)} MB"
            )
            return f"mixed ({budget})"
        text = f"W{key.w_bits}A{key.a_bits}"
        return text if key.group_size is None else f"{text} g{key.group_size}"

    @property
    def setting(self) -> str:
        """:attr:`bits_label` with the variant after it: ``W4A8 half-depth``."""
        variant = self.key.variant
        return f"{self.bits_label} {variant}" if variant else self.bits_label

    @property
    def label(self) -> str:
        """Method, setting and variant: ``qad W4A8 half-depth``; the teacher is ``teacher``."""
        if self.method == "teacher" and not self.key.variant:
            return "teacher"
        return f"{self.method} {self.setting}"

    @property
    def allocation(self) -> Mapping[str, Any] | None:
        """A mixed-precision group's bits per part (its first record's)."""
        for record in self.records:
            found = record.extra.get("bits_allocation")
            if isinstance(found, Mapping):
                return found
        return None

    def same_setting(self, other: Group) -> bool:
        """Same task, metric and bit setting (mixed groups: the same budget); any method."""
        a, b = self.key, other.key
        return (a.task, a.metric, a.w_bits, a.a_bits, a.group_size, a.mixed, a.budget_mb) == (
            b.task,
            b.metric,
            b.w_bits,
            b.a_bits,
            b.group_size,
            b.mixed,
            b.budget_mb,
        )


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def group_order(group: Group) -> tuple:
    """Reference models first, then falling bit widths, group size, method, variant; mixed
    groups after the fixed settings, by falling budget."""
    key = group.key
    if key.mixed:
        return (1, -(key.budget_mb or 0.0), 0, 0, _method_rank(key.method), key.variant or "")
    return (
        0,
        -(key.w_bits or 0),
        -(key.a_bits or 0),
        -1 if key.group_size is None else key.group_size,
        _method_rank(key.method),
        key.variant or "",
    )


def group_records(records: Sequence[ResultRecord]) -> list[Group]:
    """Every record in exactly one group, groups in :func:`group_order`, records by seed."""
    found: dict[GroupKey, list[ResultRecord]] = {}
    for record in records:
        found.setdefault(key_of(record), []).append(record)
    groups = [
        Group(key, tuple(sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.name))))
        for key, members in found.items()
    ]
    return sorted(groups, key=lambda g: (group_order(g), g.key.ablation or ""))


def teacher_group(groups: Sequence[Group], task: str, metric: str) -> Group | None:
    """The plain teacher group of ``task`` and ``metric`` that has a value, if any."""
    for group in groups:
        key = group.key
        plain = key.variant is None and key.ablation is None and not key.mixed
        same = (key.task, key.metric) == (task, metric)
        if key.method == "teacher" and plain and same and group.mean is not None:
            return group
    return None


def fmt_mean_std(group: Group, digits: int = 2) -> str:
    """``"89.67 ± 0.10"``; a single seed shows its value alone, no value ``—``."""
    mean, std = group.mean, group.std
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_seeds(group: Group) -> str:
    """``"3"``, or ``"1 (< 3)"`` for a student below :data:`MIN_SEEDS` (the teacher, a
    reference, is not marked)."""
    if group.n >= MIN_SEEDS or group.method in REFERENCE_METHODS:
        return str(group.n)
    return f"{group.n} (< {MIN_SEEDS})"
