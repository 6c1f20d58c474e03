"""The report compares the prefill and the per-token decode with the teacher apart, each on one
backend and thread count, and says plainly which model decodes slower (fake timings)."""

from distiq.report import latency
from distiq.report.inputs import ReportInputs
from distiq.report.render import render
from distiq.results import ResultRecord


def _record(name, method="qad", *, headline, prefill, decode, length=80, accuracy=80.0):
    """``prefill`` / ``decode``: ``{backend: median ms}`` as ``distiq bench`` records them."""
    bench = {
        "threads": 2,
        "language_model": {
            b: {"available": True, "median_ms": ms, "prompt_tokens": length}
            for b, ms in prefill.items()
        },
        "decode": {
            b: {"available": True, "median_ms": ms, "prompt_tokens": length, "new_tokens": 1}
            for b, ms in decode.items()
        },
    }
    backend = headline
    return ResultRecord(
        name, method, 16 if method == "teacher" else 4, 16, task="vqa", metric="accuracy",
        value=accuracy, latency_ms=prefill[backend], latency_backend=backend,
        extra={"bench": bench},
    )  # fmt: skip


TEACHER = _record(
    "teacher", "teacher", headline="ort-fp32", accuracy=90.0,
    prefill={"pytorch-fp32": 8.0, "ort-fp32": 2.0}, decode={"pytorch-fp32": 4.0, "ort-fp32": 1.0},
)  # fmt: skip
# faster than the teacher at the prefill on ort-fp32, slower at the decode
INT4 = _record(
    "rtn-w4", headline="ort-int4",
    prefill={"pytorch-fp32": 8.0, "ort-fp32": 1.6, "ort-int4": 1.8},
    decode={"pytorch-fp32": 4.0, "ort-fp32": 1.25, "ort-int4": 0.5},
)  # fmt: skip
FAST = _record(
    "kd-small", "kd", headline="ort-fp32",
    prefill={"ort-fp32": 1.0}, decode={"ort-fp32": 0.5},
)  # fmt: skip


def test_decode_is_compared_apart_from_the_prefill():
    prefill = latency.speed_vs_teacher(INT4, TEACHER)
    decode = latency.speed_vs_teacher(INT4, TEACHER, latency.DECODE)
    # the teacher never ran ort-int4: both fall back to its headline backend, ort-fp32
    assert (prefill.model.backend, prefill.speed, prefill.slower) == ("ort-fp32", 1.25, False)
    assert (decode.model.backend, decode.speed, decode.slower) == ("ort-fp32", 0.8, True)
    assert latency.speed_cell(INT4, TEACHER, latency.DECODE) == "0.80× (slower, on ort-fp32)"
    assert [t.ms for t in latency.timings(INT4, latency.DECODE)] == [4.0, 1.25, 0.5]
    assert latency.prompt_tokens([TEACHER, INT4]) == [80]


def test_notes_say_who_decodes_slower():
    notes = latency.latency_notes([TEACHER, INT4, FAST])
    assert notes[0].startswith("Latency and speed vs teacher are the prefill")
    assert "No model is slower than the teacher on the same backend (prefill)." in notes
    assert (
        "Decode is one new token with the KV cache after a prompt of 80 tokens, compared with "
        "the teacher's on the same backend and threads, apart from the prefill." in notes
    )
    assert (
        "Decodes slower than the teacher on the same backend: rtn-w4 (ort-fp32, 2 threads: "
        "1.25 ms vs 1.00 ms, 0.80×)." in notes
    )
    quick = latency.latency_notes([TEACHER, FAST])
    assert "No model decodes slower than the teacher on the same backend." in quick
    # a teacher timed on the prefill only: the decode is not compared, and that is said
    plain_teacher = ResultRecord(
        "teacher", "teacher", latency_ms=2.0, latency_backend="ort-fp32",
        extra={"bench": {"threads": 2, "language_model": {"ort-fp32": {"median_ms": 2.0}}}},
    )  # fmt: skip
    notes = latency.latency_notes([plain_teacher, INT4])
    assert notes[-1].startswith("Decode (one new token with the KV cache after a prompt of 80")
    assert notes[-1].endswith("no model's decode is compared with it.")


def test_backend_table_has_a_prefill_and_a_decode_row_per_model():
    header, rows = latency.backend_table([TEACHER, INT4])
    assert header == [
        "name", "workload", "threads", "pytorch-fp32 ms", "ort-fp32 ms", "ort-int4 ms",
    ]  # fmt: skip
    assert rows == [
        ["teacher", "prefill", "2", "8.00", "2.00", "—"],
        ["teacher", "decode (one token)", "2", "4.00", "1.00", "—"],
        ["rtn-w4", "prefill", "2", "8.00 (1.00×)", "1.60 (1.25×)", "1.80"],
        ["rtn-w4", "decode (one token)", "2", "4.00 (1.00×)", "1.25 (0.80×)", "0.50"],
    ]
    note = latency.backend_table_note([TEACHER, INT4])
    assert "prefill (the whole prompt in one call) and decode (one new token" in note
    assert "after a prompt of 80 tokens" in note


def test_the_rendered_report_shows_both_and_says_slower():
    markdown = render(ReportInputs([TEACHER, INT4, FAST], [], [])).markdown
    assert "| name | workload | threads | pytorch-fp32 ms | ort-fp32 ms | ort-int4 ms |" in markdown
    assert "| rtn-w4 | decode (one token) | 2 | 4.00 (1.00×) | 1.25 (0.80×) | 0.50 |" in markdown
    assert "Decodes slower than the teacher on the same backend: rtn-w4" in markdown


def test_as_deployed_decode_slower_is_said():
    slow_int4 = _record(
        "gptq-w4", headline="ort-int4",
        prefill={"ort-fp32": 2.0, "ort-int4": 1.5}, decode={"ort-fp32": 1.0, "ort-int4": 1.5},
    )  # fmt: skip
    notes = latency.latency_notes([TEACHER, slow_int4])
    assert (
        "As deployed, decodes slower than the teacher on ort-fp32, 2 threads (1.00 ms): "
        "gptq-w4 on ort-int4, 2 threads (1.50 ms)." in notes
    )
    assert not any(
        n.startswith("As deployed, decodes") for n in latency.latency_notes([TEACHER, INT4])
    )
