"""Progress a person can follow when the output is not a terminal (``distiq compress > log``):
plain lines at a steady interval of wall time (a fake clock here), stage lines with times, the
demo teacher's vision-only warm-up named on its validation lines; rich bars on a terminal."""

import re
import threading
from types import SimpleNamespace

import pytest

import distiq.demo.recipe
import distiq.demo.teacher
import distiq.train
from distiq import progress
from distiq.cli import app

WARMUP = "(vision-only warm-up: the language model has not trained yet)"


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def advance(self, seconds):
        with self.lock:
            self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    # distiq turns the Hugging Face bars off outside a terminal: restored after the test
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(progress, "clock", fake)
    monkeypatch.setattr(progress, "TICK_SECONDS", None)  # no heartbeat thread
    monkeypatch.setattr(progress, "INTERVAL_SECONDS", 15.0)
    return fake


def _info(step, steps, loss, terms=None):
    return SimpleNamespace(step=step, steps=steps, total=loss, terms=terms or {"task": loss})


@pytest.fixture
def fake_compress(monkeypatch, tmp_path, clock):
    """``distiq compress`` on a fake engine: 20 steps of 4 s, a validation at step 10."""

    def load_recipe(path, **changes):
        return SimpleNamespace(method="qad", run_name="qad-w4a8", output=tmp_path / "run")

    def compress(recipe, *, overwrite=False, resume=False, on_step=None, on_eval=None):
        for step in range(1, 21):
            clock.advance(4.0)
            if step == 10:
                on_eval(step, {"vqa_accuracy": 50.0, "vqa_accuracy/question_type/count": 1.0})
            on_step(_info(step, 20, 2.0 / step))
        return recipe.output

    monkeypatch.setattr(distiq.train, "load_recipe", load_recipe, raising=False)
    monkeypatch.setattr(distiq.train, "check_recipe", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(distiq.train, "compress", compress, raising=False)


def test_compress_prints_plain_lines_at_a_steady_interval(runner, tmp_path, fake_compress):
    recipe = tmp_path / "qad.yaml"
    recipe.write_text("method: qad\n")
    result = runner.invoke(app, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    steps = [line for line in lines if line.startswith("qad qad-w4a8: step ")]
    # the first step at once, then one line per 15 s of wall time (a step every 4 s), the last
    printed = [int(re.match(r"qad qad-w4a8: step (\d+)/20", line)[1]) for line in steps]
    assert printed == [1, 5, 9, 13, 17, 20]
    assert steps[1] == "qad qad-w4a8: step 5/20 (25 %), loss 0.4, elapsed 20 s, ETA 1m00s"
    assert steps[0].endswith("elapsed 4.0 s, ETA unknown yet")
    assert steps[-1] == "qad qad-w4a8: step 20/20 (100 %), loss 0.1, elapsed 1m20s, ETA 0.0 s"
    assert "qad qad-w4a8 step 10: validation vqa_accuracy 50" in lines  # per-type keys left out
    assert lines[0] == "stage qad qad-w4a8: started"
    assert "stage qad qad-w4a8: done in 1m20s" in lines
    assert "━" not in result.stderr  # no bar drawn into a log


def test_compress_keeps_the_bars_on_a_terminal(runner, tmp_path, fake_compress, monkeypatch):
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    recipe = tmp_path / "qad.yaml"
    recipe.write_text("method: qad\n")
    result = runner.invoke(app, ["compress", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "━" in result.stderr and "20/20" in result.stderr and "loss 0.1" in result.stderr
    assert "qad qad-w4a8: step 5/20" not in result.stderr  # no plain step lines
    assert "qad qad-w4a8 step 10: validation vqa_accuracy 50" in result.stderr
    assert "stage qad qad-w4a8: done in 1m20s" in result.stderr


def test_teacher_names_its_vision_only_warm_up(runner, tmp_path, monkeypatch, clock):
    """The demo teacher's first 2 steps train the vision side alone (no ``vqa`` term): the
    validation after step 2 says so, the one after step 3 (the language model trained once)
    does not. The loop validates after a step and reports the step just after."""
    vision_steps = 2

    def load_teacher_recipe(path, **changes):
        return SimpleNamespace(method="teacher", run_name="teacher", output=tmp_path / "t")

    def train_teacher(recipe, *, overwrite=False, resume=False, on_step=None, on_eval=None):
        for step in range(1, 5):
            clock.advance(20.0)
            on_eval(step, {"vqa_accuracy": 0.0 if step <= vision_steps else 40.0})
            language = step - 1 >= vision_steps  # step_fn's step index is step - 1
            terms = {"segmentation": 1.0, **({"vqa": 2.0} if language else {})}
            on_step(_info(step, 4, 3.0, terms))
        return recipe.output

    monkeypatch.setattr(distiq.demo.recipe, "load_teacher_recipe", load_teacher_recipe)
    monkeypatch.setattr(distiq.demo.teacher, "train_teacher", train_teacher)
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text("method: teacher\n")
    result = runner.invoke(app, ["teacher", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert f"teacher teacher step 1: validation vqa_accuracy 0 {WARMUP}" in lines
    assert f"teacher teacher step 2: validation vqa_accuracy 0 {WARMUP}" in lines
    assert "teacher teacher step 3: validation vqa_accuracy 40" in lines
    assert f"teacher teacher: step 2/4 (50 %), loss 3, elapsed 40 s, ETA 40 s {WARMUP}" in lines
    assert "teacher teacher: step 3/4 (75 %), loss 3, elapsed 1m00s, ETA 20 s" in lines
    # each validation line comes before its step's line
    assert lines.index(f"teacher teacher step 2: validation vqa_accuracy 0 {WARMUP}") < (
        lines.index(f"teacher teacher: step 2/4 (50 %), loss 3, elapsed 40 s, ETA 40 s {WARMUP}")
    )


def test_a_silent_run_is_reported_at_the_interval(clock, capsys):
    display = progress.LineDisplay(interval=15.0)
    display.add_task("teacher", total=100)
    with display:
        display.start("teacher")
        clock.advance(14.0)
        display.tick()
        assert capsys.readouterr().err == ""
        clock.advance(1.0)
        display.tick()
        assert capsys.readouterr().err == "teacher: still running, elapsed 15 s\n"
        display.update("teacher", 3, 100, 1.5)
        clock.advance(20.0)
        display.tick()
        display.tick()  # once per interval
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == "teacher: step 3/100, no new step for 20 s, elapsed 35 s"
        assert len(err) == 2  # the first step's line, then the silence


def test_the_heartbeat_thread_of_a_run_in_this_process(clock, monkeypatch, capsys):
    monkeypatch.setattr(progress, "TICK_SECONDS", 0.01)
    with progress.step_progress("kd") as run:
        clock.advance(16.0)
        for _ in range(500):  # the thread ticks every 10 ms
            if "kd: still running, elapsed" in capsys.readouterr().err:
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("no heartbeat line")
        run.on_step(_info(1, 2, 1.0))
    assert "kd: step 1/2 (50 %)" in capsys.readouterr().err


def test_stage_lines_and_durations(clock, capsys):
    with progress.stage("bench") as timed:
        clock.advance(3.25)
        with progress.stage("bench teacher", part=True):
            clock.advance(72.0)
    with pytest.raises(ValueError), progress.stage("report"):
        clock.advance(0.5)
        raise ValueError("no records")
    assert timed.seconds == 75.25
    assert capsys.readouterr().err.splitlines() == [
        "stage bench: started",
        "  bench teacher: done in 1m12s",
        "stage bench: done in 1m15s",
        "stage report: started",
        "stage report: failed after 0.5 s",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (9.94, "9.9 s"), (42.4, "42 s"), (185, "3m05s"), (3725, "1h02m")],
)
def test_format_seconds(seconds, text):
    assert progress.format_seconds(seconds) == text


def test_hugging_face_bars_stay_out_of_a_log(monkeypatch):
    import os
    import warnings

    from transformers.utils import logging as transformers_logging

    def enable_bars():  # huggingface_hub warns when its import saw the variable set
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            transformers_logging.enable_progress_bar()

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    enable_bars()
    try:
        progress.quiet_library_bars()  # stderr is pytest's capture: not a terminal
        assert not transformers_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for what imports them later
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice stays
        enable_bars()
        progress.quiet_library_bars()
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        enable_bars()
