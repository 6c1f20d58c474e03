"""distiq.report.latency: each model against the teacher on one backend and thread count only."""

import pytest

from distiq.report import latency
from distiq.results import ResultRecord


def _record(name, method="qad", *, headline=None, threads=2, **median_ms):
    """A record with a headline ``(backend, ms)`` and bench timings ``ort_fp32=ms, ...``."""
    bench = {
        "threads": threads,
        "language_model": {
            backend.replace("_", "-"): {"available": True, "median_ms": ms}
            for backend, ms in median_ms.items()
        },
    }
    bench["language_model"]["ort-int8"] = {"available": False, "reason": "no int8 export"}
    backend, ms = headline if headline is not None else (None, None)
    return ResultRecord(
        name, method, 4, 8, latency_ms=ms, latency_backend=backend, extra={"bench": bench}
    )


TEACHER = _record("teacher", "teacher", headline=("ort-fp32", 2.0), pytorch_fp32=8.0, ort_fp32=2.0)


def test_timings_in_bench_order_with_the_headline_in_place():
    record = _record("a", headline=("ort-int4", 3.0), pytorch_fp32=9.0, ort_fp32=2.5, ort_int4=3.0)
    assert [(t.backend, t.ms, t.threads) for t in latency.timings(record)] == [
        ("pytorch-fp32", 9.0, 2),
        ("ort-fp32", 2.5, 2),
        ("ort-int4", 3.0, 2),
    ]
    plain = ResultRecord("b", "qad", latency_ms=1.5, latency_backend="tflite")
    assert latency.timings(plain) == [latency.Timing(1.5, "tflite", None)]
    assert latency.timings(ResultRecord("c", "qad", latency_ms=float("nan"))) == []
    assert latency.Timing(1.0, "ort-fp32", 1).where == "ort-fp32, 1 thread"
    assert latency.Timing(1.0, None, None).where == "backend not recorded"


def test_speed_on_the_headline_backend_when_the_teacher_has_it():
    record = _record("a", headline=("ort-fp32", 2.5), ort_fp32=2.5)
    comparison = latency.speed_vs_teacher(record, TEACHER)
    assert comparison.speed == pytest.approx(0.8) and comparison.slower
    assert comparison.cell() == "0.80× (slower)"
    assert comparison.sentence() == "a (ort-fp32, 2 threads: 2.50 ms vs 2.00 ms, 0.80×)"
    assert latency.speed_cell(TEACHER, TEACHER) == "reference"


def test_speed_falls_back_to_a_shared_backend_and_names_it():
    # deployed on ort-int4, which the teacher never ran: compared on the teacher's ort-fp32
    record = _record("a", headline=("ort-int4", 3.0), pytorch_fp32=4.0, ort_fp32=1.6, ort_int4=3.0)
    comparison = latency.speed_vs_teacher(record, TEACHER)
    assert (comparison.model.backend, comparison.teacher.ms) == ("ort-fp32", 2.0)
    assert comparison.cell() == "1.25× (faster, on ort-fp32)"
    # only pytorch-fp32 in common: that one
    only_torch = _record("b", headline=("ort-int4", 3.0), pytorch_fp32=16.0, ort_int4=3.0)
    assert latency.speed_cell(only_torch, TEACHER) == "0.50× (slower, on pytorch-fp32)"


def test_no_comparison_across_threads_or_unnamed_backends():
    other_threads = _record("a", headline=("ort-fp32", 1.0), threads=4, ort_fp32=1.0)
    assert latency.speed_vs_teacher(other_threads, TEACHER) is None
    assert latency.speed_cell(other_threads, TEACHER) == "—"
    no_backend = ResultRecord("b", "qad", latency_ms=1.0)
    teacher_no_backend = ResultRecord("t", "teacher", latency_ms=2.0)
    assert latency.speed_vs_teacher(no_backend, teacher_no_backend) is None
    assert latency.speed_vs_teacher(no_backend, None) is None


def test_notes_say_plainly_who_is_slower():
    records = [
        TEACHER,
        _record("fast", "kd", headline=("ort-fp32", 1.0), ort_fp32=1.0),
        _record("slow", headline=("ort-fp32", 4.0), ort_fp32=4.0),
        _record("int4", headline=("ort-int4", 3.0), ort_fp32=1.9, ort_int4=3.0),
        _record("apart", headline=("ort-fp32", 1.0), threads=1, ort_fp32=1.0),
    ]
    notes = latency.latency_notes(records)
    assert notes[0].startswith("Latency is each model's headline backend, and these differ")
    assert "(ort-fp32, 2 threads; ort-int4, 2 threads; ort-fp32, 1 thread)" in notes[0]
    assert (
        "Slower than the teacher on the same backend: slow (ort-fp32, 2 threads: 4.00 ms vs "
        "2.00 ms, 0.50×)." in notes
    )
    assert (
        "Not compared with the teacher (teacher), which was never timed on the same backend "
        "with the same threads: apart." in notes
    )
    assert (
        "As deployed, slower than the teacher on ort-fp32, 2 threads (2.00 ms): int4 on "
        "ort-int4, 2 threads (3.00 ms)." in notes
    )
    same = latency.latency_notes([TEACHER, records[1]])
    assert same[0] == "Every latency was timed on ort-fp32, 2 threads."
    assert "No model is slower than the teacher on the same backend." in same
    assert latency.latency_notes([records[1]])[-1] == (
        "The teacher has no latency, so no model is compared with it."
    )
    assert latency.latency_notes([ResultRecord("x", "qad", value=1.0)]) == []


def test_backend_table_only_when_several_backends_were_timed():
    int4 = _record("int4", headline=("ort-int4", 3.0), ort_fp32=1.6, ort_int4=3.0)
    header, rows = latency.backend_table([TEACHER, int4])
    assert header == ["name", "threads", "pytorch-fp32 ms", "ort-fp32 ms", "ort-int4 ms"]
    assert rows == [
        ["teacher", "2", "8.00", "2.00", "—"],
        ["int4", "2", "—", "1.60 (1.25×)", "3.00"],
    ]
    single = ResultRecord("a", "qad", latency_ms=1.0, latency_backend="ort-fp32")
    assert latency.backend_table([single]) is None
