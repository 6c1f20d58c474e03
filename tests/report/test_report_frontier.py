"""distiq.report.frontier: which groups land on which family's line, the smallest model keeping
a share of the teacher, and the figure (labels that overlap nothing, mixed precision marked)."""

import io
import math

import pytest
from matplotlib.text import Text
from PIL import Image

from distiq.report import plots
from distiq.report.frontier import frontier, frontier_figure, frontier_table, smallest_table
from distiq.report.groups import group_records
from distiq.results import ResultRecord

MIXED = {"bits_allocation": {"vision": 8, "language_model": 4}, "size_budget_mb": 0.6}


def _seeds(name, method, w, a, group, size, values, **extra):
    return [
        ResultRecord(
            f"{name}-s{s}", method, w, a, group, size_mb=size, value=v, seed=s, extra=extra
        )
        for s, v in enumerate(values)
    ]


def records():
    return [
        ResultRecord("teacher", "teacher", size_mb=3.74, value=90.0),
        *_seeds("rtn-w4a8", "rtn", 4, 8, None, 0.73, [88.8, 89.0, 88.9]),
        *_seeds("gptq-w4a8", "gptq", 4, 8, None, 0.73, [89.2, 89.4, 89.3]),
        *_seeds("rtn-w4a4", "rtn", 4, 4, None, 0.73, [84.0, 84.2, 83.8]),
        *_seeds("gptq-w2", "gptq", 2, 16, 64, 0.53, [86.0, 86.2, 85.8]),
        *_seeds("qat-w4a8", "qat", 4, 8, None, 0.73, [89.1, 89.3, 89.2]),
        # 0.735 MB is within 2 % of 0.73: the same size, and qat's best there
        *_seeds("qat-w4a4", "qat", 4, 4, None, 0.735, [89.3, 89.5, 89.4]),
        *_seeds("qad-w4a8", "qad", 4, 8, None, 0.73, [89.5, 89.7, 89.6]),
        *_seeds("qad-hd", "qad", 4, 8, None, 0.45, [86.4, 86.6, 86.5], variant="half-depth"),
        *_seeds("kd-hd", "kd", 16, 16, None, 2.1, [87.4, 87.6, 87.5], variant="half-depth"),
        *_seeds("qad-mixed", "qad", 4, 8, None, 0.59, [89.0, 89.2, 89.1], **MIXED),
        *_seeds("ablation", "qad", 4, 4, None, 0.73, [95.0, 95.0, 95.0], ablation="task"),
        ResultRecord("no-size", "qad", 3, 8, value=99.0),
    ]


def test_each_family_line_is_its_best_group_at_each_size():
    front = frontier(group_records(records()))
    lines = {family: [g.label for g in line] for family, line in front.lines.items()}
    assert lines == {
        "PTQ": ["gptq W2A16 g64", "gptq W4A8"],
        "QAT": ["qat W4A4"],
        "QAD": ["qad W4A8 half-depth", "qad W4A8", "kd W16A16 half-depth"],
    }
    assert sorted(g.label for g in front.others) == ["qat W4A8", "rtn W4A4", "rtn W4A8"]
    assert [g.label for g in front.mixed] == ["qad mixed (budget 0.60 MB)"]
    assert [g.label for g in front.references] == ["teacher"]
    # means over seeds and their sample standard deviation
    gptq = front.lines["PTQ"][1]
    assert gptq.mean == pytest.approx(89.3) and gptq.std == pytest.approx(0.1)
    # ablation runs and records without a size stay off the figure
    every = [*front.others, *front.mixed, *(g for line in front.lines.values() for g in line)]
    assert not any(g.key.ablation or g.size_mb is None for g in every)


def test_tables_read_off_the_smallest_model():
    front = frontier(group_records(records()))
    header, rows = frontier_table(front, 90.0)
    assert header == ["family", "size MB", "model", "accuracy", "seeds", "retention"]
    assert ["PTQ", "0.73", "gptq W4A8", "89.30 ± 0.10", "3", "99.2 %"] in rows
    assert rows[-1] == [
        "QAD (mixed)",
        "0.59",
        "qad mixed (budget 0.60 MB)",
        "89.10 ± 0.10",
        "3",
        "99.0 %",
    ]
    header, rows = smallest_table(front, 90.0)
    assert header == ["keeps ≥", "PTQ", "QAT", "QAD", "any"]
    assert rows[0] == ["99 %", "gptq W4A8 (0.73 MB, 89.30)", "qat W4A8 (0.73 MB, 89.20)",
                       "qad mixed (budget 0.60 MB) (0.59 MB, 89.10)",
                       "qad mixed (budget 0.60 MB) (0.59 MB, 89.10)"]  # fmt: skip
    assert rows[2][0] == "95 %" and rows[2][1] == "gptq W2A16 g64 (0.53 MB, 86.00)"
    assert rows[2][3] == rows[2][4] == "qad W4A8 half-depth (0.45 MB, 86.50)"
    assert smallest_table(front, None) is None


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_figure_labels_every_point_and_overlaps_nothing():
    groups = group_records(records())
    figure = frontier_figure(groups)
    axes = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    texts = [t for t in axes.texts]
    extents = [Text.get_window_extent(t, renderer) for t in texts]
    for i, a in enumerate(extents):
        for b in extents[i + 1 :]:
            assert not _overlap(a, b), (a, b)
    labelled = "\n".join(t.get_text() for t in texts)
    names = {line.split(":")[0] for line in labelled.splitlines()}
    assert names == {
        "teacher",
        "gptq W2A16 g64",
        "gptq W4A8",
        "qat W4A4",
        "qad W4A8 half-depth",
        "qad W4A8",
        "kd W16A16 half-depth",
        "qad mixed (budget 0.60 MB)",
    }
    front = frontier(groups)
    radius = math.sqrt(plots._MARKER_AREA) * plots.DPI / 72 / 2
    points = [g for line in front.lines.values() for g in line] + front.mixed + front.references
    for group in points:
        x, y = axes.transData.transform((group.size_mb, group.mean))
        for extent in extents:
            gap = math.hypot(
                max(extent.x0 - x, 0, x - extent.x1), max(extent.y0 - y, 0, y - extent.y1)
            )
            assert gap >= radius, (group.label, extent)
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == [
        "PTQ (rtn, gptq)",
        "QAT (qat)",
        "QAD (qad, kd, qlora-kd)",
        "not best at its size",
        "mixed precision",
        "teacher (dashed line)",
    ]
    assert axes.get_xscale() == "log"  # 0.45 to 3.74 MB
    png = plots.accuracy_vs_size(groups)
    assert Image.open(io.BytesIO(png)).size == (900, 600)


def test_nothing_to_draw():
    no_size = [ResultRecord("a", "qad", 4, 8, value=80.0)]
    assert frontier_figure(group_records(no_size)) is None
    assert plots.accuracy_vs_size(group_records([])) is None
    one = [ResultRecord("t", "teacher", size_mb=2.0, value=90.0)]
    figure = frontier_figure(group_records(one))
    assert figure.axes[0].get_xscale() == "linear"
    assert [t.get_text() for t in figure.axes[0].texts] == ["teacher"]
