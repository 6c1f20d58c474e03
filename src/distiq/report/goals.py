"""Goals checked from result records alone: the caller says what to check, the report renders it.

A goal is a small frozen dataclass named for what it checks:

- :class:`KeepsTeacherAccuracy` — the best record of a method at a bit setting keeps at least a
  share (in %) of the teacher's value of the same task and metric;
- :class:`BeatsBaseline` — the best record of a method at a bit setting beats the best record of
  a baseline method at the same setting, by at least a margin in points (0: strictly more).

``check_goals(records, goals)`` turns each goal into one :class:`GoalCheck` with a status
``"met"``, ``"not met"`` or ``"not measured"`` (a record it needs is missing) and the numbers it
was decided from, so a loss is shown, never hidden. When several records fit one method at one
setting (seeds, variants), the best value of each method is used — for the method under test and
for the baseline alike — and its record's name is shown.

:data:`DEFAULT_GOALS` is the set the ``distiq`` demo aims for: at W4A8, ``qad`` keeps ≥ 99 % of
the teacher's VQA accuracy and beats ``rtn``, ``gptq`` and ``qat``; at W2A16 with groups of 64,
``qad`` keeps ≥ 90 % and beats ``gptq`` by ≥ :data:`WIDE_MARGIN` points.

Example::

    goals = [KeepsTeacherAccuracy("qad", Setting(4, 8), min_retention_percent=99.0),
             BeatsBaseline("qad", "gptq", Setting(2, 16, 64), min_margin_points=10.0)]
    checks = check_goals(records, goals)
    print(goals_summary(checks))          # "1 of 2 goals met, 1 not met."
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from distiq.results import ResultRecord

Status = Literal["met", "not met", "not measured"]

WIDE_MARGIN = 10.0
"""Points of VQA accuracy by which ``qad`` must beat ``gptq`` at W2A16 in :data:`DEFAULT_GOALS`."""

_METRIC_WORDS = {"vqa_accuracy": "VQA accuracy"}


def _metric_words(metric: str) -> str:
    return _METRIC_WORDS.get(metric, metric)


@dataclass(frozen=True)
class Setting:
    """A bit setting: weight bits, activation bits and, if given, the group size it requires
    (``None`` accepts any group size, per-channel included)."""

    w_bits: int
    a_bits: int
    group_size: int | None = None

    @property
    def label(self) -> str:
        group = f", group {self.group_size}" if self.group_size is not None else ""
        return f"W{self.w_bits}A{self.a_bits}{group}"

    def fits(self, record: ResultRecord) -> bool:
        return (
            record.w_bits == self.w_bits
            and record.a_bits == self.a_bits
            and (self.group_size is None or record.group_size == self.group_size)
        )


@dataclass(frozen=True)
class GoalCheck:
    """One goal and what the records say about it.

    ``goal`` is the goal in words; ``measured`` the numbers it was decided from (in words, with
    record names); ``status`` met / not met / not measured; ``value`` the measured quantity
    (retention in %, or the margin in points) and ``target`` its threshold."""

    goal: str
    measured: str
    status: Status
    value: float | None = None
    target: float | None = None


def _fits(record: ResultRecord, task: str, metric: str) -> bool:
    return (
        record.task == task
        and record.metric == metric
        and record.value is not None
        and math.isfinite(record.value)
    )


def _best(
    records: Sequence[ResultRecord], method: str, setting: Setting, task: str, metric: str
) -> ResultRecord | None:
    fits = [r for r in records if r.method == method and _fits(r, task, metric) and setting.fits(r)]
    return max(fits, key=lambda r: r.value) if fits else None


def _teacher(records: Sequence[ResultRecord], task: str, metric: str) -> ResultRecord | None:
    teachers = [r for r in records if r.method == "teacher" and _fits(r, task, metric)]
    return teachers[-1] if teachers else None  # the one with_retention measures against


def _missing(what: list[tuple[str, ResultRecord | None]], metric: str) -> str:
    return (
        "no "
        + " and no ".join(name for name, rec in what if rec is None)
        + f" record with {metric}"
    )


def _check_threshold(goal: object, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{type(goal).__name__}.{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{type(goal).__name__}.{name} must be ≥ 0, got {value!r}")


@dataclass(frozen=True)
class KeepsTeacherAccuracy:
    """Goal: ``method``'s best record at ``setting`` keeps at least ``min_retention_percent`` %
    of the teacher's ``metric`` on ``task`` (retention = value / teacher value)."""

    method: str
    setting: Setting
    min_retention_percent: float
    task: str = "vqa"
    metric: str = "vqa_accuracy"

    def __post_init__(self) -> None:
        _check_threshold(self, "min_retention_percent", self.min_retention_percent)

    def describe(self) -> str:
        return (
            f"{self.setting.label}: {self.method} keeps ≥ {self.min_retention_percent:g} % of "
            f"the teacher's {_metric_words(self.metric)}"
        )

    def check(self, records: Sequence[ResultRecord]) -> GoalCheck:
        goal, target = self.describe(), self.min_retention_percent
        teacher = _teacher(records, self.task, self.metric)
        best = _best(records, self.method, self.setting, self.task, self.metric)
        if teacher is None or best is None:
            what = [("teacher", teacher), (f"{self.method} {self.setting.label}", best)]
            return GoalCheck(goal, _missing(what, self.metric), "not measured", target=target)
        retention = 100.0 * best.value / teacher.value if teacher.value else 0.0
        measured = (
            f"{best.name}: {best.value:.2f} vs the teacher ({teacher.name}): "
            f"{teacher.value:.2f} → {retention:.2f} % retained"
        )
        status: Status = "met" if retention >= target else "not met"
        return GoalCheck(goal, measured, status, value=retention, target=target)


