"""Latencies of result records, each compared with the teacher's on the same backend and threads.

A record's headline latency is ``latency_ms`` on ``latency_backend``; ``distiq bench`` picks the
best backend the model exports to, so headline backends differ between models (a float teacher
on ``ort-fp32``, a 4-bit student on ``ort-int4``). ``distiq bench`` also keeps every backend's
timing of the language model at batch 1 in ``extra["bench"]["language_model"][backend]
["median_ms"]`` and its thread count in ``extra["bench"]["threads"]``.

Latencies on different backends or thread counts time different programs, so a model is compared
with the teacher only on one backend at one thread count: :func:`speed_vs_teacher` uses the
model's headline backend when the teacher was timed there too, else the teacher's headline
backend, else any backend both were timed on. Speed is the teacher's latency divided by the
model's: above 1× the model is faster. :func:`latency_notes` says in words which models are
slower than their teacher — on the same backend, and as deployed (each on its headline backend).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distiq.results import ResultRecord

WORKLOAD = "language_model"


@dataclass(frozen=True)
class Timing:
    """One latency: ``ms`` on ``backend`` (None: not recorded) with ``threads`` (None: not
    recorded)."""

    ms: float
    backend: str | None
    threads: int | None

    @property
    def where(self) -> str:
        """The backend and threads in words, e.g. ``"ort-fp32, 2 threads"``."""
        backend = self.backend or "backend not recorded"
        if self.threads is None:
            return backend
        return f"{backend}, {self.threads} thread{'s' if self.threads != 1 else ''}"

    @property
    def key(self) -> tuple[str | None, int | None]:
        return self.backend, self.threads


@dataclass(frozen=True)
class SpeedComparison:
    """``model`` and ``teacher`` timed on the same backend and threads; ``speed`` is the teacher's
    latency divided by the model's (above 1: the model is faster)."""

    name: str
    model: Timing
    teacher: Timing
    on_headline: bool  # compared on the model's headline backend

    @property
    def speed(self) -> float:
        return self.teacher.ms / self.model.ms

    @property
    def slower(self) -> bool:
        return self.model.ms > self.teacher.ms

    def cell(self) -> str:
        """The table cell, e.g. ``"1.25× (faster)"`` or ``"0.80× (slower, on ort-fp32)"``."""
        words = "slower" if self.slower else "faster" if self.speed > 1 else "same"
        if not self.on_headline:
            words += f", on {self.model.backend}"
        return f"{self.speed:.2f}× ({words})"

    def sentence(self) -> str:
        return (
            f"{self.name} ({self.model.where}: {self.model.ms:.2f} ms vs {self.teacher.ms:.2f} ms, "
            f"{self.speed:.2f}×)"
        )


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _threads(record: ResultRecord) -> int | None:
    bench = record.extra.get("bench")
    threads = bench.get("threads") if isinstance(bench, Mapping) else None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) else None


def headline(record: ResultRecord) -> Timing | None:
    """The record's ``latency_ms`` on ``latency_backend``; None when it has no latency."""
    ms = _positive(record.latency_ms)
    return None if ms is None else Timing(ms, record.latency_backend, _threads(record))


def timings(record: ResultRecord) -> list[Timing]:
    """Every latency of the record: each backend ``distiq bench`` timed the language model on, in
    the order recorded, with the headline latency in its backend's place (first when bench did
    not record that backend)."""
    own = headline(record)
    found: list[Timing] = []
    bench = record.extra.get("bench")
    per_backend = bench.get(WORKLOAD) if isinstance(bench, Mapping) else None
    if isinstance(per_backend, Mapping):
        threads = _threads(record)
        for backend, result in per_backend.items():
            ms = _positive(result.get("median_ms")) if isinstance(result, Mapping) else None
            if ms is None:
                continue
            timing = Timing(ms, str(backend), threads)
            found.append(own if own is not None and own.key == timing.key else timing)
    if own is not None and own not in found:
        found.insert(0, own)
    return found


def teacher_of(records: list[ResultRecord]) -> ResultRecord | None:
    """The teacher whose latencies the others are compared with: the last teacher record that
    has one (the same teacher the retention is measured against when it is timed)."""
    timed = [r for r in records if r.method == "teacher" and timings(r)]
    return timed[-1] if timed else None


