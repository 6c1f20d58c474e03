"""distiq.report.inputs: metrics.jsonl parsing, collecting records and runs from paths, merging."""

import json
import math

import pytest

from distiq.config import ConfigError
from distiq.report import collect_inputs, merge_records, read_curves
from distiq.results import ResultRecord, write_records


def test_read_curves_series_nan_and_torn_last_line(tmp_path, fixtures):
    path = fixtures.write_metrics(
        tmp_path / "run" / "metrics.jsonl",
        fixtures.metrics_lines(steps=6, nan_at=2),
        tail='{"kind": "train", "st',  # a run killed while writing its last line
    )
    run = read_curves(path)
    assert run.name == "run"
    assert run.train_steps == (1, 2, 3, 4, 5, 6)
    assert run.total == pytest.approx([3.0 / s for s in range(1, 7)])
    assert set(run.terms) == {"task", "kd", "rounding"}
    assert run.terms["kd"] == pytest.approx([1.0 / s for s in range(1, 7)])
    assert math.isnan(run.terms["rounding"][1]) and run.terms["rounding"][0] == 0.01
    assert run.eval_steps == (3, 6)
    # per-type breakdowns and counts are not curves
    assert list(run.eval_metrics) == ["vqa_accuracy"]
    assert run.eval_metrics["vqa_accuracy"] == pytest.approx([0.53, 0.56])


def test_read_curves_term_missing_in_some_lines_is_nan(tmp_path, fixtures):
    lines = fixtures.metrics_lines(steps=2)
    del lines[0]["terms"]["kd"]
    run = read_curves(fixtures.write_metrics(tmp_path / "metrics.jsonl", lines))
    assert math.isnan(run.terms["kd"][0]) and run.terms["kd"][1] == 0.5


def test_read_curves_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "total": 1.0}\n{oops\n{"kind": "eval"}\n')
    with pytest.raises(ConfigError, match=r"line 2 is not valid JSON") as info:
        read_curves(path)
    assert str(path) in str(info.value)
    path.write_text('{"kind": "train", "step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON object"):
        read_curves(path)
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        read_curves(tmp_path / "absent.jsonl")


def test_collect_demo_dir(tmp_path, fixtures):
    root = fixtures.write_demo_dir(tmp_path / "demo")
    inputs = collect_inputs([root])
    assert [r.name for r in inputs.records] == [r.name for r in fixtures.demo_records()]
    assert [c.name for c in inputs.curves] == ["qad-w4a8", "rtn-w4a8"]
    retention = {r.name: r.retention for r in inputs.records}
    assert retention["teacher"] == 1.0
    assert retention["qad-w4a8"] == pytest.approx(91.5 / 92.0)
    assert inputs.sources == [
        root / "results.json",
        root / "runs" / "qad-w4a8" / "metrics.jsonl",
        root / "runs" / "rtn-w4a8" / "metrics.jsonl",
    ]


def test_collect_merges_records_by_name_across_files(tmp_path, fixtures):
    run = tmp_path / "runs" / "qad"
    run.mkdir(parents=True)
    write_records(
        tmp_path / "results.json",
        [
            ResultRecord("teacher", "teacher", value=80.0),
            ResultRecord("qad", "qad", 4, 8, value=60.0),
        ],
    )
    # bench fills in latency later, in the run's own results file
    write_records(
        run / "results.json",
        [ResultRecord("qad", "qad", 4, 8, latency_ms=2.0, extra={"machine": "box"})],
    )
    fixtures.write_metrics(run / "metrics.jsonl", fixtures.metrics_lines(steps=1))
    inputs = collect_inputs([tmp_path, run])  # run given twice (directly and under runs/)
    qad = {r.name: r for r in inputs.records}["qad"]
    assert (qad.value, qad.latency_ms, qad.extra, qad.retention) == (
        60.0,
        2.0,
        {"machine": "box"},
        0.75,
    )
    assert [c.name for c in inputs.curves] == ["qad"]  # read once


def test_merge_records_later_fields_win():
    a = ResultRecord("x", "qad", value=50.0, size_mb=1.0, extra={"a": 1})
    b = ResultRecord("x", "qad", value=55.0, extra={"b": 2})
    (merged,) = merge_records([a, b])
    assert (merged.value, merged.size_mb, merged.extra) == (55.0, 1.0, {"a": 1, "b": 2})


def test_collect_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_inputs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing to report in"):
        collect_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="at least one"):
        collect_inputs([])
    bad = tmp_path / "results.json"
    bad.write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        collect_inputs([tmp_path])
    assert str(bad) in str(info.value)
    bad.write_text(json.dumps([{"name": "x", "method": "qadd"}]))
    with pytest.raises(ConfigError, match="did you mean 'qad'"):
        collect_inputs([bad])
