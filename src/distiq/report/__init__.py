"""Reports: Markdown and self-contained HTML with tables and plots, rendered from result JSON
(:mod:`distiq.results`) and the ``metrics.jsonl`` of runs only — never from models.

Public API::

    from distiq.report import report, collect_inputs, write_report, render, check_goals
    files = report(["out/demo"], "out/demo")     # -> ReportFiles(markdown, html, images)

    files = report(["out/run"], "out/run", goals=[KeepsTeacherAccuracy("qad", Setting(4, 8), 99.0)])

What a report holds: per ``(task, metric)`` a table (name, method, bits W/A, group, size MB,
accuracy, retention vs the teacher, latency, the backend and threads it was timed on, and speed
vs the teacher on the same backend and threads), with plain sentences naming every model slower
than its teacher; every backend's latency when ``distiq bench`` timed several; the goals the
caller passes (:mod:`distiq.report.goals`; :data:`DEFAULT_GOALS` when none are given) checked
from the numbers (met / not met / not measured, with the numbers); per-question-type accuracy
when records carry it in ``extra``; accuracy-vs-size and accuracy-vs-latency plots; the training
curves of every objective term (and validation metric) of each run; the machine(s) the records
name in ``extra["machine"]``; the files it was rendered from. matplotlib is imported only when a
plot is drawn, so ``import distiq.report`` is light.
"""

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
from distiq.report.inputs import ReportInputs, RunCurves, collect_inputs, read_curves
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
