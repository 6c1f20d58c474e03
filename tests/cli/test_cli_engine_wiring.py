"""The verbs call distiq.train / distiq.export / distiq.bench as their APIs say. The engine
functions are replaced by fakes that record their arguments (the engine has its own tests), so
this checks the CLI's side: arguments, output, exit codes."""

from types import SimpleNamespace

import pytest

import distiq.bench
import distiq.export
import distiq.train
from distiq.cli import app
from distiq.config import ConfigError
from distiq.results import ResultRecord, write_records


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "qad.yaml"
    path.write_text("method: qad\n")
    return path


@pytest.fixture
def fake_train(monkeypatch, tmp_path):
    calls = {}

    def load_recipe(path, **changes):
        calls["load_recipe"] = (path, changes)
        method = path.read_text().split(":")[1].strip()
        output = changes.get("output", tmp_path / "runs" / method)
        return SimpleNamespace(method=method, run_name=f"{method}-w4a8", output=output)

    def compress(recipe, *, overwrite=False, resume=False, on_step=None, on_eval=None):
        calls["compress"] = dict(recipe=recipe, overwrite=overwrite, resume=resume)
        for step in (1, 2):
            on_step(SimpleNamespace(step=step, steps=2, total=0.5 / step))
        on_eval(2, {"vqa_accuracy": 88.5})
        write_records(
            recipe.output / "results.json",
            [ResultRecord(recipe.run_name, recipe.method, 4, 8, 64, value=88.5)],
        )
        return recipe.output

    def evaluate(run_dir, *, test_questions=-1, recipe=None, out=None):
        calls["evaluate"] = (run_dir, test_questions, recipe, out)
        return [ResultRecord("qad-w4a8", "qad", 4, 8, 64, value=87.25)]

    def check_recipe(recipe, *, overwrite=False, resume=False):
        calls["check_recipe"] = dict(recipe=recipe, overwrite=overwrite, resume=resume)

    monkeypatch.setattr(distiq.train, "load_recipe", load_recipe, raising=False)
    monkeypatch.setattr(distiq.train, "check_recipe", check_recipe, raising=False)
    monkeypatch.setattr(distiq.train, "compress", compress, raising=False)
    monkeypatch.setattr(distiq.train, "evaluate", evaluate, raising=False)
    return calls


def test_compress(runner, recipe, fake_train, tmp_path):
    out = tmp_path / "elsewhere"
    result = runner.invoke(app, ["compress", str(recipe), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert fake_train["load_recipe"] == (recipe, {"output": out})
    assert fake_train["compress"]["resume"] is True and fake_train["compress"]["overwrite"] is False
    assert fake_train["check_recipe"] == fake_train["compress"]  # checked before the work
    assert f"run: {out}\n" in result.stdout
    assert "qad-w4a8" in result.stdout and "88.50" in result.stdout
    assert "step 2: validation vqa_accuracy 88.5" in result.stderr
    assert "qad qad-w4a8: step 2/2" in result.stderr  # progress (plain lines: not a terminal)


def test_teacher_refuses_other_methods(runner, recipe, fake_train, monkeypatch):
    import distiq.demo.teacher

    result = runner.invoke(app, ["teacher", str(recipe)])
    assert result.exit_code == 1
    assert "a 'qad' recipe compresses a model: run it with `distiq compress RECIPE`" in (
        result.stderr
    )
    assert "compress" not in fake_train
    calls = []
    monkeypatch.setattr(
        distiq.demo.teacher, "train_teacher", lambda recipe, **kw: calls.append(kw) or tmp_out
    )
    tmp_out = recipe.parent
    recipe.write_text("method: teacher\ndata: {scenes: somewhere}\n")
    result = runner.invoke(app, ["teacher", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert calls[0]["overwrite"] is True


def test_engine_input_errors_are_user_errors(runner, recipe, monkeypatch):
    def load_recipe(path, **changes):
        raise ConfigError(["objective.terms.kdd: unknown key (did you mean 'kd'?)"], str(path))

    monkeypatch.setattr(distiq.train, "load_recipe", load_recipe, raising=False)
    monkeypatch.setattr(distiq.train, "compress", lambda *a, **k: None, raising=False)
    result = runner.invoke(app, ["compress", str(recipe)])
    assert result.exit_code == 1 and "did you mean 'kd'?" in result.stderr
    assert "Traceback" not in result.output

    def exists(recipe, **kwargs):
        raise FileExistsError(f"{recipe.output} already holds a run; pass --overwrite or --resume")

    def never(*args, **kwargs):
        raise AssertionError("compress must not start after a failed check")

    monkeypatch.setattr(distiq.train, "load_recipe", lambda p, **c: SimpleNamespace(
        method="qad", run_name="qad", output=p.parent), raising=False)  # fmt: skip
    monkeypatch.setattr(distiq.train, "check_recipe", exists, raising=False)
    monkeypatch.setattr(distiq.train, "compress", never, raising=False)
    result = runner.invoke(app, ["compress", str(recipe)])
    assert result.exit_code == 1 and "already holds a run; pass --overwrite" in result.stderr
    assert "stage" not in result.stderr  # no run was started


def test_eval(runner, fake_train, tmp_path):
    result = runner.invoke(
        app, ["eval", str(tmp_path), "--questions", "50"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert fake_train["evaluate"] == (tmp_path, 50, None, None)
    assert "87.25" in result.stdout
    runner.invoke(app, ["eval", str(tmp_path)])
    assert fake_train["evaluate"] == (tmp_path, -1, None, None)  # the recipe's own limit
    recipe, out = tmp_path / "r.yaml", tmp_path / "results"
    result = runner.invoke(app, ["eval", str(tmp_path), "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert fake_train["evaluate"] == (tmp_path, -1, recipe, out)  # a model directory


def test_export(runner, monkeypatch, tmp_path):
    calls = []

    def export_run(run_dir, format="packed", *, out=None, precision="auto"):
        calls.append((run_dir, format, out, precision))
        return tmp_path / "export" / format

    monkeypatch.setattr(distiq.export, "export_run", export_run)
    result = runner.invoke(app, ["export", str(tmp_path), "-f", "onnx", "--precision", "int4"])
    assert result.exit_code == 0, result.output
    assert calls == [(tmp_path, "onnx", None, "int4")]
    assert f"exported: {tmp_path / 'export' / 'onnx'}\n" in result.stdout
    result = runner.invoke(app, ["export", str(tmp_path), "-f", "packed", "--precision", "int8"])
    assert result.exit_code == 1 and "--precision applies to --format onnx only" in result.stderr
    assert len(calls) == 1


def test_bench(runner, monkeypatch, tmp_path):
    calls = []

    def bench_run(run_dir, *, repeats=30, threads=2, results=None):
        calls.append((run_dir, repeats, threads))
        return [ResultRecord("qad-w4a8", "qad", 4, 8, 64, size_mb=0.5, latency_ms=1.5,
                             latency_backend="ort-int8")]  # fmt: skip

    monkeypatch.setattr(distiq.bench, "bench_run", bench_run)
    result = runner.invoke(app, ["bench", str(tmp_path), "--repeats", "5"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert calls == [(tmp_path, 5, 2)]
    assert "1.50" in result.stdout and "ort-int8" in result.stdout