def speed_vs_teacher(record: ResultRecord, teacher: ResultRecord | None) -> SpeedComparison | None:
    """``record`` against ``teacher`` on one backend and thread count (see the module docstring
    for which); None when they share none, or either has no latency."""
    if teacher is None:
        return None
    mine = {t.key: t for t in timings(record) if t.backend is not None}
    theirs = {t.key: t for t in timings(teacher) if t.backend is not None}
    own, teachers_own = headline(record), headline(teacher)
    order = [t.key for t in (own, teachers_own) if t is not None] + list(mine)
    for key in order:
        if key in mine and key in theirs:
            on_headline = own is not None and key == own.key
            return SpeedComparison(record.name, mine[key], theirs[key], on_headline)
    return None


def speed_cell(record: ResultRecord, teacher: ResultRecord | None) -> str:
    """The "speed vs teacher" cell: the ratio and its backend, "reference" for the teacher
    itself, "—" when there is no same-backend comparison."""
    if teacher is not None and record.name == teacher.name:
        return "reference"
    comparison = speed_vs_teacher(record, teacher)
    return "—" if comparison is None else comparison.cell()


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def latency_notes(records: list[ResultRecord]) -> list[str]:
    """Sentences for the text under the results table: which backends the latency column mixes,
    what the speed column means, and plainly which models are slower than the teacher (on the
    same backend, and as deployed). Empty when no record has a latency."""
    timed = [(r, headline(r)) for r in records if headline(r) is not None]
    if not timed:
        return []
    teacher = teacher_of(records)
    places = list(dict.fromkeys(t.where for _, t in timed))
    if len(places) == 1:
        notes = [f"Every latency was timed on {places[0]}."]
    else:
        notes = [
            "Latency is each model's headline backend, and these differ between rows "
            f"({'; '.join(places)}): compare rows through the speed column, which uses one "
            "backend and thread count for both models."
        ]
    if teacher is None:
        notes.append("The teacher has no latency, so no model is compared with it.")
        return notes
    notes.append(
        "Speed vs teacher is the teacher's latency divided by the model's on the same backend "
        "and threads (above 1× the model is faster); the backend is named where it is not the "
        "model's headline one."
    )
    others = [r for r in records if r.method != "teacher" and timings(r)]
    comparisons = [(r, speed_vs_teacher(r, teacher)) for r in others]
    slower = [c.sentence() for _, c in comparisons if c is not None and c.slower]
    compared = [c for _, c in comparisons if c is not None]
    if slower:
        notes.append(f"Slower than the teacher on the same backend: {'; '.join(slower)}.")
    elif compared:
        notes.append("No model is slower than the teacher on the same backend.")
    apart = [r.name for r, c in comparisons if c is None]
    if apart:
        notes.append(
            f"Not compared with the teacher ({teacher.name}), which was never timed on the same "
            f"backend with the same threads: {_join(apart)}."
        )
    deployed = headline(teacher)
    if deployed is not None:
        late = [
            f"{r.name} on {own.where} ({own.ms:.2f} ms)"
            for r, own in timed
            if r.method != "teacher" and own.key != deployed.key and own.ms > deployed.ms
        ]
        if late:
            notes.append(
                f"As deployed, slower than the teacher on {deployed.where} "
                f"({deployed.ms:.2f} ms): {'; '.join(late)}."
            )
    return notes


def backend_table(records: list[ResultRecord]) -> tuple[list[str], list[list[str]]] | None:
    """Every record's latency on every backend it was timed on, with its speed vs the teacher on
    that backend and threads: ``(header, rows)``; None unless some record was timed on more than
    one backend."""
    per_record = [(r, timings(r)) for r in records]
    per_record = [(r, found) for r, found in per_record if found]
    if not any(len(found) > 1 for _, found in per_record):
        return None
    teacher = teacher_of(records)
    reference = {t.key: t for t in timings(teacher)} if teacher is not None else {}
    backends = list(dict.fromkeys(t.backend or "not recorded" for _, f in per_record for t in f))
    header = ["name", "threads", *(f"{b} ms" for b in backends)]
    rows = []
    for record, found in per_record:
        cells = {}
        for timing in found:
            cell = f"{timing.ms:.2f}"
            base = reference.get(timing.key)
            if base is not None and teacher is not None and record.name != teacher.name:
                cell += f" ({base.ms / timing.ms:.2f}×)"
            cells[timing.backend or "not recorded"] = cell
        threads = found[0].threads
        rows.append(
            [record.name, "—" if threads is None else str(threads)]
            + [cells.get(b, "—") for b in backends]
        )
    return header, rows
