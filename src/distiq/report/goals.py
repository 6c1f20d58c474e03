"""Goals checked from result records and per-question scores: the caller says what to check.

A goal is a small frozen dataclass named for what it checks:

- :class:`KeepsTeacherAccuracy` — a method at a bit setting keeps at least a share (in %) of the
  teacher's value of the same task and metric, its mean over seeds against the teacher's;
- :class:`BeatsBaseline` — a method at a bit setting beats a baseline method at the same setting
  by at least a margin in points (0: any positive difference), and the paired test on the same
  questions (:mod:`distiq.report.compare`) rejects a tie.

The records of one method at one setting are grouped across seeds (:mod:`distiq.report.groups`;
a goal names the ``variant`` it means, the plain runs by default; ablation and mixed-precision
groups never count). Where several groups fit (a setting that accepts any group size), the one
with the best mean is used, for the method under test and the baseline alike.

``check_goals(records, goals, predictions)`` turns each goal into one :class:`GoalCheck` with a
status ``"met"``, ``"not met"``, ``"tie"`` (the test cannot tell the two apart: ``p >= ALPHA``)
or ``"not measured"`` (a record it needs is missing, or a run left no ``predictions.jsonl`` for
the test) and the numbers it was decided from, so a loss is shown, never hidden.

:data:`DEFAULT_GOALS` is the set the ``distiq`` demo aims for: at W4A8, ``qad`` keeps ≥ 99 % of
the teacher's VQA accuracy and beats ``rtn``, ``gptq`` and ``qat``; at W2A16 with groups of 64,
``qad`` keeps ≥ 90 % and beats ``gptq`` by ≥ :data:`WIDE_MARGIN` points.

Example::

    goals = [KeepsTeacherAccuracy("qad", Setting(4, 8), min_retention_percent=99.0),
             BeatsBaseline("qad", "gptq", Setting(2, 16, 64), min_margin_points=10.0)]
    inputs = collect_inputs(["out/demo"])
    checks = check_goals(inputs.records, goals, inputs.predictions)
    print(goals_summary(checks))          # "1 of 2 goals met, 1 tie."
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from distiq.report.compare import compare
from distiq.report.groups import Group, fmt_mean_std, group_records, teacher_group
from distiq.report.predictions import QuestionScores
from distiq.results import ResultRecord

Status = Literal["met", "not met", "tie", "not measured"]
STATUSES: tuple[Status, ...] = ("met", "tie", "not met", "not measured")

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

    def fits_group(self, group: Group) -> bool:
        """Whether a (fixed-precision) group is at this setting."""
        key = group.key
        return (
            not key.mixed
            and key.w_bits == self.w_bits
            and key.a_bits == self.a_bits
            and (self.group_size is None or key.group_size == self.group_size)
        )


@dataclass(frozen=True)
class GoalCheck:
    """One goal and what the records say about it.

    ``goal`` is the goal in words; ``measured`` the numbers it was decided from (in words, with
    record names or group labels and seeds); ``status`` met / not met / tie / not measured;
    ``value`` the measured quantity (retention in %, or the difference in points), ``target``
    its threshold and ``p_value`` the paired test's (a :class:`BeatsBaseline` that was tested)."""

    goal: str
    measured: str
    status: Status
    value: float | None = None
    target: float | None = None
    p_value: float | None = None


def _best(
    groups: Sequence[Group],
    method: str,
    setting: Setting,
    variant: str | None,
    task: str,
    metric: str,
) -> Group | None:
    """The group of ``method`` (plain, or ``variant``) at ``setting`` with the best mean."""
    fits = [
        g
        for g in groups
        if g.method == method
        and (g.key.task, g.key.metric) == (task, metric)
        and g.key.variant == variant
        and g.key.ablation is None
        and setting.fits_group(g)
        and g.mean is not None
    ]
    return max(fits, key=lambda g: g.mean) if fits else None


def _describe(group: Group) -> str:
    """``"qad-w4a8: 91.50"`` for one run, ``"qad W4A8 g64 (3 seeds): 91.50 ± 0.12"`` for more."""
    if group.n == 1:
        record = next(r for r in group.records if r.value is not None)
        return f"{record.name}: {record.value:.2f}"
    return f"{group.label} ({group.n} seeds): {fmt_mean_std(group)}"


def _missing(what: list[tuple[str, Group | None]], metric: str) -> str:
    return (
        "no "
        + " and no ".join(name for name, found in what if found is None)
        + f" record with {metric}"
    )


def _named(method: str, setting: Setting, variant: str | None) -> str:
    return f"{method} {setting.label}" + (f" ({variant})" if variant else "")


