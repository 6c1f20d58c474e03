"""The report's plots, drawn with matplotlib's Agg backend (imported lazily) into PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot global state), so drawing
is safe in any process and leaves no figure open. Each function returns ``None`` when the data
needed for its plot is missing, and the report says so instead of drawing an empty plot.

Every string that comes from the inputs (run names, term and metric names) goes through
:func:`plain`, so matplotlib draws it as written: a ``$`` would otherwise start mathtext.
Scatter-plot labels never overlap each other or a marker (:mod:`distiq.report.labels` places
them from their measured sizes).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distiq.report import labels
from distiq.report.groups import Group
from distiq.report.inputs import RunCurves
from distiq.report.tables import METHOD_ORDER
from distiq.results import ResultRecord

logger = logging.getLogger(__name__)

DPI = 100
_MARKERS = {16: "o", 8: "s", 4: "D", 3: "^", 2: "v"}
_LABEL_FONT = 7  # points
_MARKER_AREA = 48  # points², the scatter markers
_SCATTER_SIZE = (8.6, 4.8)  # inches: axes plus a legend column on the right
_GROWTH, _TRIES = 1.4, 4  # a plot too crowded for its labels grows this much, this often


def plain(text: str) -> str:
    """``text`` as matplotlib draws it literally: every ``$`` escaped so that no mathtext is
    parsed (``"run $x$"`` is drawn as ``run $x$``, not as math)."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    # fixed margins (set by each plot) instead of a layout engine: 2-3x faster to draw
    return Figure(figsize=(width, height), dpi=DPI)


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # no "Software" metadata: the same inputs give the same bytes with any matplotlib version
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _colour(method: str) -> str:
    index = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return f"C{index % 10}"


def _legends(axes: Any, methods: list[str], bits: list[int]) -> None:
    """Two legends right of the axes: colour = method, marker = weight bits."""
    from matplotlib.lines import Line2D

    def handle(colour: str, marker: str, label: str) -> Any:
        return Line2D([], [], color=colour, marker=marker, linestyle="", markersize=7, label=label)

    by_method = axes.legend(
        handles=[handle(_colour(m), "o", plain(m)) for m in methods],
        title="method",
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=8,
        title_fontsize=8,
    )
    axes.add_artist(by_method)
    axes.legend(
        handles=[handle("0.35", _MARKERS.get(b, "o"), f"{b}-bit") for b in bits],
        title="weights",
        loc="lower left",
        bbox_to_anchor=(1.02, 0.0),
        borderaxespad=0.0,
        fontsize=8,
        title_fontsize=8,
    )


@dataclass(frozen=True)
class LabelPoint:
    """A point to label, in data coordinates: ``text`` alone, or ``"text: value"`` in a label
    shared with the points whose markers touch it."""

    x: float
    y: float
    text: str
    value: float


def _label_text(members: list[LabelPoint]) -> str:
    if len(members) == 1:
        return plain(members[0].text)
    # markers that touch: one label that tells them apart by their values
    ordered = sorted(members, key=lambda point: -point.value)
    return "\n".join(plain(f"{point.text}: {point.value:.2f}") for point in ordered)


