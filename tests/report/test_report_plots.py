"""distiq.report.plots and .labels: labels that never overlap, text drawn as written, curves with
a lone point on a readable axis."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.text import Text

from distiq.report import labels, plots
from distiq.report.frontier import frontier_figure
from distiq.report.groups import group_records
from distiq.report.inputs import RunCurves, read_curves
from distiq.results import ResultRecord


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _label_extents(figure):
    """The axes and the drawn extent of each label's text (its leader line left out)."""
    axes = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    return axes, [Text.get_window_extent(text, renderer) for text in axes.texts]


@pytest.mark.parametrize("x_of", [lambda r: r.size_mb, lambda r: r.latency_ms], ids=["size", "ms"])
def test_crowded_labels_overlap_nothing(fixtures, x_of):
    """The full demo's records: four points on one spot at each size. Drawn labels (measured by
    matplotlib itself) overlap no other label and no marker, and name every record once."""
    records = fixtures.crowded_records()
    figure = plots.scatter_figure(records, x_of, "x", "t", lambda r: r.name)
    axes, extents = _label_extents(figure)
    for i, a in enumerate(extents):
        for b in extents[i + 1 :]:
            assert not _overlap(a, b), (a, b)
    radius = math.sqrt(plots._MARKER_AREA) * plots.DPI / 72 / 2
    for record in records:
        x, y = axes.transData.transform((x_of(record), record.value))
        for extent in extents:
            nearest = math.hypot(
                max(extent.x0 - x, 0, x - extent.x1), max(extent.y0 - y, 0, y - extent.y1)
            )
            assert nearest >= radius, (record.name, extent)
    text = "\n".join(t.get_text() for t in axes.texts)
    assert sorted(line.split(":")[0] for line in text.splitlines()) == sorted(
        r.name for r in records
    )
    if x_of(records[0]) == records[0].size_mb:  # one spot per size: one label, by accuracy
        assert "qad-w4a8: 89.67\ngptq-w4a8: 89.61\nrtn-w4a8: 89.59\nqat-w4a8: 89.43" in text


def test_a_plot_too_crowded_for_its_labels_grows():
    """45 records on one spot share one 45-line label, taller than the plot: the plot grows
    until it fits."""
    records = [ResultRecord("far", "teacher", size_mb=4.0, value=20.0)]
    records += [
        ResultRecord(f"run-{i:02d}", "qad", 4, 8, size_mb=1.0, value=80 + i / 100)
        for i in range(45)
    ]
    figure = plots.scatter_figure(records, lambda r: r.size_mb, "x", "t", lambda r: r.name)
    assert figure.get_figheight() > plots._SCATTER_SIZE[1]
    axes, extents = _label_extents(figure)
    assert len(extents) == 2 and not _overlap(*extents)
    box = axes.get_window_extent(figure.canvas.get_renderer())
    assert all(box.y0 <= e.y0 and e.y1 <= box.y1 for e in extents)


boxes = st.tuples(
    st.floats(0, 500), st.floats(0, 300), st.floats(5, 120), st.floats(5, 30)
)  # anchor x, anchor y, label width, label height


@settings(max_examples=30, deadline=None)
@given(st.lists(boxes, min_size=1, max_size=12))
def test_place_never_overlaps(items):
    anchors = [(x, y) for x, y, _, _ in items]
    sizes = [(w, h) for _, _, w, h in items]
    bounds = (-10.0, -10.0, 510.0, 310.0)
    placed = labels.place(anchors, sizes, anchors, list(range(len(items))), bounds, marker=5)
    done = [(i, box) for i, box in enumerate(placed) if box is not None]
    for n, (i, a) in enumerate(done):
        assert labels.inside(a, bounds)
        assert a[2] - a[0] == pytest.approx(sizes[i][0]) and a[3] - a[1] == pytest.approx(
            sizes[i][1]
        )
        assert all(not labels.overlap(a, b) for _, b in done[n + 1 :])
        assert all(labels.distance(p, a) >= 5 for p in anchors)  # no marker covered