def _check_threshold(goal: object, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{type(goal).__name__}.{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{type(goal).__name__}.{name} must be ≥ 0, got {value!r}")


@dataclass(frozen=True)
class KeepsTeacherAccuracy:
    """Goal: ``method`` at ``setting`` (its ``variant``; plain runs by default) keeps at least
    ``min_retention_percent`` % of the teacher's ``metric`` on ``task``: retention = the mean
    over its seeds / the teacher's mean."""

    method: str
    setting: Setting
    min_retention_percent: float
    task: str = "vqa"
    metric: str = "vqa_accuracy"
    variant: str | None = None

    def __post_init__(self) -> None:
        _check_threshold(self, "min_retention_percent", self.min_retention_percent)

    def describe(self) -> str:
        variant = f" ({self.variant})" if self.variant else ""
        return (
            f"{self.setting.label}: {self.method}{variant} keeps ≥ "
            f"{self.min_retention_percent:g} % of the teacher's {_metric_words(self.metric)}"
        )

    def check(
        self,
        records: Sequence[ResultRecord],
        predictions: Mapping[str, QuestionScores] | None = None,
    ) -> GoalCheck:
        """Decide the goal from ``records`` (``predictions`` are not needed)."""
        goal, target = self.describe(), self.min_retention_percent
        groups = group_records(records)
        teacher = teacher_group(groups, self.task, self.metric)
        best = _best(groups, self.method, self.setting, self.variant, self.task, self.metric)
        if teacher is None or best is None:
            name = _named(self.method, self.setting, self.variant)
            what = [("teacher", teacher), (name, best)]
            return GoalCheck(goal, _missing(what, self.metric), "not measured", target=target)
        retention = 100.0 * best.mean / teacher.mean if teacher.mean else 0.0
        measured = (
            f"{_describe(best)} vs the teacher ({_describe(teacher)}) → {retention:.2f} % retained"
        )
        status: Status = "met" if retention >= target else "not met"
        return GoalCheck(goal, measured, status, value=retention, target=target)


@dataclass(frozen=True)
class BeatsBaseline:
    """Goal: ``method`` at ``setting`` beats ``baseline`` at the same setting by at least
    ``min_margin_points`` points of ``metric`` on ``task`` (0: any positive difference), and the
    paired test on the questions both answered rejects a tie (``p < ALPHA``). ``variant`` and
    ``baseline_variant`` pick the groups (plain runs by default)."""

    method: str
    baseline: str
    setting: Setting
    min_margin_points: float = 0.0
    task: str = "vqa"
    metric: str = "vqa_accuracy"
    variant: str | None = None
    baseline_variant: str | None = None

    def __post_init__(self) -> None:
        _check_threshold(self, "min_margin_points", self.min_margin_points)

    def describe(self) -> str:
        margin = f" by ≥ {self.min_margin_points:g} points" if self.min_margin_points else ""
        method = self.method + (f" ({self.variant})" if self.variant else "")
        baseline = self.baseline + (f" ({self.baseline_variant})" if self.baseline_variant else "")
        return f"{self.setting.label}: {method} beats {baseline}{margin}"

    def check(
        self,
        records: Sequence[ResultRecord],
        predictions: Mapping[str, QuestionScores] | None = None,
    ) -> GoalCheck:
        """Decide the goal: ``"met"`` when the difference reaches the margin (is positive) and
        the paired test rejects a tie, ``"tie"`` when it does not, ``"not met"`` when the test
        rejects a tie but the difference falls short, ``"not measured"`` when a group or a
        run's ``predictions.jsonl`` is missing."""
        goal, target = self.describe(), self.min_margin_points
        groups = group_records(records)
        best = _best(groups, self.method, self.setting, self.variant, self.task, self.metric)
        base = _best(
            groups, self.baseline, self.setting, self.baseline_variant, self.task, self.metric
        )
        if best is None or base is None:
            what = [
                (_named(self.method, self.setting, self.variant), best),
                (_named(self.baseline, self.setting, self.baseline_variant), base),
            ]
            return GoalCheck(goal, _missing(what, self.metric), "not measured", target=target)
        result = compare(best, base, predictions or {})
        measured = f"{_describe(best)} vs {_describe(base)} → {result.numbers()}"
        if result.notes:
            measured += "; " + "; ".join(result.notes)
        if not result.tested:
            return GoalCheck(goal, measured, "not measured", value=result.difference, target=target)
        diff = result.difference
        status: Status
        if result.tie:
            status = "tie"
        else:
            status = "met" if diff > 0 and diff >= target else "not met"
        return GoalCheck(goal, measured, status, value=diff, target=target, p_value=result.p_value)


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
    records: Sequence[ResultRecord],
    goals: Sequence[Goal] = DEFAULT_GOALS,
    predictions: Mapping[str, QuestionScores] | None = None,
) -> list[GoalCheck]:
    """Check each of ``goals`` against ``records``, in order (one :class:`GoalCheck` per goal);
    ``predictions`` (``ReportInputs.predictions``: each run's per-question scores by record name)
    are what a :class:`BeatsBaseline` is tested on — without them it is ``"not measured"``.

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
    return [goal.check(records, predictions) for goal in goals]


def goals_summary(checks: Sequence[GoalCheck]) -> str:
    """One sentence: how many goals were met, tied, missed and not measured."""
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    parts = [f"{counts['met']} of {len(checks)} goals met"]
    if counts["tie"]:
        parts.append(f"{counts['tie']} tie{'s' if counts['tie'] != 1 else ''}")
    if counts["not met"]:
        parts.append(f"{counts['not met']} not met")
    if counts["not measured"]:
        parts.append(f"{counts['not measured']} not measured")
    return ", ".join(parts) + "."
