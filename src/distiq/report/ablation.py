"""The ablation of the objective: which terms buy how much accuracy, with seeds and paired tests.

An ablation run carries ``extra["ablation"]``: the objective terms it trained with, joined by
``+`` (``"task"``, ``"task+kd"``, ``"task+kd+feat"``, ...; spaces and case are ignored), or
``"full"`` for the complete objective of the recipe. The terms are the objective's own names, in
its order (:data:`ABLATION_TERMS`, which follows ``distiq.objective.TERM_NAMES``; a test keeps
the two in step, since importing the objective here would import torch). Runs of one method at one
setting and variant (a smaller student, ...) form one ablation; its rows are ordered by how many
terms they use, then by the objective's order of the terms, ``"full"`` last — so that each row
of the usual cumulative ablation adds one term to the row above it. Each row shows the mean ±
std over its seeds and the paired test (:mod:`distiq.report.compare`) against the row above and
against ``"task"`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distiq.report.compare import Comparison, compare, fmt_p
from distiq.report.groups import Group, fmt_mean_std, fmt_seeds
from distiq.report.predictions import QuestionScores

ABLATION_TERMS: tuple[str, ...] = (
    "task",
    "kd",
    "feat",
    "attn",
    "reg",
    "pd",
    "qk_entropy",
    "rounding",
)
"""The objective's terms in its order (``distiq.objective.TERM_NAMES``)."""
TERM_WORDS = {
    "task": "task loss",
    "kd": "logit KD",
    "feat": "feature KD",
    "attn": "attention alignment",
    "reg": "regression loss",
    "pd": "prediction difference",
    "qk_entropy": "Q/K entropy",
    "rounding": "rounding regulariser",
}
FULL = "full"
TASK_ONLY = ("task",)

Table = tuple[list[str], list[list[str]]]


def ablation_terms(label: str) -> tuple[str, ...]:
    """The terms of an ablation label, in the objective's order (unknown names after, sorted);
    ``("full",)`` for the full objective."""
    order = ABLATION_TERMS
    parts = {part.strip().lower() for part in label.split("+") if part.strip()}
    known = [t for t in order if t in parts]
    return (*known, *sorted(parts - set(order)))


def _row_order(label: str) -> tuple:
    terms = ablation_terms(label)
    if terms == (FULL,):
        return (1, 0, (), label)
    order = ABLATION_TERMS
    positions = tuple(order.index(t) if t in order else len(order) for t in terms)
    return (0, len(terms), positions, label)


@dataclass(frozen=True)
class AblationRow:
    """One row: the ``group`` of runs with one set of terms, compared with the row above
    (``vs_previous``) and with the task loss alone (``vs_task``); ``None`` where there is no
    such row (or the row is that one)."""

    group: Group
    vs_previous: Comparison | None
    vs_task: Comparison | None

    @property
    def terms(self) -> tuple[str, ...]:
        return ablation_terms(self.group.key.ablation or "")


@dataclass(frozen=True)
class Ablation:
    """The rows of one ablation: ``title`` names the method, setting and variant."""

    title: str
    rows: list[AblationRow]


def ablations(groups: Sequence[Group], predictions: Mapping[str, QuestionScores]) -> list[Ablation]:
    """Every ablation among ``groups`` (those with ``extra["ablation"]``), in group order."""
    found: dict[tuple, list[Group]] = {}
    for group in groups:
        if group.key.ablation is None:
            continue
        key = group.key
        setting = (key.task, key.metric, key.method, key.w_bits, key.a_bits, key.group_size)
        found.setdefault((*setting, key.variant, key.mixed, key.budget_mb), []).append(group)
    out = []
    for members in found.values():
        members = sorted(members, key=lambda g: _row_order(g.key.ablation or ""))
        task = next((g for g in members if ablation_terms(g.key.ablation or "") == TASK_ONLY), None)
        rows = []
        for index, group in enumerate(members):
            previous = compare(group, members[index - 1], predictions) if index else None
            vs_task = None
            if task is not None and group is not task:
                vs_task = (
                    previous if members[index - 1] is task else compare(group, task, predictions)
                )
            rows.append(AblationRow(group, previous, vs_task))
        first = members[0]
        title = f"{first.method} {first.setting}, {first.key.task} ({first.key.metric})"
        out.append(Ablation(title, rows))
    return out


def _adds(row: AblationRow, previous: AblationRow | None) -> str:
    terms = row.terms
    if terms == (FULL,):
        return "full objective"
    if previous is None or previous.terms == (FULL,):
        return " + ".join(TERM_WORDS.get(t, t) for t in terms) + (
            " only" if len(terms) == 1 else ""
        )
    added = [t for t in terms if t not in previous.terms]
    dropped = [t for t in previous.terms if t not in terms]
    words = [f"+ {TERM_WORDS.get(t, t)}" for t in added]
    words += [f"− {TERM_WORDS.get(t, t)}" for t in dropped]
    return ", ".join(words) or "same terms"


def _comparison_cells(comparison: Comparison | None) -> list[str]:
    if comparison is None:
        return ["—", "—", "—"]
    if not comparison.tested:
        difference = "—" if comparison.difference is None else f"{comparison.difference:+.2f}"
        return [difference, "—", "not tested"]
    low, high = comparison.interval
    return [
        f"{comparison.difference:+.2f} [{low:+.2f}, {high:+.2f}]",
        fmt_p(comparison.p_value),
        "tie" if comparison.tie else ("better" if comparison.difference > 0 else "worse"),
    ]


def ablation_table(ablation: Ablation) -> Table:
    """Cells of one ablation: terms, what the row adds, accuracy mean ± std, seeds, and the
    paired test against the row above and against the task loss alone (difference in points
    with its 95 % interval, p, verdict)."""
    header = [
        "terms",
        "adds",
        "accuracy",
        "seeds",
        "vs row above (points, 95 % CI)",
        "p",
        "verdict",
        "vs task only (points, 95 % CI)",
        "p",
        "verdict",
    ]
    rows = []
    for index, row in enumerate(ablation.rows):
        previous = ablation.rows[index - 1] if index else None
        rows.append(
            [
                row.group.key.ablation or "",
                _adds(row, previous),
                fmt_mean_std(row.group),
                fmt_seeds(row.group),
                *_comparison_cells(row.vs_previous),
                *_comparison_cells(row.vs_task),
            ]
        )
    return header, rows