def test_place_prefers_beside_and_keeps_labels_off_other_points():
    # free: right of the point, centred on it, one marker radius away
    assert labels.place([(100, 100)], [(40, 10)], [(100, 100)], [0], (0, 0, 400, 400), 5) == [
        (105, 95, 145, 105)
    ]
    # another point just right: the label goes left rather than next to the wrong marker
    (box,) = labels.place(
        [(100, 100)], [(40, 10)], [(100, 100), (150, 100)], [0, 1], (0, 0, 400, 400), 5
    )
    assert box == (55, 95, 95, 105)
    assert labels.cluster([(0, 0), (3, 0), (100, 0), (5, 1)], radius=4) == [[0, 1, 3], [2]]


def test_mathtext_characters_are_drawn_as_written(tmp_path, fixtures):
    name = r"run $\frac{$ & $x^2$ <b>"
    records = [
        ResultRecord("teacher", "teacher", size_mb=2.0, value=90.0, latency_ms=2.0),
        ResultRecord(name, "qad", 4, 8, size_mb=1.0, value=80.0, latency_ms=1.0),
        ResultRecord("v", "qad", 4, 8, size_mb=0.5, value=85.0, extra={"variant": name}),
    ]
    groups = group_records(records)
    unescaped = plots.plain
    try:
        plots.plain = str  # without escaping, matplotlib parses "$\frac{$" and fails
        with pytest.raises(ValueError):
            plots.accuracy_vs_latency(records)
        with pytest.raises(ValueError):
            plots.accuracy_vs_size(groups)
    finally:
        plots.plain = unescaped
    assert plots.accuracy_vs_latency(records).startswith(b"\x89PNG")
    assert plots.accuracy_vs_size(groups).startswith(b"\x89PNG")
    frontier = frontier_figure(groups)
    label = next(t for t in frontier.axes[0].texts if "frac" in t.get_text())
    assert label._preprocess_math(label.get_text()) == (f"qad W4A8 {name}", False)
    figure = plots.scatter_figure(records, lambda r: r.size_mb, "x", "t", lambda r: r.name)
    renderer = figure.canvas.get_renderer()
    label = next(t for t in figure.axes[0].texts if "frac" in t.get_text())
    assert label._preprocess_math(label.get_text()) == (name, False)  # plain text, as written
    assert label.get_window_extent(renderer).width > 0
    lines = fixtures.metrics_lines(steps=2)
    for line in lines:
        if "terms" in line:
            line["terms"]["$\\alpha$ {x"] = 1.0
    run = read_curves(fixtures.write_metrics(tmp_path / "$run$" / "metrics.jsonl", lines))
    figure = plots.curves_figure(run)
    titles = [axes.get_title() for axes in figure.axes]
    assert r"term: \$\alpha\$ {x" in titles
    assert plots.training_curves(run).startswith(b"\x89PNG")


def test_one_point_curve_has_a_readable_axis():
    run = RunCurves(
        name="ptq",
        path=None,
        train_steps=(1, 2, 3, 4, 5, 6),
        total=(3.0, 2.0, 1.5, 1.2, 1.1, 1.0),
        terms={"rounding": (0.01,) * 6},
        eval_steps=(6,),
        eval_metrics={"vqa_accuracy": (0.53,)},
    )
    figure = plots.curves_figure(run)
    total, rounding, val = figure.axes
    assert val.get_title() == "val: vqa_accuracy (one point)"
    for axes in figure.axes:  # every panel spans the run's steps, in whole steps
        low, high = axes.get_xlim()
        assert low <= 0 and 6 <= high < 7
        assert all(tick == int(tick) for tick in axes.get_xticks())
    assert val.get_ylim() == pytest.approx((0.0, 0.53 * 1.2))
    assert [t.get_text() for t in val.texts] == ["0.53 at step 6"]
    assert rounding.get_ylim() == pytest.approx((0.0, 0.012))  # a constant term, from zero
    assert total.get_ylim()[0] > 0.5  # a real curve keeps its own range
