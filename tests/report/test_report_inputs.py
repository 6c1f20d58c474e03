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
    assert inputs.sources[:2] == [root / "results.json", root / "teacher" / "predictions.jsonl"]
    assert root / "runs" / "qad-w4a8" / "metrics.jsonl" in inputs.sources
    assert root / "runs" / "rtn-w4a8" / "metrics.jsonl" in inputs.sources
    # every run's per-question answers, by the record they belong to (the teacher's included)
    assert sorted(inputs.predictions) == sorted(r.name for r in fixtures.demo_records())
    qad = inputs.predictions["qad-w4a8"]
    assert qad.path == root / "runs" / "qad-w4a8" / "predictions.jsonl"
    assert len(qad.scores) == 400 and qad.binary and qad.accuracy == pytest.approx(91.5)
    # old runs without predictions.jsonl are read all the same
    old = fixtures.write_demo_dir(tmp_path / "old", questions=None)
    assert collect_inputs([old]).predictions == {}


def test_predictions_belong_to_the_record_of_their_folder(tmp_path, fixtures):
    # a run directory: its one record, whatever the folder is called
    run = tmp_path / "some-folder"
    write_records(run / "results.json", [ResultRecord("qad-w4a8", "qad", 4, 8, value=50.0)])
    fixtures.write_predictions(run, [1.0, 0.0])
    assert list(collect_inputs([run]).predictions) == ["qad-w4a8"]
    # its results.json given directly, or predictions.jsonl given directly
    assert list(collect_inputs([run / "results.json"]).predictions) == ["qad-w4a8"]
    assert list(collect_inputs([run / "predictions.jsonl"]).predictions) == ["qad-w4a8"]
    # several records: the one named like the folder; none of them: not used (and said)
    shared = tmp_path / "rtn"
    write_records(
        shared / "results.json",
        [ResultRecord("rtn", "rtn", 4, 8, value=1.0), ResultRecord("x", "rtn", 2, 16, value=1.0)],
    )
    fixtures.write_predictions(shared, [1.0])
    assert list(collect_inputs([shared]).predictions) == ["rtn"]
    other = tmp_path / "other"
    write_records(
        other / "results.json",
        [ResultRecord("a", "rtn", 4, 8, value=1.0), ResultRecord("b", "rtn", 2, 16, value=1.0)],
    )
    fixtures.write_predictions(other, [1.0])
    assert collect_inputs([other]).predictions == {}
    # a folder of a demo's runs/ without results.json: the record named like the folder
    demo = tmp_path / "demo"
    write_records(demo / "results.json", [ResultRecord("gptq", "gptq", 4, 8, value=50.0)])
    fixtures.write_predictions(demo / "runs" / "gptq", {"q1": 1.0, "q2": 0.0})
    assert collect_inputs([demo]).predictions["gptq"].scores == {"q1": 1.0, "q2": 0.0}


def test_dense_runs_per_image_rows_are_not_read_as_question_scores(tmp_path):
    """A segmentation run's predictions.jsonl holds one row of metrics per test image (no
    question ids); the report collects its record and leaves the file out of the pairing."""
    run = tmp_path / "qad-seg"
    record = ResultRecord("qad-seg", "qad", 4, 8, task="segmentation", metric="miou", value=61.0)
    write_records(run / "results.json", [record])
    rows = [{"image_id": i, "miou": 0.5, "pixel_accuracy": 0.9} for i in (1, 2)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = collect_inputs([run])
    assert [r.name for r in inputs.records] == ["qad-seg"] and inputs.predictions == {}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2 is not valid JSON"),
        ("[1, 2]", "line 2 is not a JSON object"),
        ('{"question_id": null, "score": 1}', "line 2: question_id must be an integer or a string"),
        ('{"question_id": 7, "score": 1.5}', r"line 2: score must be a number in \[0, 1\]"),
        ('{"question_id": 7, "score": true}', r"line 2: score must be a number in \[0, 1\]"),
        ('{"question_id": 1, "score": 0}', "line 2: question_id 1 appears twice"),
    ],
)
def test_bad_predictions_name_the_file_and_line(tmp_path, fixtures, line, message):
    run = tmp_path / "run"
    write_records(run / "results.json", [ResultRecord("run", "qad", 4, 8, value=50.0)])
    path = fixtures.write_predictions(run, {1: 1.0})
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        collect_inputs([run])
    assert str(path) in str(info.value) and "distiq eval RUN_DIR" in str(info.value)
    path.write_text("\n")
    with pytest.raises(ConfigError, match="no question in the file"):
        collect_inputs([run])


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
