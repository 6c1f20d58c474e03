"""The accuracy goals of the method (issue 6 §5), checked from the result records alone.

At W4A8, ``qad`` keeps ≥ 99 % of the teacher's VQA accuracy and beats ``rtn``, ``gptq`` and plain
``qat``; at W2A16 (group 64) ``qad`` keeps ≥ 90 % and beats ``gptq`` by a wide margin — here
fixed at :data:`WIDE_MARGIN` percentage points of VQA accuracy, so that the check is a number,
not a judgement.

Each goal is one :class:`GoalCheck` with a status ``"met"``, ``"not met"`` or ``"not measured"``
(a record it needs is missing); the numbers it was decided from are kept beside it, so a loss is
shown, never hidden. When several records fit one method at one setting (seeds, variants), the
best value of each method is used — for ``qad`` and for the baselines alike — and its record's
name is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distiq.results import ResultRecord

Status = Literal["met", "not met", "not measured"]

GOAL_TASK = "vqa"
GOAL_METRIC = "vqa_accuracy"
WIDE_MARGIN = 10.0
"""Percentage points of VQA accuracy by which qad must beat gptq at W2A16 to count as "wide"."""


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


W4A8 = Setting(4, 8)
W2A16 = Setting(2, 16, 64)


@dataclass(frozen=True)
class GoalCheck:
    """One goal and what the records say about it.

    ``goal`` is the goal in words; ``measured`` the numbers it was decided from (in words, with
    record names); ``status`` met / not met / not measured; ``value`` the measured quantity
    (retention in %, or the accuracy margin in points) and ``target`` its threshold."""

    goal: str
    measured: str
    status: Status
    value: float | None = None
    target: float | None = None


def _best(records: list[ResultRecord], method: str, setting: Setting) -> ResultRecord | None:
    fits = [
        r
        for r in records
        if r.method == method
        and r.value is not None
        and r.task == GOAL_TASK
        and r.metric == GOAL_METRIC
        and setting.fits(r)
    ]
    return max(fits, key=lambda r: r.value) if fits else None


def _teacher(records: list[ResultRecord]) -> ResultRecord | None:
    teachers = [
        r
        for r in records
        if r.method == "teacher"
        and r.value is not None
        and r.task == GOAL_TASK
        and r.metric == GOAL_METRIC
    ]
    return teachers[-1] if teachers else None  # the one with_retention measures against


def _retention_goal(records: list[ResultRecord], setting: Setting, threshold: float) -> GoalCheck:
    goal = f"{setting.label}: qad keeps ≥ {threshold:g} % of the teacher's VQA accuracy"
    teacher = _teacher(records)
    qad = _best(records, "qad", setting)
    if teacher is None or qad is None:
        missing = " and no ".join(
            what
            for what, rec in (("teacher", teacher), (f"qad {setting.label}", qad))
            if rec is None
        )
        measured = f"no {missing} record with {GOAL_METRIC}"
        return GoalCheck(goal, measured, "not measured", target=threshold)
    retention = 100.0 * qad.value / teacher.value if teacher.value else 0.0
    measured = (
        f"{qad.name}: {qad.value:.2f} vs the teacher ({teacher.name}): {teacher.value:.2f} "
        f"→ {retention:.2f} % retained"
    )
    status: Status = "met" if retention >= threshold else "not met"
    return GoalCheck(goal, measured, status, value=retention, target=threshold)


def _beats_goal(
    records: list[ResultRecord], setting: Setting, baseline: str, margin: float = 0.0
) -> GoalCheck:
    wide = f" by ≥ {margin:g} points" if margin else ""
    goal = f"{setting.label}: qad beats {baseline}{wide}"
    qad = _best(records, "qad", setting)
    base = _best(records, baseline, setting)
    if qad is None or base is None:
        missing = " and no ".join(
            f"{m} {setting.label}" for m, rec in (("qad", qad), (baseline, base)) if rec is None
        )
        measured = f"no {missing} record with {GOAL_METRIC}"
        return GoalCheck(goal, measured, "not measured", target=margin)
    diff = qad.value - base.value
    measured = f"{qad.name}: {qad.value:.2f} vs {base.name}: {base.value:.2f} ({diff:+.2f} points)"
    met = diff >= margin if margin else diff > 0
    return GoalCheck(goal, measured, "met" if met else "not met", value=diff, target=margin)


def check_goals(records: list[ResultRecord]) -> list[GoalCheck]:
    """Check the six goals of issue 6 §5 against ``records`` (VQA accuracy records only), in the
    order the issue states them."""
    return [
        _retention_goal(records, W4A8, 99.0),
        _beats_goal(records, W4A8, "rtn"),
        _beats_goal(records, W4A8, "gptq"),
        _beats_goal(records, W4A8, "qat"),
        _retention_goal(records, W2A16, 90.0),
        _beats_goal(records, W2A16, "gptq", margin=WIDE_MARGIN),
    ]


def goals_summary(checks: list[GoalCheck]) -> str:
    """One sentence: how many goals were met, missed and not measured."""
    counts = {s: sum(c.status == s for c in checks) for s in ("met", "not met", "not measured")}
    parts = [f"{counts['met']} of {len(checks)} goals met"]
    if counts["not met"]:
        parts.append(f"{counts['not met']} not met")
    if counts["not measured"]:
        parts.append(f"{counts['not measured']} not measured")
    return ", ".join(parts) + "."
