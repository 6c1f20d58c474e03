"""Reports: Markdown and self-contained HTML with tables and plots, rendered from result JSON
(:mod:`distiq.results`), the ``metrics.jsonl`` and the ``predictions.jsonl`` of runs only — never
from models.

Public API::

    from distiq.report import report, collect_inputs, write_report, render, check_goals
    files = report(["out/demo"], "out/demo")     # -> ReportFiles(markdown, html, images, goals)

    files = report(["out/run"], "out/run", goals=[KeepsTeacherAccuracy("qad", Setting(4, 8), 99.0)])

What a report holds, per ``(task, metric)``: the frontier — accuracy against size, one line per
method family (PTQ, QAT, QAD) through its best group at each size, the teacher a reference point
and mixed-precision runs a marker of their own (:mod:`distiq.report.frontier`; the main
figure); a table with one row per group — the runs of one method at one setting and variant
across seeds, accuracy as mean ± std over seeds (:mod:`distiq.report.groups`) — with retention
vs the teacher, latency, the backend and threads it was timed on and the speed vs the teacher
on the same backend; the paired comparison of every two groups at one setting on the same test
questions, with the difference's 95 % interval and "tie" when the test says so
(:mod:`distiq.report.compare`, :mod:`distiq.report.stats`); every run with its seed; the
ablation of the objective's terms (:mod:`distiq.report.ablation`); every backend's latency when
``distiq bench`` timed several; the goals the caller passes (:mod:`distiq.report.goals`;
:data:`DEFAULT_GOALS` when none are given: met / tie / not met / not measured, with the
numbers); per-question-type accuracy when records carry it in ``extra``; an accuracy-vs-latency
plot; the training curves of every objective term (and validation metric) of each run; the
machine(s) the records name in ``extra["machine"]``; the files it was rendered from.
matplotlib is imported only when a plot is drawn, so ``import distiq.report`` is light.
"""

from distiq.report.compare import Comparison, compare, setting_comparisons
from distiq.report.goals import (
    DEFAULT_GOALS,
    BeatsBaseline,
    Goal,
    GoalCheck,
    KeepsTeacherAccuracy,
    Setting,
    check_goals,
    goals_summary,
)
from distiq.report.groups import MIN_SEEDS, Group, group_records
from distiq.report.inputs import ReportInputs, RunCurves, collect_inputs, read_curves
from distiq.report.predictions import QuestionScores, read_predictions
from distiq.report.render import (
    REPORT_HTML,
    REPORT_MD,
    RenderedReport,
    ReportFiles,
    check_writable,
    render,
    report,
    write_report,
)
from distiq.results import merge_records

__all__ = [
    "DEFAULT_GOALS",
    "BeatsBaseline",
    "Goal",
    "GoalCheck",
    "KeepsTeacherAccuracy",
    "Setting",
    "check_goals",
    "goals_summary",
    "Comparison",
    "compare",
    "setting_comparisons",
    "MIN_SEEDS",
    "Group",
    "group_records",
    "QuestionScores",
    "read_predictions",
    "ReportInputs",
    "RunCurves",
    "collect_inputs",
    "merge_records",
    "read_curves",
    "REPORT_HTML",
    "REPORT_MD",
    "RenderedReport",
    "ReportFiles",
    "check_writable",
    "render",
    "report",
    "write_report",
]
