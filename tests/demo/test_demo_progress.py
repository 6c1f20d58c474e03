"""``distiq demo > log 2>&1``: a line when each stage starts and ends (with its time), the runs'
progress as plain lines from the forked workers too, the teacher's warm-up named on its
validation lines; and the demo on an install without accelerate or the onnx extra (the engine
replaced by the fakes of test_demo_run.py)."""

import importlib.util
import multiprocessing
import queue
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from distiq import progress
from distiq.cli import app
from distiq.demo.jobs import Job, _draw_events, run_distributed
from distiq.demo.plan import RUNS, TEACHER
from distiq.demo.run import WARMUP_PHASE, teacher_phase


def _load_demo_tests():
    name = "distiq_demo_run_tests"
    if name not in sys.modules:
        path = Path(__file__).with_name("test_demo_run.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fake_engine = _load_demo_tests().fake_engine  # the fixture
needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork"
)
TRAINED = ("qat-w4a8", "qad-w4a8", "qat-w2a16-g64", "qad-w2a16-g64", "kd-small")


@pytest.fixture(autouse=True)
def _no_heartbeat(monkeypatch):
    monkeypatch.setattr(progress, "TICK_SECONDS", None)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)


def _stage_times(lines: list[str]) -> dict[str, str]:
    """``{stage: "done in ..."}`` of the stages that started and ended, in that order."""
    started = [
        line[len("stage ") : -len(": started")] for line in lines if line.endswith(": started")
    ]
    done = {}
    for line in lines:
        found = re.fullmatch(r"stage (.+): done in ([\d.]+ s|\d+m\d\ds)", line)
        if found:
            assert lines.index(f"stage {found[1]}: started") < lines.index(line)
            done[found[1]] = found[2]
    assert set(started) == set(done), (started, done)
    return done


@pytest.mark.parametrize("jobs", [1, 2], ids=["one-process", "workers"])
def test_demo_log_has_stage_lines_and_progress(runner, tmp_path, fake_engine, jobs):
    if jobs > 1 and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "-j", str(jobs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    stages = _stage_times(lines)
    assert {"scenes", "loading the data", TEACHER, *RUNS, "bench", "export", "report"} == set(
        stages
    )
    assert lines[0] == "stage scenes: started"
    # each trained run's (fake) step as a plain line, from a worker process too
    for name in (TEACHER, *TRAINED):
        assert any(line.startswith(f"{name}: step 1/1 (100 %), loss 1, elapsed ") for line in lines)
    for name in (TEACHER, *RUNS):  # every model measured: one line each
        assert any(re.fullmatch(rf"  bench {name}: done in [\d.]+ s", line) for line in lines)
    assert "━" not in result.stderr
    if jobs > 1:
        assert f"{len(RUNS)} runs in 2 worker processes" in lines
        for name in RUNS:
            assert any(
                line.startswith(f"  {name} ONNX exports for bench: done in") for line in lines
            )
        assert any(line.startswith("  teacher ONNX exports for bench: done in") for line in lines)


@needs_fork
def test_demo_trains_the_teacher_in_one_process_without_accelerate(
    runner, tmp_path, fake_engine, monkeypatch
):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec says: not installed
    result = runner.invoke(app, ["demo", "--quick", "-j", "2", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert (
        "teacher: training in one process, not 2 data-parallel ones: Hugging Face accelerate is "
        "not installed (pip install accelerate)"
    ) in result.stderr.splitlines()
    assert "data-parallel over" not in result.stderr
    compressed = [c[1] for c in fake_engine.calls if c[0] == "compress"]
    assert compressed == [TEACHER]  # in this process; the runs still go to the workers
    assert (tmp_path / "demo" / "report.md").is_file()


def test_demo_without_the_onnx_extra(runner, tmp_path, fake_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = runner.invoke(app, ["demo", "--quick", "-j", "1", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert (
        "onnxruntime not installed: latency is timed in PyTorch only and the best model is "
        "exported packed only (pip install 'distiq[onnx]' adds the onnxruntime timings and the "
        "ONNX export)"
    ) in lines
    assert "export onnx of qad-w4a8 skipped: needs onnxruntime" in lines
    assert [c for c in fake_engine.calls if c[0] == "export"] == [("export", "qad-w4a8", "packed")]


def test_teacher_phase_reads_the_step_s_loss_terms():
    assert teacher_phase(SimpleNamespace(terms={"segmentation": 1.0, "centres": 0.5})) == (
        WARMUP_PHASE
    )
    assert teacher_phase(SimpleNamespace(terms={"vqa": 0.0, "segmentation": 1.0})) is None
    assert teacher_phase(SimpleNamespace(step=1)) is None  # no terms: nothing to say


def _teacher_like_job(recipe, *, overwrite, resume, on_step, on_eval, data=None):
    """Rank 0 of a data-parallel run reports as the loop does: validation, then the step."""
    if on_step is None:
        return
    for step in range(1, 5):
        on_eval(step, {"vqa_accuracy": 0.0 if step <= 2 else 40.0})
        terms = {"segmentation": 1.0, **({"vqa": 1.0} if step > 2 else {})}
        on_step(SimpleNamespace(step=step, steps=4, total=1.0, terms=terms))


@needs_fork
def test_the_warm_up_note_travels_from_a_forked_rank(capsys):
    seconds = run_distributed(
        Job("teacher", _teacher_like_job, None, "run", phase=teacher_phase), world_size=2
    )
    assert seconds > 0
    lines = capsys.readouterr().err.splitlines()
    assert f"teacher step 2: validation vqa_accuracy 0 ({WARMUP_PHASE})" in lines
    assert "teacher step 3: validation vqa_accuracy 40" in lines
    assert any(line.startswith("teacher: step 4/4 (100 %)") for line in lines)


def test_worker_events_print_at_a_steady_interval(monkeypatch, capsys):
    """The parent turns the workers' queued reports into lines by its own clock."""
    now = [0.0]
    monkeypatch.setattr(progress, "clock", lambda: now[0])
    display = progress.LineDisplay(interval=15.0)
    display.add_task("qad-w4a8")
    events = queue.Queue()
    with display:
        events.put(("stage", "qad-w4a8", None))
        _draw_events(events, display)
        for step in range(1, 11):
            now[0] += 5.0
            events.put(("step", "qad-w4a8", step, 10, 0.5, None))
            if step == 4:
                events.put(("eval", "qad-w4a8", 4, {"vqa_accuracy": 61.0}))
            _draw_events(events, display)
        events.put(("stage", "qad-w4a8", 50.0))
        events.put(("part", "qad-w4a8 ONNX exports for bench", 3.0))
        assert _draw_events(events, display) == []
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "stage qad-w4a8: started",
        "qad-w4a8: step 1/10 (10 %), loss 0.5, elapsed 5.0 s, ETA unknown yet",
        "qad-w4a8: step 4/10 (40 %), loss 0.5, elapsed 20 s, ETA 30 s",
        "qad-w4a8 step 4: validation vqa_accuracy 61",
        "qad-w4a8: step 7/10 (70 %), loss 0.5, elapsed 35 s, ETA 15 s",
        "qad-w4a8: step 10/10 (100 %), loss 0.5, elapsed 50 s, ETA 0.0 s",
        "stage qad-w4a8: done in 50 s",
        "  qad-w4a8 ONNX exports for bench: done in 3.0 s",
    ]
