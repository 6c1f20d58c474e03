"""``distiq demo`` (:mod:`distiq.demo`): the plan (shipped recipes + the demo's paths and sizes),
the cache, and the orchestration with the engine replaced by fakes (the engine has its own tests; here the demo's
order, caching, export of the best run, results.json and report are checked)."""

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml

import distiq
from distiq.cli import app
from distiq.config import dump_yaml, load_yaml
from distiq.demo import run as demo
from distiq.demo.jobs import default_jobs
from distiq.demo.plan import (
    FULL,
    QUICK,
    RUNS,
    TEACHER,
    cache_action,
    expected_work,
    longest_first,
    planned_recipe,
)
from distiq.demo.recipe import teacher_recipe_from_dict
from distiq.results import ResultRecord, read_records, upsert_records
from distiq.train.recipe import recipe_from_dict, recipe_to_dict


def _recipe(name, data, **kwargs):
    build = teacher_recipe_from_dict if name == TEACHER else recipe_from_dict
    return build(data, **kwargs)


ACCURACY = {"teacher": 92.0, "kd-small": 88.0, "rtn": 70.0, "gptq": 80.0, "qat": 86.0, "qad": 91.5}


@pytest.mark.parametrize("settings", [FULL, QUICK], ids=["full", "quick"])
def test_every_planned_recipe_is_valid(tmp_path, settings):
    for name in (TEACHER, *RUNS):
        data = planned_recipe(name, settings, tmp_path / "out", tmp_path / "scenes")
        recipe = _recipe(name, data, source=name)
        assert recipe.output == tmp_path / "out" / (
            "teacher" if name == TEACHER else f"runs/{name}"
        )
        assert recipe.data.scenes == tmp_path / "scenes"
        if name != TEACHER:
            assert recipe.teacher.path == tmp_path / "out" / "teacher"
        if settings is QUICK:
            assert recipe.data.test_questions == QUICK.test_questions
            if recipe.method in ("qat", "kd", "qad"):
                assert recipe.train.steps == QUICK.student_steps
            if recipe.method == "teacher":
                assert recipe.train.steps == QUICK.teacher_steps
                assert recipe.teacher.vision_steps == QUICK.teacher_vision_steps == 0


def test_trained_methods_share_steps_and_batch(tmp_path):
    trained = [
        recipe_from_dict(planned_recipe(name, FULL, tmp_path, tmp_path))
        for name in RUNS
        if name.split("-")[0] in ("qat", "qad", "kd")
    ]
    assert len({(r.train.steps, r.train.batch_size, r.train.seed) for r in trained}) == 1


def test_cache_action(tmp_path):
    recipe = recipe_from_dict(planned_recipe("rtn-w4a8", QUICK, tmp_path, tmp_path))
    planned = recipe_to_dict(recipe)
    run = tmp_path / "run"
    assert cache_action(run, planned) == "run"
    dump_yaml(recipe, run / "recipe.yaml")
    assert cache_action(run, planned) == "run"  # no result yet, no checkpoint
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    assert cache_action(run, planned) == "resume"
    upsert_records(run / "results.json", [ResultRecord("rtn-w4a8", "rtn", 4, 8, value=50.0)])
    assert cache_action(run, planned) == "reuse"
    changed = recipe_to_dict(recipe_from_dict(planned_recipe("rtn-w4a8", FULL, tmp_path, tmp_path)))
    assert cache_action(run, changed) == "run"
    # a run written before a key with a default joined the schema: the same run once normalized
    older = load_yaml(run / "recipe.yaml")
    del older["data"]["generate"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(older))
    assert cache_action(run, planned) == "run"
    normalize = lambda written: recipe_to_dict(recipe_from_dict(written))  # noqa: E731
    assert cache_action(run, planned, normalize) == "reuse"
    assert cache_action(run, changed, normalize) == "run"
    older["quantization"]["weight"]["bitz"] = 4  # one the schema refuses: run anew
    (run / "recipe.yaml").write_text(yaml.safe_dump(older))
    assert cache_action(run, planned, normalize) == "run"
    (run / "results.json").write_text("{corrupt")
    assert cache_action(run, planned) == "run"


# the runs of the quick demo (12 steps each) by expected work: quantized with a teacher, then
# quantized or with a teacher, then gptq, then rtn
LONGEST_FIRST = [
    "qad-w4a8",
    "qad-w2a16-g64",
    "qat-w4a8",
    "qat-w2a16-g64",
    "kd-small",
    "gptq-w4a8",
    "gptq-w2a16-g64",
    "rtn-w4a8",
    "rtn-w2a16-g64",
]


