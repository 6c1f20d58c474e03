"""Paired comparisons of two groups of runs on the same test questions.

``compare(a, b, predictions)`` compares group ``a`` with group ``b`` (:mod:`distiq.report.groups`)
on the questions every run of both answered (their ``predictions.jsonl``):

- each question's score is averaged over a group's seeds, giving ``x_q`` for ``a`` and ``y_q``
  for ``b``; the difference is ``d_q = x_q - y_q`` and the reported difference, in points, is
  ``100 · mean(d_q)`` — the difference of the two groups' mean accuracies on those questions;
- the test (:mod:`distiq.report.stats`): with one run on each side and every score 0 or 1, the
  exact McNemar test on the per-question correctness; otherwise the paired sign-flip permutation
  test on ``d_q``;
- the 95 % interval of the difference: a bootstrap over questions (seeded).

Pooling seeds by averaging within a question keeps the question as the unit that is sampled: the
runs of one method answer a question in correlated ways, so pairing every seed with every seed
as if they were separate questions would overstate the evidence. With one binary run per side the
sign-flip test *is* McNemar's test (the discordant questions' signs are the binomial count). With
equal numbers of runs on both sides the null hypothesis — the two methods are exchangeable on
every question — makes the test exact; with unequal numbers it tests that the per-question
differences are symmetric about zero. The spread between seeds is reported beside it
(mean ± std); the test is about the questions.

A comparison is a tie when ``p >= ALPHA`` (:data:`distiq.report.stats.ALPHA`). A run without a
``predictions.jsonl`` leaves the comparison untested, which it says, with the record means'
difference for information.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from distiq.report import stats
from distiq.report.groups import Group, group_order
from distiq.report.predictions import QuestionScores

ACCURACY_TOLERANCE = 0.01
"""Points by which a run's predictions may differ from its record's value before the report
says that the two come from different evaluations."""


@dataclass(frozen=True)
class Comparison:
    """Group ``a`` against group ``b`` (see the module docstring).

    ``difference`` and ``interval`` are in points (A − B); ``p_value`` is two-sided and ``None``
    when the comparison could not be tested (``reason`` says why; ``difference`` is then the
    difference of the record means, if both have one); ``questions`` is how many questions were
    compared; ``notes`` flag inputs that disagree with each other."""

    a: Group
    b: Group
    difference: float | None = None
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    test: str | None = None
    questions: int = 0
    reason: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def tested(self) -> bool:
        return self.p_value is not None

    @property
    def tie(self) -> bool:
        """The test does not reject that the two are equal (``p >= ALPHA``)."""
        return self.p_value is not None and self.p_value >= stats.ALPHA

    @property
    def verdict(self) -> str:
        """``"not tested"``, ``"tie"``, or which group is better."""
        if not self.tested:
            return "not tested"
        if self.tie or not self.difference:
            return "tie"
        return f"{(self.a if self.difference > 0 else self.b).label} better"

    def numbers(self) -> str:
        """The difference with its interval and test, in words."""
        if not self.tested:
            means = "" if self.difference is None else f"{self.difference:+.2f} points; "
            return f"{means}not tested: {self.reason}"
        low, high = self.interval
        return (
            f"{self.difference:+.2f} points [95 % CI {low:+.2f}, {high:+.2f}], "
            f"p {_relation(self.p_value)} ({self.test}, {self.questions:,} questions)"
        )


def fmt_p(p: float | None) -> str:
    """A p-value with three significant digits (two below 0.01, ``< 0.0001`` below that), never
    rounded up to the threshold: a p below :data:`~distiq.report.stats.ALPHA` reads below it."""
    if p is None:
        return "—"
    if p < 1e-4:
        return "< 0.0001"
    text = f"{p:.2g}" if p < 0.01 else f"{p:.3g}"
    if p < stats.ALPHA <= float(text):
        return f"< {stats.ALPHA:g}"
    return text


def _relation(p: float) -> str:
    """``"= 0.013"`` or ``"< 0.0001"``."""
    text = fmt_p(p)
    return text if text.startswith("<") else f"= {text}"


def _valued(group: Group) -> list:
    return [r for r in group.records if r.value is not None]


def _mean_difference(a: Group, b: Group) -> float | None:
    return None if a.mean is None or b.mean is None else a.mean - b.mean


def compare(a: Group, b: Group, predictions: Mapping[str, QuestionScores]) -> Comparison:
    """Compare group ``a`` with group ``b`` question by question (module docstring)."""
    runs_a, runs_b = _valued(a), _valued(b)
    if not runs_a or not runs_b:
        empty = a if not runs_a else b
        return Comparison(a, b, reason=f"{empty.label} has no record with a value")
    dense = sorted({r.task for r in runs_a + runs_b if r.task != "vqa"})
    if dense:  # mIoU / mAP / depth metrics are computed over the split, not per question
        reason = f"{'/'.join(dense)} scores the whole split, not question by question"
        return Comparison(a, b, difference=_mean_difference(a, b), reason=reason)
    missing = [r.name for r in runs_a + runs_b if r.name not in predictions]
    if missing:
        reason = f"no predictions.jsonl for {', '.join(missing)}"
        return Comparison(a, b, difference=_mean_difference(a, b), reason=reason)
    scores = [predictions[r.name] for r in runs_a + runs_b]
    first = scores[0].scores
    common = [q for q in first if all(q in s.scores for s in scores[1:])]
    if not common:
        reason = "the runs answered no question in common"
        return Comparison(a, b, difference=_mean_difference(a, b), reason=reason)
    table = np.array([[s.scores[q] for q in common] for s in scores])  # (runs, Q)
    x = table[: len(runs_a)].mean(axis=0)
    y = table[len(runs_a) :].mean(axis=0)
    d = x - y
    notes = []
    answered = max(len(s.scores) for s in scores)
    if len(common) < answered:
        notes.append(
            f"compared on the {len(common):,} questions every run answered (some runs answered "
            f"up to {answered:,})"
        )
    for record, run in zip(runs_a + runs_b, scores, strict=True):
        if abs(run.accuracy - record.value) > ACCURACY_TOLERANCE:
            notes.append(
                f"{record.name}: its predictions.jsonl scores {run.accuracy:.2f} and its record "
                f"{record.value:.2f}; they come from different evaluations"
            )
    if len(runs_a) == 1 and len(runs_b) == 1 and all(s.binary for s in scores):
        right_a = int(np.sum((x == 1.0) & (y == 0.0)))
        right_b = int(np.sum((x == 0.0) & (y == 1.0)))
        p_value, test = stats.mcnemar_exact(right_a, right_b), "exact McNemar"
    else:
        result = stats.sign_flip_test(d)
        p_value = result.p_value
        test = (
            "sign-flip permutation, exact"
            if result.exact
            else f"sign-flip permutation, {result.resamples:,} random flips"
        )
    low, high = stats.bootstrap_interval(d)
    return Comparison(
        a,
        b,
        difference=100.0 * float(d.mean()),
        interval=(100.0 * low, 100.0 * high),
        p_value=p_value,
        test=test,
        questions=len(common),
        notes=tuple(notes),
    )


def setting_comparisons(
    groups: Sequence[Group], predictions: Mapping[str, QuestionScores]
) -> list[Comparison]:
    """Every pair of groups at the same setting that are the same variant (``qad`` vs ``gptq``,
    ``qad half-depth`` vs ``gptq half-depth``) or the same method (``qad label-free`` vs
    ``qad``); the later group in :func:`distiq.report.groups.group_order` (e.g. ``qad``) first.
    Ablation groups are left out: they have their own table."""
    kept = sorted(
        (g for g in groups if g.key.ablation is None and g.mean is not None), key=group_order
    )
    pairs = [
        (i, j)
        for i, b in enumerate(kept)
        for j in range(i + 1, len(kept))
        if kept[j].same_setting(b)
        and (kept[j].key.variant == b.key.variant or kept[j].method == b.method)
    ]
    # by setting, then the latest method first against each earlier one
    pairs.sort(key=lambda ij: (group_order(kept[ij[0]])[:4], -ij[1], ij[0]))
    return [compare(kept[j], kept[i], predictions) for i, j in pairs]
