"""Tables of grouped results: one row per group (mean ± std over seeds), the paired comparisons,
the mixed-precision allocations. Cells are plain strings, like :mod:`distiq.report.tables`.

A group's latency is that of its run with the median latency (the seeds' models have the same
shapes, so their latencies differ by timing noise only); its speed vs the teacher is that run's
(:mod:`distiq.report.latency`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distiq.report import latency
from distiq.report.compare import Comparison, fmt_p
from distiq.report.groups import Group, fmt_mean_std, fmt_seeds
from distiq.report.tables import DASH, Table, fmt_number, fmt_size
from distiq.results import ResultRecord


def timed_record(group: Group) -> ResultRecord | None:
    """The group's run with the median latency (the lower middle one of an even count)."""
    timed = sorted(
        (r for r in group.records if latency.headline(r) is not None),
        key=lambda r: latency.headline(r).ms,
    )
    return timed[(len(timed) - 1) // 2] if timed else None


def _bits(group: Group) -> tuple[str, str]:
    key = group.key
    if key.mixed:
        budget = DASH if key.budget_mb is None else f"budget {fmt_size(key.budget_mb)} MB"
        return "mixed", budget
    group_cell = DASH
    if key.w_bits is not None and key.w_bits < 16:
        group_cell = "per-channel" if key.group_size is None else str(key.group_size)
    return f"{key.w_bits}/{key.a_bits}", group_cell


def group_table(
    groups: Sequence[Group], teacher: Group | None, timed_teacher: ResultRecord | None
) -> Table:
    """The main table: method, variant, bits, group size, size, accuracy (mean ± std over
    seeds), seeds, retention (the mean over the teacher's), latency, its backend and the speed
    vs the teacher (``timed_teacher``, the teacher run latencies are compared with)."""
    header = [
        "method",
        "variant",
        "bits W/A",
        "group",
        "size MB",
        "accuracy",
        "seeds",
        "retention",
        "latency ms",
        "latency backend",
        "speed vs teacher",
    ]
    rows = []
    for group in groups:
        mean = group.mean
        retention = DASH
        if mean is not None and teacher is not None and teacher.mean:
            retention = f"{100 * mean / teacher.mean:.1f} %"
        record = timed_record(group)
        if record is None:
            ms, where, speed = DASH, DASH, DASH
        else:
            timing = latency.headline(record)
            ms, where = fmt_number(timing.ms), timing.where
            speed = latency.speed_cell(record, timed_teacher)
        rows.append(
            [
                group.method,
                group.key.variant or DASH,
                *_bits(group),
                fmt_size(group.size_mb),
                fmt_mean_std(group),
                fmt_seeds(group),
                retention,
                ms,
                where,
                speed,
            ]
        )
    return header, rows


def comparison_table(comparisons: Sequence[Comparison]) -> Table:
    """One row per paired comparison: setting, A, B, the difference A − B in points with its 95 %
    interval, p, the test, the questions compared and the verdict (``tie`` when ``p >= ALPHA``)."""
    header = ["setting", "A", "B", "A − B (points, 95 % CI)", "p", "test", "questions", "verdict"]
    rows = []
    for c in comparisons:
        setting = c.a.bits_label
        if c.tested:
            low, high = c.interval
            difference = f"{c.difference:+.2f} [{low:+.2f}, {high:+.2f}]"
            test, questions = c.test, f"{c.questions:,}"
        else:
            difference = DASH if c.difference is None else f"{c.difference:+.2f} (means)"
            test, questions = f"not tested: {c.reason}", DASH
        rows.append(
            [
                setting,
                _side(c.a),
                _side(c.b),
                difference,
                fmt_p(c.p_value),
                test,
                questions,
                c.verdict,
            ]
        )
    return header, rows


def _side(group: Group) -> str:
    """``"qad (3 seeds)"``, with the variant: ``"qad half-depth (3 seeds)"``."""
    name = group.method + (f" {group.key.variant}" if group.key.variant else "")
    return f"{name} ({group.n} seed{'s' if group.n != 1 else ''})"


def mixed_table(groups: Sequence[Group]) -> Table | None:
    """The mixed-precision groups: budget, size, bits per part, accuracy, seeds; ``None`` when
    there is none."""
    mixed = [g for g in groups if g.key.mixed]
    if not mixed:
        return None
    header = ["model", "budget MB", "size MB", "bits per part", "accuracy", "seeds"]
    rows = []
    for group in mixed:
        allocation = group.allocation or {}
        rows.append(
            [
                group.label,
                fmt_size(group.key.budget_mb),
                fmt_size(group.size_mb),
                _allocation(allocation),
                fmt_mean_std(group),
                fmt_seeds(group),
            ]
        )
    return header, rows


def _allocation(allocation: Mapping) -> str:
    parts = []
    for part, bits in allocation.items():
        if isinstance(bits, Mapping):
            bits = "/".join(f"{k} {v}" for k, v in bits.items())
        parts.append(f"{part}: {bits}")
    return ", ".join(parts) or DASH
