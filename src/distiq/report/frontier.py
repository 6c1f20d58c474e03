"""The size–accuracy frontier: the report's main figure and the tables that go with it.

Each method family (:data:`distiq.report.groups.FAMILIES`: PTQ = rtn, gptq; QAT = qat; QAD = qad
and the distilled students) is one line through its best group at each size: among the
family's groups of one size (sizes within :data:`SIZE_TOLERANCE` of each other count as one),
the one with the highest mean over seeds. A point is that mean, its error bar the standard
deviation over seeds (:mod:`distiq.report.groups`), its label the method and setting. The
family's other groups are drawn as small hollow markers, so that nothing measured is hidden.
The teacher is a reference point with a dashed line at its accuracy; mixed-precision groups
(``extra["bits_allocation"]``) are their own marker, labelled ``mixed (budget X MB)``, off the
lines. Ablation groups stay off the figure (they have their own table).

A reader finds the smallest model that keeps a given accuracy by following the lines from the
right; :func:`smallest_table` says it in words for a few shares of the teacher's accuracy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distiq.report.groups import (
    FAMILIES,
    REFERENCE_METHODS,
    Group,
    fmt_mean_std,
    fmt_seeds,
    group_order,
)
from distiq.report.tables import fmt_size

SIZE_TOLERANCE = 0.02
"""Sizes within this fraction of each other are one size on the frontier."""
RETENTION_THRESHOLDS = (99.0, 98.0, 95.0, 90.0)
"""Shares of the teacher's accuracy (%) :func:`smallest_table` answers for."""
FAMILY_COLOURS = {"PTQ": "C0", "QAT": "C2", "QAD": "C3"}
TEACHER_COLOUR = "black"
MIXED_MARKER = "P"
LOG_SIZES = 3.0
"""A size axis spanning more than this ratio is logarithmic (a large teacher would otherwise
squeeze the students into a corner)."""
_SIZE = (9.0, 6.0)
_LINE_STEP = 6.0  # pixels between the points labels keep off along a line  # inches: axes plus a legend column on the right

Table = tuple[list[str], list[list[str]]]


@dataclass(frozen=True)
class Frontier:
    """What the figure draws: ``lines[family]`` (groups by size, the best at each size),
    ``others`` (the families' groups not best at their size), ``mixed`` (mixed-precision
    groups) and ``references`` (teacher, full precision)."""

    lines: dict[str, list[Group]] = field(default_factory=dict)
    others: list[Group] = field(default_factory=list)
    mixed: list[Group] = field(default_factory=list)
    references: list[Group] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.lines or self.mixed or self.references)

    @property
    def teacher(self) -> Group | None:
        return next((g for g in self.references if g.method == "teacher"), None)


def _drawable(group: Group) -> bool:
    size = group.size_mb
    return (
        group.key.ablation is None
        and group.mean is not None
        and size is not None
        and math.isfinite(size)
        and size > 0
    )


def _size_classes(groups: list[Group]) -> list[list[Group]]:
    """``groups`` split by size: a new class starts more than :data:`SIZE_TOLERANCE` above the
    smallest size of the current one."""
    classes: list[list[Group]] = []
    for group in sorted(groups, key=lambda g: g.size_mb):
        if classes and group.size_mb <= classes[-1][0].size_mb * (1 + SIZE_TOLERANCE):
            classes[-1].append(group)
        else:
            classes.append([group])
    return classes


def frontier(groups: Sequence[Group]) -> Frontier:
    """The :class:`Frontier` of ``groups`` (one task and metric; see the module docstring)."""
    drawable = [g for g in groups if _drawable(g)]
    out = Frontier()
    for group in drawable:
        if group.method in REFERENCE_METHODS and not group.key.mixed:
            out.references.append(group)
        elif group.key.mixed:
            out.mixed.append(group)
    for family in FAMILIES:
        members = [g for g in drawable if g.family == family and not g.key.mixed]
        line = []
        for same_size in _size_classes(members):
            # the best mean; on a tie, the earlier group in the report's order (max keeps the
            # first of equal ones)
            best = max(sorted(same_size, key=group_order), key=lambda g: g.mean)
            line.append(best)
            out.others.extend(g for g in same_size if g is not best)
        if line:
            out.lines[family] = line
    return out


def frontier_table(front: Frontier, teacher_mean: float | None) -> Table:
    """The groups on each line (and the mixed-precision ones): family, size, model, accuracy
    mean ± std, seeds, retention."""
    header = ["family", "size MB", "model", "accuracy", "seeds", "retention"]
    rows = []

    def row(family: str, group: Group) -> list[str]:
        retention = "—"
        if teacher_mean:
            retention = f"{100 * group.mean / teacher_mean:.1f} %"
        return [
            family,
            fmt_size(group.size_mb),
            group.label,
            fmt_mean_std(group),
            fmt_seeds(group),
            retention,
        ]

    for family, line in front.lines.items():
        rows += [row(family, g) for g in line]
    rows += [row(f"{g.family or g.method} (mixed)", g) for g in front.mixed]
    return header, rows


def smallest_table(front: Frontier, teacher_mean: float | None) -> Table | None:
    """For each share of the teacher's accuracy in :data:`RETENTION_THRESHOLDS`, the smallest
    model of each family (and of all) whose mean keeps it. ``None`` without a teacher."""
    if not teacher_mean:
        return None
    candidates = {
        family: [*line, *(g for g in front.others if g.family == family)]
        for family, line in front.lines.items()
    }
    for group in front.mixed:
        candidates.setdefault(group.family or group.method, []).append(group)
    families = list(candidates)
    header = ["keeps ≥", *families, "any"]
    rows = []
    for threshold in RETENTION_THRESHOLDS:
        cells = [f"{threshold:g} %"]
        every = []
        for family in families:
            kept = [g for g in candidates[family] if 100 * g.mean / teacher_mean >= threshold]
            every += kept
            cells.append(_smallest(kept))
        cells.append(_smallest(every))
        rows.append(cells)
    return header, rows


