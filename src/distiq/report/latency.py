"""Latencies of result records, each compared with the teacher's on the same backend and threads.

Two workloads of the language model at batch 1 are compared apart (``WORKLOAD_WORDS``):

- the *prefill* (``language_model``): the whole prompt, image and text tokens, in one call;
- the *decode* (``decode``): ONE new token with the KV cache of that prompt: the per-token cost
  of an answer, which memory traffic bounds where the prefill is bound by arithmetic (a 4-bit
  model can be slower than its teacher at one and faster at the other).

A record's headline latency is ``latency_ms`` on ``latency_backend`` (the prefill);
``distiq bench`` picks the best backend the model exports to, so headline backends differ
between models (a float teacher on ``ort-fp32``, a 4-bit student on ``ort-int4``). ``distiq
bench`` also keeps every backend's timing of each workload in ``extra["bench"][workload]
[backend]["median_ms"]`` (with ``prompt_tokens``) and its thread count in
``extra["bench"]["threads"]``.

Latencies on different backends or thread counts time different programs, so a model is compared
with the teacher only on one backend at one thread count: :func:`speed_vs_teacher` uses the
model's headline backend when the teacher was timed there too, else the teacher's headline
backend, else any backend both were timed on. Speed is the teacher's latency divided by the
model's: above 1× the model is faster. :func:`latency_notes` says in words which models are
slower than their teacher — on the same backend, and as deployed (each on its headline backend) —
for the prefill and, where it was timed, for the decode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distiq.results import ResultRecord

PREFILL = "language_model"
DECODE = "decode"
WORKLOAD = PREFILL  # the headline latency's workload
WORKLOAD_WORDS = {PREFILL: "prefill", DECODE: "decode (one token)"}


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


def _per_backend(record: ResultRecord, workload: str) -> Mapping | None:
    bench = record.extra.get("bench")
    per_backend = bench.get(workload) if isinstance(bench, Mapping) else None
    return per_backend if isinstance(per_backend, Mapping) else None


def timings(record: ResultRecord, workload: str = PREFILL) -> list[Timing]:
    """Every latency of the record on ``workload``: each backend ``distiq bench`` timed it on, in
    the order recorded; for the prefill with the headline latency in its backend's place (first
    when bench did not record that backend)."""
    own = headline(record) if workload == PREFILL else None
    found: list[Timing] = []
    per_backend = _per_backend(record, workload)
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


def prompt_tokens(records: list[ResultRecord], workload: str = DECODE) -> list[int]:
    """The prompt lengths L ``distiq bench`` recorded for ``workload``, in order, each once."""
    lengths: list[int] = []
    for record in records:
        for result in (_per_backend(record, workload) or {}).values():
            length = result.get("prompt_tokens") if isinstance(result, Mapping) else None
            if isinstance(length, int) and not isinstance(length, bool) and length not in lengths:
                lengths.append(length)
    return lengths


def teacher_of(records: list[ResultRecord]) -> ResultRecord | None:
    """The teacher whose latencies the others are compared with: the last teacher record that
    has one (the same teacher the retention is measured against when it is timed)."""
    timed = [r for r in records if r.method == "teacher" and (timings(r) or timings(r, DECODE))]
    return timed[-1] if timed else None


def speed_vs_teacher(
    record: ResultRecord, teacher: ResultRecord | None, workload: str = PREFILL
) -> SpeedComparison | None:
    """``record`` against ``teacher`` on ``workload`` on one backend and thread count (see the
    module docstring for which); None when they share none, or either has no latency."""
    if teacher is None:
        return None
    mine = {t.key: t for t in timings(record, workload) if t.backend is not None}
    theirs = {t.key: t for t in timings(teacher, workload) if t.backend is not None}
    own, teachers_own = headline(record), headline(teacher)
    order = [t.key for t in (own, teachers_own) if t is not None] + list(mine)
    for key in order:
        if key in mine and key in theirs:
            on_headline = own is not None and key == own.key
            return SpeedComparison(record.name, mine[key], theirs[key], on_headline)
    return None


def speed_cell(record: ResultRecord, teacher: ResultRecord | None, workload: str = PREFILL) -> str:
    """The "speed vs teacher" cell: the ratio and its backend, "reference" for the teacher
    itself, "—" when there is no same-backend comparison."""
    if teacher is not None and record.name == teacher.name:
        return "reference"
    comparison = speed_vs_teacher(record, teacher, workload)
    return "—" if comparison is None else comparison.cell()


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _decode_notes(records: list[ResultRecord], teacher: ResultRecord) -> list[str]:
    """The per-token decode sentences (empty when no record timed the decode)."""
    if not any(timings(r, DECODE) for r in records):
        return []
    lengths = prompt_tokens(records)
    after = f" after a prompt of {_join([str(n) for n in lengths])} tokens" if lengths else ""
    if not timings(teacher, DECODE):
        return [
            f"Decode (one new token with the KV cache{after}) was timed, but not for the "
            f"teacher ({teacher.name}): no model's decode is compared with it."
        ]
    others = [r for r in records if r.method != "teacher" and timings(r, DECODE)]
    comparisons = [(r, speed_vs_teacher(r, teacher, DECODE)) for r in others]
    slower = [c.sentence() for _, c in comparisons if c is not None and c.slower]
    notes = [
        f"Decode is one new token with the KV cache{after}, compared with the teacher's on the "
        "same backend and threads, apart from the prefill."
    ]
    if slower:
        notes.append(f"Decodes slower than the teacher on the same backend: {'; '.join(slower)}.")
    elif any(c is not None for _, c in comparisons):
        notes.append("No model decodes slower than the teacher on the same backend.")
    apart = [r.name for r, c in comparisons if c is None]
    if apart:
        notes.append(
            f"Decode not compared with the teacher ({teacher.name}), which never decoded on the "
            f"same backend with the same threads: {_join(apart)}."
        )
    late = _deployed_decode_slower(others, teacher)
    if late:
        notes.append(late)
    return notes


def _deployed_decode_slower(others: list[ResultRecord], teacher: ResultRecord) -> str | None:
    """Which models decode slower on their headline backend than the teacher on its own."""
    own_backend = headline(teacher)
    theirs = {t.key: t for t in timings(teacher, DECODE)}
    deployed = theirs.get(own_backend.key) if own_backend is not None else None
    if deployed is None:
        return None
    late = []
    for record in others:
        backend = headline(record)
        mine = {t.key: t for t in timings(record, DECODE)}
        own = mine.get(backend.key) if backend is not None else None
        if own is not None and own.key != deployed.key and own.ms > deployed.ms:
            late.append(f"{record.name} on {own.where} ({own.ms:.2f} ms)")
    if not late:
        return None
    return (
        f"As deployed, decodes slower than the teacher on {deployed.where} "
        f"({deployed.ms:.2f} ms): {'; '.join(late)}."
    )


def latency_notes(records: list[ResultRecord]) -> list[str]:
    """Sentences for the text under the results table: which backends the latency column mixes,
    what the speed column means, and plainly which models are slower than the teacher (on the
    same backend, and as deployed) at the prefill and, where it was timed, at the decode. Empty
    when no record has a latency."""
    timed = [(r, headline(r)) for r in records if headline(r) is not None]
    decoded = any(timings(r, DECODE) for r in records)
    if not timed and not decoded:
        return []
    teacher = teacher_of(records)
    # the headline latency is the prefill; name it so once decode timings stand beside it
    prefill = " (prefill)" if decoded else ""
    places = list(dict.fromkeys(t.where for _, t in timed))
    notes = []
    if decoded:
        notes.append(
            "Latency and speed vs teacher are the prefill: the whole prompt (image and text "
            "tokens) through the language model at batch 1, in one call."
        )
    if len(places) == 1:
        notes.append(f"Every latency was timed on {places[0]}.")
    elif places:
        notes.append(
            "Latency is each model's headline backend, and these differ between rows "
            f"({'; '.join(places)}): compare rows through the speed column, which uses one "
            "backend and thread count for both models."
        )
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
        notes.append(f"Slower than the teacher on the same backend{prefill}: {'; '.join(slower)}.")
    elif compared:
        notes.append(f"No model is slower than the teacher on the same backend{prefill}.")
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
                f"As deployed, slower than the teacher{prefill} on {deployed.where} "
                f"({deployed.ms:.2f} ms): {'; '.join(late)}."
            )
    return notes + _decode_notes(records, teacher)


def backend_table_note(records: list[ResultRecord]) -> str:
    """The sentence above :func:`backend_table`: what its rows and brackets mean."""
    speed = (
        "in brackets, its speed vs the teacher on that backend and threads (the teacher's "
        "latency divided by the model's: above 1× the model is faster)."
    )
    if not any(timings(r, DECODE) for r in records):
        return (
            "The language model at batch 1, median ms on every backend each model was timed "
            f"on; {speed}"
        )
    lengths = prompt_tokens(records)
    after = f" after a prompt of {_join([str(n) for n in lengths])} tokens" if lengths else ""
    return (
        "The language model at batch 1, median ms on every backend each model was timed on, "
        "for each workload: prefill (the whole prompt in one call) and decode (one new token "
        f"with the KV cache{after}), each against the teacher's same workload; {speed}"
    )


def backend_table(records: list[ResultRecord]) -> tuple[list[str], list[list[str]]] | None:
    """Every record's latency on every backend it was timed on, with its speed vs the teacher on
    that backend, threads and workload: ``(header, rows)``, one row per record and workload
    (prefill, then decode, with a ``workload`` column when any record timed the decode); None
    unless some record was timed on more than one backend or workload."""
    workloads = [w for w in (PREFILL, DECODE) if any(timings(r, w) for r in records)]
    per_row = [(r, w, timings(r, w)) for r in records for w in workloads]
    per_row = [(r, w, found) for r, w, found in per_row if found]
    if not any(len(found) > 1 for *_, found in per_row) and len(workloads) < 2:
        return None
    teacher = teacher_of(records)
    reference = {
        w: {t.key: t for t in timings(teacher, w)} if teacher is not None else {} for w in workloads
    }
    backends = list(
        dict.fromkeys(t.backend or "not recorded" for *_, found in per_row for t in found)
    )
    with_workload = DECODE in workloads
    header = ["name", *(["workload"] if with_workload else []), "threads"]
    header += [f"{b} ms" for b in backends]
    rows = []
    for record, workload, found in per_row:
        cells = {}
        for timing in found:
            cell = f"{timing.ms:.2f}"
            base = reference[workload].get(timing.key)
            if base is not None and teacher is not None and record.name != teacher.name:
                cell += f" ({base.ms / timing.ms:.2f}×)"
            cells[timing.backend or "not recorded"] = cell
        threads = found[0].threads
        rows.append(
            [record.name, *([WORKLOAD_WORDS[workload]] if with_workload else [])]
            + ["—" if threads is None else str(threads)]
            + [cells.get(b, "—") for b in backends]
        )
    return header, rows
