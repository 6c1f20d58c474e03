"""distiq.report.ablation: the objective's terms in order, each row against the row above and
against the task loss alone, on the same questions."""

from pathlib import Path

import pytest

from distiq.report import render
from distiq.report.ablation import (
    ABLATION_TERMS,
    TERM_WORDS,
    ablation_table,
    ablation_terms,
    ablations,
)
from distiq.report.groups import group_records
from distiq.report.inputs import ReportInputs
from distiq.report.predictions import QuestionScores
from distiq.results import ResultRecord

N = 200


def _run(name, label, right, **extra):
    """One run trained with ``label``'s terms, right on questions 0 .. right - 1."""
    scores = {q: float(q < right) for q in range(N)}
    record = ResultRecord(
        name, "qad", 4, 4, value=100 * right / N, seed=0, extra={"ablation": label, **extra}
    )
    return record, QuestionScores(name, Path("mem"), scores)


def test_terms_are_the_objectives():
    from distiq.objective import TERM_NAMES

    # every term of the objective, in its order, with its words in the table
    assert [t for t in ABLATION_TERMS if t in TERM_NAMES] == list(TERM_NAMES)
    assert set(ABLATION_TERMS) == set(TERM_WORDS)
    assert ablation_terms("kd + TASK") == ("task", "kd")
    assert ablation_terms("+".join(reversed(TERM_NAMES))) == TERM_NAMES
    assert ablation_terms("full") == ("full",)
    assert ablation_terms("task+mystery") == ("task", "mystery")


def test_rows_in_order_each_tested_against_the_row_above_and_task_only():
    runs = [  # given out of order
        _run("full", "full", 178),
        _run("t-kd-feat", "task+kd+feat", 185),
        _run("t", "task", 160),
        _run("t-kd", "task+kd", 165),
        _run("small-t", "task", 150, variant="half-depth"),
        _run("small-t-kd", "task+kd", 170, variant="half-depth"),
    ]
    records = [r for r, _ in runs]
    predictions = {r.name: s for r, s in runs}
    found = ablations(group_records(records), predictions)
    assert [a.title for a in found] == [
        "qad W4A4, vqa (vqa_accuracy)",
        "qad W4A4 half-depth, vqa (vqa_accuracy)",
    ]
    rows = found[0].rows
    assert [row.group.key.ablation for row in rows] == ["task", "task+kd", "task+kd+feat", "full"]
    assert rows[0].vs_previous is None and rows[0].vs_task is None
    # nested answers: the only discordant questions are the extra ones right, so McNemar by hand
    assert rows[1].vs_previous.p_value == 2 / 2**5  # 5 more right: p = 0.0625, a tie
    assert rows[1].vs_task is rows[1].vs_previous
    assert rows[2].vs_previous.p_value == 2 / 2**20 and rows[2].vs_previous.difference == 10.0
    assert rows[2].vs_task.p_value == 2 / 2**25 and rows[2].vs_task.difference == 12.5
    assert rows[3].vs_previous.difference == pytest.approx(-3.5)
    assert rows[3].vs_previous.p_value == 2 / 2**7

    header, cells = ablation_table(found[0])
    assert header[:4] == ["terms", "adds", "accuracy", "seeds"]
    assert [row[:2] for row in cells] == [
        ["task", "task loss only"],
        ["task+kd", "+ logit KD"],
        ["task+kd+feat", "+ feature KD"],
        ["full", "full objective"],
    ]
    assert cells[0][2:] == ["80.00", "1 (< 3)", "—", "—", "—", "—", "—", "—"]
    low, high = rows[1].vs_previous.interval
    assert cells[1][4:7] == [f"+2.50 [{low:+.2f}, {high:+.2f}]", "0.0625", "tie"]
    assert cells[2][6] == "better" and cells[2][8:] == ["< 0.0001", "better"]
    assert cells[3][6] == "worse"
    small = found[1].rows
    assert small[1].vs_task.difference == pytest.approx(10.0)


def test_rendered_only_when_there_are_ablation_runs():
    runs = [_run("t", "task", 160), _run("t-kd", "task+kd", 170)]
    inputs = ReportInputs(
        records=[r for r, _ in runs],
        curves=[],
        sources=[],
        predictions={r.name: s for r, s in runs},
    )
    markdown = render(inputs, goals=[]).markdown
    assert "## Ablation of the objective" in markdown
    assert "### qad W4A4, vqa (vqa_accuracy)" in markdown
    assert "| task+kd | + logit KD | 85.00 | 1 (\\< 3) | +5.00 \\[" in markdown
    untested = render(ReportInputs(records=[r for r, _ in runs], curves=[], sources=[]), goals=[])
    assert "not tested: no predictions.jsonl for t-kd, t" in untested.markdown
    plain = [ResultRecord("q", "qad", 4, 4, value=80.0)]
    assert "Ablation" not in render(ReportInputs(plain, [], []), goals=[]).markdown
