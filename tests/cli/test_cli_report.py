"""``distiq report``: from fixture results JSON + metrics.jsonl, and its error exits."""

import json

import pytest

from distiq.cli import app


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, fixtures):
    """One rendered demo directory shared by the tests that only read it (drawing takes a few
    seconds)."""
    from typer.testing import CliRunner

    root = fixtures.write_demo_dir(tmp_path_factory.mktemp("demo"))
    (root / "demo_times.json").write_text('{"seconds": {}}\n')  # what distiq demo leaves
    result = CliRunner().invoke(app, ["report", str(root)], env={"COLUMNS": "200"})
    return root, result


def test_report_demo_dir(demo_report):
    root, result = demo_report
    assert result.exit_code == 0, result.output
    assert f"report: {root / 'report.md'}\n" in result.stdout
    assert f"report: {root / 'report.html'}\n" in result.stdout
    assert "6 of 6 goals met." in result.stdout
    assert "qad-w4a8" in result.stdout and "ort-int4, 2 threads" in result.stdout
    assert "1.20× (faster, on ort-fp32)" in result.stdout
    names = {p.name for p in root.iterdir()}
    assert {"report.md", "report.html", "accuracy_vs_size.png", "curves_qad-w4a8.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    md = (root / "report.md").read_text()
    assert (
        "| qad-w2a16 | qad | 2/16 | 64 | 0.40 | 85.00 | 92.4 % | 4.00 | ort-fp32, 2 threads |" in md
    )
    assert "Slower than the teacher on the same backend: qad-w2a16" in md
    assert "![training curves of rtn-w4a8](curves_rtn-w4a8.png)" in md
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4


def test_a_users_runs_are_not_judged_by_the_demos_goals(runner, tmp_path, fixtures):
    root = fixtures.write_demo_dir(tmp_path / "mine")  # the same runs, not a demo's output
    result = runner.invoke(app, ["report", str(root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "goals" not in result.stdout
    assert "## Goals" not in (root / "report.md").read_text()


def test_report_several_paths_needs_out(runner, tmp_path, fixtures):
    one = tmp_path / "runs" / "a"
    fixtures.write_metrics(one / "metrics.jsonl", fixtures.metrics_lines(steps=2))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"name": "teacher", "method": "teacher", "value": 80.0}]))
    result = runner.invoke(app, ["report", str(one), str(results)])
    assert result.exit_code == 1
    assert "2 paths given: say where the report goes with --out DIR" in result.stderr
    assert not (tmp_path / "report.md").exists() and not (one / "report.md").exists()

    out = tmp_path / "new" / "report"
    result = runner.invoke(app, ["report", str(one), str(results), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "from 1 result record(s) and the training metrics of 1 run(s)" in md
    assert "![training curves of a](curves_a.png)" in md


def test_report_of_a_results_file_goes_next_to_it(runner, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"name": "rtn", "method": "rtn", "w_bits": 4, "value": 7.5}]))
    result = runner.invoke(app, ["report", str(results)])
    assert result.exit_code == 0, result.output
    assert (
        "| rtn | rtn | 4/16 | per-channel | — | 7.50 | — | — | — | — |"
        in (tmp_path / "report.md").read_text()
    )


def _no_report(path):
    return not (path / "report.md").exists() and not (path / "report.html").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "not valid JSON"),
        ('{"name": "x"}', "a results file holds a JSON list of records"),
        ('[{"name": "x", "method": "qadd"}]', "did you mean 'qad'"),
        ('[{"name": "x", "method": "qad", "value": 250}]', "value must be a percentage"),
    ],
)
def test_report_bad_results_file(runner, tmp_path, content, message):
    (tmp_path / "results.json").write_text(content)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert message in result.stderr and str(tmp_path / "results.json") in result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    assert _no_report(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_report_corrupt_metrics_line(runner, tmp_path, fixtures):
    lines = fixtures.metrics_lines(steps=3)
    path = fixtures.write_metrics(tmp_path / "runs" / "qad" / "metrics.jsonl", lines)
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], "garbage", *text[1:]]) + "\n")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "line 2 is not valid JSON" in result.stderr and str(path) in result.stderr
    assert _no_report(tmp_path)


def test_report_missing_or_empty_paths(runner, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert f"error: {tmp_path / 'nope'} does not exist" in result.stderr
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to report in" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_report_unwritable_out(runner, tmp_path, fixtures):
    root = tmp_path / "demo"
    root.mkdir()
    (root / "results.json").write_text(
        json.dumps([{"name": "t", "method": "teacher", "value": 9.0}])
    )
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    for out, message in (
        (blocker, "it is a file, not a directory"),
        (blocker / "sub", "cannot write the report to"),
        ("/proc/distiq-report-test", "choose a writable directory with --out"),
    ):
        result = runner.invoke(app, ["report", str(root), "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert message in result.stderr and "Traceback" not in result.output
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "file.txt"]
    assert _no_report(root)
