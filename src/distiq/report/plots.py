"""The report's plots, drawn with matplotlib's Agg backend (imported lazily) into PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot global state), so drawing
is safe in any process and leaves no figure open. Each function returns ``None`` when the data
needed for its plot is missing, and the report says so instead of drawing an empty plot.
"""

from __future__ import annotations

import io
import math
from typing import Any

from distiq.report.inputs import RunCurves
from distiq.report.tables import METHOD_ORDER
from distiq.results import ResultRecord

DPI = 100
_MARKERS = {16: "o", 8: "s", 4: "D", 3: "^", 2: "v"}


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


_LABEL_FONT = 7  # points


def _place_labels(
    anchors: list[tuple[float, float, str, bool]], dpi: float
) -> list[tuple[float, float]]:
    """Offsets (points) for point labels so that no two overlap: each label starts just above
    its point (to the right, or to the left when ``right_half``) and moves down or up by one
    line until its box is free. ``anchors`` are ``(x px, y px, text, right_half)``."""
    px_per_pt = dpi / 72
    line = _LABEL_FONT * 1.35 * px_per_pt
    placed: list[tuple[float, float, float, float]] = []
    offsets = []
    for x, y, text, right_half in anchors:
        width = len(text) * _LABEL_FONT * 0.58 * px_per_pt
        dx = -5.0 if right_half else 5.0
        left = x + dx * px_per_pt - (width if right_half else 0.0)
        for step in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            bottom = y + 4 * px_per_pt + step * line
            box = (left, bottom, left + width, bottom + line)
            if all(
                box[2] <= o[0] or box[0] >= o[2] or box[3] <= o[1] or box[1] >= o[3] for o in placed
            ):
                break
        placed.append(box)
        offsets.append((dx, 4.0 + step * line / px_per_pt))
    return offsets


def _scatter(
    records: list[ResultRecord], x_of: Any, x_label: str, title: str, label_of: Any
) -> bytes | None:
    points = [
        (x_of(r), r)
        for r in records
        if r.value is not None and x_of(r) is not None and math.isfinite(x_of(r)) and x_of(r) > 0
    ]
    if not points:
        return None
    figure = _figure(7.0, 4.5)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    axes = figure.add_subplot()
    xs = [x for x, _ in points]
    log_x = max(xs) / min(xs) > 20
    if log_x:
        axes.set_xscale("log")
    seen: set[str] = set()
    labels: dict[tuple[float, float], list[str]] = {}  # points at the same place share a label
    for x, record in points:
        label = record.method if record.method not in seen else None
        seen.add(record.method)
        axes.scatter(
            x,
            record.value,
            color=_colour(record.method),
            marker=_MARKERS.get(record.w_bits, "o"),
            s=48,
            label=label,
            zorder=3,
        )
        labels.setdefault((x, record.value), []).append(label_of(record))
    teachers = [r for _, r in points if r.method == "teacher"]
    if teachers:
        axes.axhline(teachers[-1].value, color="grey", linestyle="--", linewidth=1, zorder=1)
    axes.margins(x=0.08, y=0.08)
    x_low, x_high = axes.get_xlim()  # fixes the limits, so data -> pixels is final
    middle = (x_low * x_high) ** 0.5 if log_x else (x_low + x_high) / 2
    order = sorted(labels, key=lambda point: (-point[1], point[0]))
    anchors = []
    for x, y in order:
        px, py = axes.transData.transform((x, y))
        anchors.append((px, py, ", ".join(labels[(x, y)]), x > middle))
    for (x, y), (dx, dy), (_, _, text, right_half) in zip(
        order, _place_labels(anchors, figure.dpi), anchors
    ):
        axes.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(dx, dy),
            ha="right" if right_half else "left",
            fontsize=_LABEL_FONT,
        )
    metric = points[0][1].metric
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"{metric} (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, title="method (marker: weight bits)", title_fontsize=8)
    return _png(figure)


def accuracy_vs_size(records: list[ResultRecord]) -> bytes | None:
    """Accuracy (``value``) against size in MB, one point per record that has both; the
    teacher's accuracy as a dashed line. ``None`` when no record has both."""
    return _scatter(records, lambda r: r.size_mb, "size (MB)", "Accuracy vs size", lambda r: r.name)


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


def training_curves(run: RunCurves) -> bytes | None:
    """One panel per logged series of ``run`` (see :func:`curve_panels`), three per row. A panel
    whose values are all positive and span more than 20× uses a log scale. ``None`` when the run
    logged nothing finite."""
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
    figure.suptitle(f"Training curves: {run.name}", fontsize=10)
    for index, (title, xs, ys) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        colour = "C2" if title.startswith("val:") else "C0"
        axes.plot(xs, ys, color=colour, linewidth=1.2, marker="." if len(xs) < 30 else None)
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            axes.set_yscale("log")
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(True, alpha=0.3)
    return _png(figure)