def _smallest(groups: list[Group]) -> str:
    if not groups:
        return "—"
    best = min(groups, key=lambda g: (g.size_mb, -g.mean))
    return f"{best.label} ({fmt_size(best.size_mb)} MB, {best.mean:.2f})"


# --------------------------------------------------------------------------- figure
def _line_samples(
    axes: Any, front: Frontier, index_of: dict[int, int]
) -> list[tuple[float, float, int]]:
    """Points every few pixels along each family's line, each belonging to the nearer end's
    label: labels keep off the lines as they keep off the markers."""
    samples = []
    to_pixels, to_data = axes.transData, axes.transData.inverted()
    for line in front.lines.values():
        for first, second in itertools.pairwise(line):
            x0, y0 = to_pixels.transform((first.size_mb, first.mean))
            x1, y1 = to_pixels.transform((second.size_mb, second.mean))
            steps = int(math.hypot(x1 - x0, y1 - y0) / _LINE_STEP)
            for step in range(1, steps):
                t = step / steps
                x, y = to_data.transform((x0 + t * (x1 - x0), y0 + t * (y1 - y0)))
                owner = first if t < 0.5 else second
                samples.append((float(x), float(y), index_of[id(owner)]))
    return samples


def frontier_figure(groups: Sequence[Group], height: float = _SIZE[1]) -> Any | None:
    """The frontier (a matplotlib ``Figure``) of ``groups`` of one task and metric; labels
    placed so that none overlaps (the figure grows taller while some label finds no place).
    ``None`` when no group has both a size and a value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from distiq.report import plots

    front = frontier(groups)
    if front.empty:
        return None
    figure = plots._figure(_SIZE[0], height)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.08, right=0.77, bottom=0.7 / height, top=1 - 0.45 / height)
    axes = figure.add_subplot()
    every = [g for line in front.lines.values() for g in line]
    every += front.others + front.mixed + front.references
    sizes = [g.size_mb for g in every]
    if max(sizes) / min(sizes) > LOG_SIZES:
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    labelled: list[tuple[Group, str]] = []  # (group, colour) of every labelled point
    handles = []
    for family, line in front.lines.items():
        colour = FAMILY_COLOURS.get(family, "C7")
        handles.append(
            axes.errorbar(
                [g.size_mb for g in line],
                [g.mean for g in line],
                yerr=[g.std or 0.0 for g in line],
                color=colour,
                marker="o",
                markersize=6,
                linewidth=1.4,
                capsize=3,
                label=f"{family} ({', '.join(FAMILIES[family])})",
                zorder=3,
            )
        )
        labelled += [(g, colour) for g in line]
    if front.others:
        for group in front.others:
            axes.scatter(
                group.size_mb,
                group.mean,
                s=22,
                facecolors="none",
                edgecolors=FAMILY_COLOURS.get(group.family or "", "C7"),
                linewidths=0.9,
                alpha=0.7,
                zorder=2,
            )
        handles.append(
            axes.scatter(
                [], [], s=22, facecolors="none", edgecolors="0.4", label="not best at its size"
            )
        )
    for group in front.mixed:
        colour = FAMILY_COLOURS.get(group.family or "", "C7")
        axes.errorbar(
            group.size_mb,
            group.mean,
            yerr=group.std or 0.0,
            color=colour,
            marker=MIXED_MARKER,
            markersize=9,
            linestyle="",
            capsize=3,
            zorder=3,
        )
        labelled.append((group, colour))
    if front.mixed:
        handles.append(
            axes.scatter([], [], marker=MIXED_MARKER, s=60, color="0.3", label="mixed precision")
        )
    teacher = front.teacher
    for group in front.references:
        axes.errorbar(
            group.size_mb,
            group.mean,
            yerr=group.std or 0.0,
            color=TEACHER_COLOUR,
            marker="*",
            markersize=11,
            linestyle="",
            zorder=3,
        )
        labelled.append((group, TEACHER_COLOUR))
    if teacher is not None:
        axes.axhline(teacher.mean, color="grey", linestyle="--", linewidth=1, zorder=1)
        handles.append(
            axes.scatter(
                [],
                [],
                marker="*",
                s=110,
                color=TEACHER_COLOUR,
                label="teacher (dashed line)",
            )
        )
    axes.margins(x=0.2, y=0.12)
    metric = every[0].key.metric
    axes.set_xlabel("size (MB)")
    axes.set_ylabel(plots.plain(f"{metric} (%), mean over seeds ± std"))
    axes.set_title("Accuracy vs size: the frontier of each method family")
    axes.grid(True, alpha=0.3)
    axes.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=8,
    )
    axes.get_xlim(), axes.get_ylim()  # fixes the limits, so data -> pixels is final
    points = [plots.LabelPoint(g.size_mb, g.mean, g.label, g.mean) for g, _ in labelled]
    bars = [
        (g.size_mb, g.mean + sign * g.std * k / 2, index)
        for index, (g, _) in enumerate(labelled)
        if g.std
        for sign in (-1, 1)
        for k in (1, 2)
    ]
    index_of = {id(g): index for index, (g, _) in enumerate(labelled)}
    placed = plots.draw_labels(figure, axes, points, bars + _line_samples(axes, front, index_of))
    if placed or height >= _SIZE[1] * plots._GROWTH ** (plots._TRIES - 1):
        if not placed:
            plots.logger.warning("the frontier: some point labels overlap (too many points)")
        return figure
    return frontier_figure(groups, height * plots._GROWTH)