def scatter_figure(
    records: list[ResultRecord],
    x_of: Any,
    x_label: str,
    title: str,
    label_of: Any,
    height: float = _SCATTER_SIZE[1],
) -> Any | None:
    """The accuracy-vs-``x`` figure (a matplotlib ``Figure``), labels placed so that none
    overlaps; grows taller (up to :data:`_TRIES` times) while some label finds no free place.
    ``None`` when no record has both a value and a positive finite ``x``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import NullFormatter

    points = [
        (float(x_of(r)), r)
        for r in records
        if r.value is not None
        and x_of(r) is not None
        and math.isfinite(x_of(r))
        and x_of(r) > 0
        and math.isfinite(r.value)
    ]
    if not points:
        return None
    figure = _figure(_SCATTER_SIZE[0], height)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.08, right=0.8, bottom=0.7 / height, top=1 - 0.45 / height)
    axes = figure.add_subplot()
    xs = [x for x, _ in points]
    if max(xs) / min(xs) > 20:
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())
    for x, record in points:
        axes.scatter(
            x,
            record.value,
            color=_colour(record.method),
            marker=_MARKERS.get(record.w_bits, "o"),
            s=_MARKER_AREA,
            zorder=3,
        )
    teachers = [r for _, r in points if r.method == "teacher"]
    if teachers:
        axes.axhline(teachers[-1].value, color="grey", linestyle="--", linewidth=1, zorder=1)
    axes.margins(x=0.12, y=0.12)
    metric = points[0][1].metric
    axes.set_xlabel(x_label)
    axes.set_ylabel(plain(f"{metric} (%)"))
    axes.set_title(plain(title))
    axes.grid(True, alpha=0.3)
    methods = sorted({r.method for _, r in points}, key=lambda m: (_colour(m), m))
    _legends(axes, methods, sorted({r.w_bits for _, r in points}, reverse=True))
    axes.get_xlim(), axes.get_ylim()  # fixes the limits, so data -> pixels is final
    placed = draw_labels(
        figure, axes, [LabelPoint(x, r.value, label_of(r), r.value) for x, r in points]
    )
    if placed or height >= _SCATTER_SIZE[1] * _GROWTH ** (_TRIES - 1):
        if not placed:
            logger.warning("%s: some point labels overlap (too many points for the plot)", title)
        return figure
    return scatter_figure(records, x_of, x_label, title, label_of, height * _GROWTH)


def draw_labels(
    figure: Any,
    axes: Any,
    points: list[LabelPoint],
    obstacles: Sequence[tuple[float, float, int]] = (),
) -> bool:
    """Label every point (points whose markers touch share one label) where no label overlaps
    another or a marker (:func:`distiq.report.labels.place`); ``obstacles`` are more places to
    keep clear of, ``(x, y, index of the point they belong to)`` in data coordinates (error
    bars). The axes' limits must be final. ``False`` when some label found no free place (it is
    then drawn at its point, overlapping)."""
    renderer = figure.canvas.get_renderer()
    pixels = [tuple(axes.transData.transform((p.x, p.y))) for p in points]
    marker = math.sqrt(_MARKER_AREA) * DPI / 72 / 2 + 2  # marker radius in pixels, padded
    groups = labels.cluster(pixels, radius=2 * marker - 2)
    texts, anchors, sizes = [], [], []
    ordered = sorted(groups, key=lambda g: (-max(pixels[i][1] for i in g), pixels[g[0]][0]))
    for group in ordered:
        text = _label_text([points[i] for i in group])
        probe = axes.text(0, 0, text, fontsize=_LABEL_FONT)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        texts.append(text)
        anchors.append(
            (
                sum(pixels[i][0] for i in group) / len(group),
                sum(pixels[i][1] for i in group) / len(group),
            )
        )
        sizes.append((extent.width, extent.height))
    owners = [0] * len(pixels)
    for label, group in enumerate(ordered):
        for i in group:
            owners[i] = label
    keep_clear = list(pixels)
    for x, y, index in obstacles:
        keep_clear.append(tuple(axes.transData.transform((x, y))))
        owners.append(owners[index])
    box = axes.get_window_extent(renderer)
    bounds = (box.x0 + 2, box.y0 + 2, box.x1 - 2, box.y1 - 2)
    boxes = labels.place(anchors, sizes, keep_clear, owners, bounds, marker=marker)
    for text, anchor, size, where in zip(texts, anchors, sizes, boxes):
        if where is None:
            where = (
                anchor[0] + marker,
                anchor[1],
                anchor[0] + marker + size[0],
                anchor[1] + size[1],
            )
        far = labels.distance(anchor, where) > marker + 3
        axes.annotate(
            text,
            xy=axes.transData.inverted().transform(anchor),
            xytext=(where[0], where[1]),
            textcoords="figure pixels",
            ha="left",
            va="bottom",
            fontsize=_LABEL_FONT,
            arrowprops=dict(arrowstyle="-", color="0.45", linewidth=0.6, shrinkA=1, shrinkB=3)
            if far
            else None,
            zorder=4,
        )
    return all(where is not None for where in boxes)


def _scatter(
    records: list[ResultRecord], x_of: Any, x_label: str, title: str, label_of: Any
) -> bytes | None:
    figure = scatter_figure(records, x_of, x_label, title, label_of)
    return None if figure is None else _png(figure)


def accuracy_vs_size(groups: list[Group]) -> bytes | None:
    """The frontier: accuracy (mean over seeds, ± std) against size in MB, one line per method
    family (:func:`distiq.report.frontier.frontier_figure`). ``None`` when no group has both."""
    from distiq.report.frontier import frontier_figure

    figure = frontier_figure(groups)
    return None if figure is None else _png(figure)


def accuracy_vs_latency(records: list[ResultRecord]) -> bytes | None:
    """Accuracy against latency in ms (labels carry the latency backend, since latencies of
    different backends are not comparable). ``None`` when no record has both."""
    return _scatter(
        records,
        lambda r: r.latency_ms,
        "latency (ms)",
        "Accuracy vs latency",
        lambda r: f"{r.name} ({r.latency_backend})" if r.latency_backend else r.name,
    )


def _finite(steps: tuple[int, ...], values: tuple[float, ...]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def curve_panels(run: RunCurves) -> list[tuple[str, list[int], list[float]]]:
    """The panels of :func:`training_curves`: ``(title, steps, finite values)`` for the total
    loss, each objective term as the step function logged it, and each validation metric; a
    series with no finite value is left out, non-finite points are dropped (and counted in the
    title)."""
    series: list[tuple[str, tuple[int, ...], tuple[float, ...]]] = [
        ("total loss", run.train_steps, run.total)
    ]
    series += [(f"term: {name}", run.train_steps, values) for name, values in run.terms.items()]
    series += [
        (f"val: {name}", run.eval_steps, values) for name, values in run.eval_metrics.items()
    ]
    panels = []
    for title, steps, values in series:
        xs, ys = _finite(steps, values)
        if not xs:
            continue
        dropped = len(values) - len(ys)
        panels.append((title + (f" ({dropped} non-finite)" if dropped else ""), xs, ys))
    return panels


def _flat_limits(value: float) -> tuple[float, float]:
    """y limits for a series with one distinct value: from zero to a fifth beyond it, so the
    point sits at a readable height instead of mid-way through a range of rounding noise."""
    if value == 0:
        return -1.0, 1.0
    return (0.0, value * 1.2) if value > 0 else (value * 1.2, 0.0)


def curves_figure(run: RunCurves) -> Any | None:
    """The figure of :func:`training_curves` (a matplotlib ``Figure``), or ``None``."""
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(run)
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    height = 2.4 * rows + 0.4
    figure = _figure(3.3 * columns, height)
    figure.subplots_adjust(
        left=0.22 / columns + 0.02,
        right=0.98,
        bottom=0.45 / height,
        top=1 - 0.55 / height,
        wspace=0.42,
        hspace=0.9 / 2.4 + 0.1,
    )
    figure.suptitle(plain(f"Training curves: {run.name}"), fontsize=10)
    # every panel spans the run's steps, so a lone evaluation sits where it happened
    last_step = max(max(xs) for _, xs, _ in panels)
    first_step = min(0, *(min(xs) for _, xs, _ in panels))
    pad = max(0.5, 0.03 * (last_step - first_step))
    for index, (title, xs, ys) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        colour = "C2" if title.startswith("val:") else "C0"
        flat = min(ys) == max(ys)
        marker = "o" if len(xs) < 30 else None
        size = 6 if len(xs) == 1 else 3
        axes.plot(xs, ys, color=colour, linewidth=1.2, marker=marker, markersize=size)
        if len(xs) == 1:
            title += " (one point)"
            axes.annotate(
                f"{ys[0]:.4g} at step {xs[0]}",
                (xs[0], ys[0]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="right" if xs[0] > (first_step + last_step) / 2 else "left",
                fontsize=7,
                color=colour,
            )
        if flat:
            axes.set_ylim(*_flat_limits(ys[0]))
        elif min(ys) > 0 and max(ys) / min(ys) > 20:
            axes.set_yscale("log")
        axes.set_xlim(first_step - pad, last_step + pad)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(plain(title), fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(True, alpha=0.3)
    return figure


def training_curves(run: RunCurves) -> bytes | None:
    """One panel per logged series of ``run`` (see :func:`curve_panels`), three per row, each over
    the run's whole step range with whole-number steps. A panel whose values are all positive and
    span more than 20× uses a log scale; a panel with one value (a single evaluation, a constant
    term) shows it from zero, with the value written beside a lone point. ``None`` when the run
    logged nothing finite."""
    figure = curves_figure(run)
    return None if figure is None else _png(figure)