def test_runs_go_longest_first(tmp_path):
    recipes = {
        name: recipe_from_dict(planned_recipe(name, FULL, tmp_path, tmp_path)) for name in RUNS
    }
    assert longest_first(recipes) == LONGEST_FIRST
    steps = recipes["qat-w4a8"].train.steps
    assert expected_work(recipes["qad-w4a8"]) == 4 * steps
    assert expected_work(recipes["kd-small"]) == 2 * steps
    assert expected_work(recipes["rtn-w4a8"]) < expected_work(recipes["gptq-w4a8"]) < 1


class FakeEngine:
    """distiq's real recipe functions; fake scenes, compress, bench and export."""

    calls: ClassVar[list] = []

    def __init__(self):
        self.recipe_from_dict = recipe_from_dict
        self.teacher_recipe_from_dict = teacher_recipe_from_dict
        self.recipe_to_dict = recipe_to_dict
        self.train_teacher = self.compress

    def import_model_code(self):
        self.calls.append(("import_model_code",))

    def load_teacher_data(self, recipe):  # distiq.train.run_data
        self.calls.append(("load_teacher_data", recipe.run_name))
        return f"splits of {recipe.data.scenes} for {recipe.teacher.path}"

    def load_teacher_training_data(self, recipe):
        self.calls.append(("load_teacher_training_data", recipe.run_name))
        return SimpleNamespace(
            name=f"teacher splits of {recipe.data.scenes}",
            without_heads=lambda: f"splits of {recipe.data.scenes} for {recipe.output}",
        )

    def generate_scenes(self, out, count, seed):
        root = Path(out) / f"edge-scenes-n{count}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "meta.json").write_text("{}")
        return SimpleNamespace(root=root)

    fail: ClassVar[str | None] = None  # a run name whose compress raises

    def compress(self, recipe, *, overwrite, resume, on_step, on_eval, data=None):
        if os.environ.get("RANK", "0") != "0":
            return None  # a data-parallel run: only its first process writes, as the engine's
        self.calls.append(("compress", recipe.run_name, overwrite, resume))
        if recipe.run_name == self.fail:
            raise ValueError(f"{recipe.run_name} failed on purpose")
        out = Path(recipe.output)
        dump_yaml(recipe, out / "recipe.yaml")
        if data is not None:
            (out / "shared_data.txt").write_text(getattr(data, "name", data))
        quant = getattr(recipe, "quantization", None)  # a teacher recipe has none
        key = recipe.run_name if recipe.method in ("teacher", "kd") else recipe.method
        value = ACCURACY[key] - (5.0 if quant is not None and quant.w_bits == 2 else 0.0)
        record = ResultRecord(
            recipe.run_name,
            recipe.method,
            quant.w_bits if quant else 16,
            quant.a_bits if quant else 16,
            quant.group_size if quant else None,
            value=value,
        )
        upsert_records(out / "results.json", [record])
        # each test question's score, as the engine writes them: the first value % right
        rows = [{"question_id": q, "score": float(q < round(10 * value))} for q in range(1000)]
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if recipe.method in ("teacher", "qat", "kd", "qad"):
            on_step(SimpleNamespace(step=1, steps=1, total=1.0))
            lines = [{"kind": "train", "step": 1, "total": 1.0, "terms": {"task": 1.0}}]
            (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return out

    export_fail: ClassVar[str | None] = None  # a run name whose bench_exports raises

    def bench_exports(self, run_dir, root):
        """In a worker: 'exports' (a file the parent's bench_run gets the path of)."""
        if Path(run_dir).name == self.export_fail:
            raise RuntimeError("the ONNX exporter broke")
        root.mkdir(parents=True)
        (root / "model.onnx").write_text(Path(run_dir).name)
        return {"ort-fp32": root, "ort-int8": "cannot export"}

    def bench_run(self, run_dir, *, repeats, workloads, exports=None):
        if exports is not None:  # made by bench_exports of the same run, and still there
            assert (exports["ort-fp32"] / "model.onnx").read_text() == Path(run_dir).name
            exports = sorted(exports)
        self.calls.append(("bench", Path(run_dir).name, repeats, workloads, exports))
        old = read_records(Path(run_dir) / "results.json")
        new = [
            r.replace(size_mb=4.0 * r.w_bits / 16, latency_ms=1.0, latency_backend="ort-int8")
            for r in old
        ]
        return upsert_records(Path(run_dir) / "results.json", new)

    def export_run(self, run_dir, fmt):
        self.calls.append(("export", Path(run_dir).name, fmt))
        if fmt == "onnx":
            raise ValueError("2-bit weights do not fit ONNX")
        return Path(run_dir) / "export" / fmt


@pytest.fixture
def fake_engine(monkeypatch):
    from distiq.report import plots

    FakeEngine.calls = []
    monkeypatch.setattr(FakeEngine, "fail", None)
    monkeypatch.setattr(FakeEngine, "export_fail", None)
    monkeypatch.setattr(demo, "_Engine", FakeEngine)
    for name in ("training_curves", "accuracy_vs_size", "accuracy_vs_latency"):  # drawing is
        monkeypatch.setattr(plots, name, lambda *args: b"PNG")  # tested in tests/report
    return FakeEngine


def test_demo_end_to_end_with_cache(runner, tmp_path, fake_engine):
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--quick", "-j", "1", "--out", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    compressed = [c[1] for c in fake_engine.calls if c[0] == "compress"]
    assert compressed == ["teacher", *LONGEST_FIRST]
    assert ("import_model_code",) not in fake_engine.calls  # one process: nothing forks
    # the splits are read once, for the teacher, and serve every run without the heads' targets
    assert [c for c in fake_engine.calls if c[0].startswith("load_")] == [
        ("load_teacher_training_data", "teacher")
    ]
    scenes = out / "data" / "edge-scenes-n2000"
    assert (out / "teacher" / "shared_data.txt").read_text() == f"teacher splits of {scenes}"
    for name in RUNS:
        shared = (out / "runs" / name / "shared_data.txt").read_text()
        assert shared == f"splits of {scenes} for {out / 'teacher'}"
    assert [c for c in fake_engine.calls if c[0] == "export"] == [
        ("export", "qad-w4a8", "packed"),
        ("export", "qad-w4a8", "onnx"),
    ]
    assert "export onnx of qad-w4a8 skipped: 2-bit weights do not fit ONNX" in result.stderr
    records = {r.name: r for r in read_records(out / "results.json")}
    assert list(records) == ["teacher", *RUNS]
    assert records["qad-w4a8"].extra["exported"] == [str(out / "runs/qad-w4a8/export/packed")]
    assert records["qad-w4a8"].retention == pytest.approx(91.5 / 92.0)
    assert all(r.size_mb is not None and r.latency_ms == 1.0 for r in records.values())
    md = (out / "report.md").read_text()
    assert "6 of 6 goals met." in md
    assert "![training curves of teacher](curves_teacher.png)" in md
    assert "![training curves of qad-w4a8](curves_qad-w4a8.png)" in md
    assert f"report: {out / 'report.md'}\n" in result.stdout
    summary = json.loads((out / "demo_times.json").read_text())
    assert {"scenes", "teacher", "data", *RUNS, "bench", "export", "report", "total"} == set(
        summary["seconds"]
    )
    assert summary["reused"] == [] and summary["settings"]["scenes"] == QUICK.scenes
    assert summary["code"]["distiq"] == distiq.__version__
    assert "git_commit" in summary["code"]  # the commit in a checkout, else None and why
    bench = [c for c in fake_engine.calls if c[0] == "bench"]
    assert bench[0] == ("bench", "teacher", QUICK.bench_repeats, ("language_model",), None)

    # everything cached: nothing is trained or measured again
    fake_engine.calls.clear()
    result = runner.invoke(app, ["demo", "--quick", "-j", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake_engine.calls] == ["export", "export"]
    assert "teacher: reusing" in result.stderr
    summary = json.loads((out / "demo_times.json").read_text())
    assert summary["reused"] == ["teacher", *RUNS] and "teacher" not in summary["seconds"]

    # a cached teacher: its runs read their splits once, for all of them
    for name in RUNS:
        (out / "runs" / name / "recipe.yaml").unlink()
    fake_engine.calls.clear()
    result = runner.invoke(app, ["demo", "--quick", "-j", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [c for c in fake_engine.calls if c[0].startswith("load_")] == [
        ("load_teacher_data", LONGEST_FIRST[0])
    ]
    assert [c[1] for c in fake_engine.calls if c[0] == "compress"] == LONGEST_FIRST

    # a changed teacher recipe retrains the teacher and therefore every run
    recipe = out / "teacher" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("seed: 0", "seed: 1", 1))
    fake_engine.calls.clear()
    result = runner.invoke(app, ["demo", "--quick", "-j", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [c[1:] for c in fake_engine.calls if c[0] == "compress"] == [
        (name, True, False) for name in ("teacher", *LONGEST_FIRST)
    ]


def test_demo_bad_output_fails_before_work(runner, tmp_path, fake_engine):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["demo", "--quick", "--out", str(blocker)])
    assert result.exit_code == 1 and "it is a file, not a directory" in result.stderr
    assert fake_engine.calls == []


def test_demo_missing_recipes_is_a_clear_error(runner, tmp_path, fake_engine, monkeypatch):
    monkeypatch.setenv("DISTIQ_RECIPES", str(tmp_path / "nowhere"))
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "the demo's recipes are not in" in result.stderr and "DISTIQ_RECIPES" in result.stderr
    assert fake_engine.calls == []


def test_recipes_ship_inside_the_package(monkeypatch):
    # The wheel's package data (pyproject: distiq = ["recipes/*.yaml"]) is the folder found
    # next to the package, the same files as the checkout's recipes/.
    import distiq
    from distiq.demo.plan import recipes_dir

    monkeypatch.delenv("DISTIQ_RECIPES", raising=False)
    found = recipes_dir()
    assert found == Path(distiq.__file__).resolve().parent / "recipes"
    top = Path(__file__).resolve().parents[2] / "recipes"
    assert sorted(p.name for p in found.glob("*.yaml")) == sorted(
        p.name for p in top.glob("*.yaml")
    )


@pytest.mark.skipif(default_jobs() == 1, reason="needs fork")
def test_demo_runs_in_worker_processes(runner, tmp_path, fake_engine):
    # Workers are forked: they run the (fake) engine, the parent sees only their run directories.
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--jobs", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [c for c in fake_engine.calls if c[0] == "compress"] == []  # all in workers
    assert fake_engine.calls[0] == ("import_model_code",)  # once, before the first fork
    # the splits were loaded once, in the parent, and handed to the teacher's processes and to
    # every run
    assert [c for c in fake_engine.calls if c[0].startswith("load_")] == [
        ("load_teacher_training_data", "teacher")
    ]
    scenes = out / "data" / "edge-scenes-n2000"
    shared = {(out / "runs" / name / "shared_data.txt").read_text() for name in RUNS}
    assert shared == {f"splits of {scenes} for {out / 'teacher'}"}
    assert (out / "teacher" / "shared_data.txt").read_text() == f"teacher splits of {scenes}"
    assert "teacher: data-parallel over 2 processes" in result.stderr  # batch 32 over 2 of 3
    assert (out / "teacher" / "results.json").is_file()
    records = {r.name: r for r in read_records(out / "results.json")}
    assert list(records) == ["teacher", *RUNS] and records["qad-w4a8"].value == 91.5
    summary = json.loads((out / "demo_times.json").read_text())
    assert set(RUNS) <= set(summary["seconds"]) and summary["jobs"] == 3
    assert set(summary["seconds"]) == {"scenes", "teacher", "data", *RUNS} | {
        "bench", "export", "report", "total"
    }  # fmt: skip
    # every model's ONNX files were exported in a worker (the teacher's in a job of its own)
    benched = {c[1]: c[4] for c in fake_engine.calls if c[0] == "bench"}
    assert benched == {name: ["ort-fp32", "ort-int8"] for name in ["teacher", *RUNS]}

    # exports that fail in a worker are said and left to the benchmark step; the runs go on
    fake_engine.calls.clear()
    fake_engine.export_fail = "kd-small"
    result = runner.invoke(app, ["demo", "--quick", "--jobs", "2", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "ONNX exports of kd-small for bench failed in the worker" in result.stderr
    benched = {c[1]: c[4] for c in fake_engine.calls if c[0] == "bench"}
    assert benched["kd-small"] is None and benched["qad-w4a8"] == ["ort-fp32", "ort-int8"]
    fake_engine.export_fail = None

    # a failing run is reported as the error it is, after the others stopped
    fake_engine.fail = "qat-w2a16-g64"
    result = runner.invoke(
        app, ["demo", "--quick", "--jobs", "2", "--out", str(tmp_path / "again")]
    )
    assert result.exit_code == 1
    assert "qat-w2a16-g64 failed on purpose" in result.stderr