@dataclass(frozen=True)
class BeatsBaseline:
    """Goal: ``method``'s best record at ``setting`` beats ``baseline``'s best record at the same
    setting by at least ``min_margin_points`` points of ``metric`` on ``task`` (0: strictly
    more)."""

    method: str
    baseline: str
    setting: Setting
    min_margin_points: float = 0.0
    task: str = "vqa"
    metric: str = "vqa_accuracy"

    def __post_init__(self) -> None:
        _check_threshold(self, "min_margin_points", self.min_margin_points)

    def describe(self) -> str:
        margin = f" by ≥ {self.min_margin_points:g} points" if self.min_margin_points else ""
        return f"{self.setting.label}: {self.method} beats {self.baseline}{margin}"

    def check(self, records: Sequence[ResultRecord]) -> GoalCheck:
        goal, target = self.describe(), self.min_margin_points
        best = _best(records, self.method, self.setting, self.task, self.metric)
        base = _best(records, self.baseline, self.setting, self.task, self.metric)
        if best is None or base is None:
            label = self.setting.label
            what = [(f"{self.method} {label}", best), (f"{self.baseline} {label}", base)]
            return GoalCheck(goal, _missing(what, self.metric), "not measured", target=target)
        diff = best.value - base.value
        measured = (
            f"{best.name}: {best.value:.2f} vs {base.name}: {base.value:.2f} ({diff:+.2f} points)"
        )
        met = diff >= target if target else diff > 0
        return GoalCheck(goal, measured, "met" if met else "not met", value=diff, target=target)


Goal = KeepsTeacherAccuracy | BeatsBaseline
GOAL_TYPES = (KeepsTeacherAccuracy, BeatsBaseline)

W4A8 = Setting(4, 8)
W2A16 = Setting(2, 16, 64)

DEFAULT_GOALS: tuple[Goal, ...] = (
    KeepsTeacherAccuracy("qad", W4A8, min_retention_percent=99.0),
    BeatsBaseline("qad", "rtn", W4A8),
    BeatsBaseline("qad", "gptq", W4A8),
    BeatsBaseline("qad", "qat", W4A8),
    KeepsTeacherAccuracy("qad", W2A16, min_retention_percent=90.0),
    BeatsBaseline("qad", "gptq", W2A16, min_margin_points=WIDE_MARGIN),
)
"""The goals the demo aims for (see the module docstring), in the order they are reported."""


def check_goals(
    records: Sequence[ResultRecord], goals: Sequence[Goal] = DEFAULT_GOALS
) -> list[GoalCheck]:
    """Check each of ``goals`` against ``records``, in order (one :class:`GoalCheck` per goal).

    Raises:
        TypeError: an item of ``goals`` is not a goal (a :class:`KeepsTeacherAccuracy` or a
            :class:`BeatsBaseline`).
    """
    for index, goal in enumerate(goals):
        if not isinstance(goal, GOAL_TYPES):
            raise TypeError(
                f"goals[{index}] is a {type(goal).__name__}, not a goal; pass "
                "KeepsTeacherAccuracy(...) or BeatsBaseline(...) objects from distiq.report.goals"
            )
    return [goal.check(records) for goal in goals]


def goals_summary(checks: Sequence[GoalCheck]) -> str:
    """One sentence: how many goals were met, missed and not measured."""
    counts = {s: sum(c.status == s for c in checks) for s in ("met", "not met", "not measured")}
    parts = [f"{counts['met']} of {len(checks)} goals met"]
    if counts["not met"]:
        parts.append(f"{counts['not met']} not met")
    if counts["not measured"]:
        parts.append(f"{counts['not measured']} not measured")
    return ", ".join(parts) + "."
