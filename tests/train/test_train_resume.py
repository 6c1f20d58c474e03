"""Killed runs resume exactly: a run stopped at step k (by an exception, by SIGTERM, or by
``kill -9`` after a time-based checkpoint or in the middle of writing one) and resumed ends with
parameters bit-identical to an uninterrupted run with the same seed, and the same metrics file;
a NaN/Inf loss stops the run naming the step and term, leaving the last good checkpoint intact.

Run as a script, this file is the process the ``kill -9`` tests kill:
    test_train_resume.py timed|torn RUN_DIR PROGRESS_FILE
"""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distiq.train import (
    NonFiniteLossError,
    RunInterrupted,
    TrainConfig,
    load_checkpoint,
    read_metrics,
    train,
)

STEPS = 12


def cpu_config(**values) -> TrainConfig:
    """Every test pins the CPU, so that a CUDA machine runs them the same way."""
    return TrainConfig(**{"device": "cpu", **values})


class Killed(Exception):
    pass


class Scale:
    """A stateful extra (like a learned loss weighting): its state must survive resumption."""

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _config(**overrides):
    values = dict(
        steps=STEPS,
        lr=3e-2,
        warmup_steps=3,
        batch_size=8,
        grad_accum=2,
        log_every=2,
        eval_every=3,
        checkpoint_every=4,
        best_metric="accuracy",
        seed=7,
    )
    values.update(overrides)
    return cpu_config(**values)


def _run(toys, run_dir, *, kill_at=None, resume=False, sigterm_at=None, config=None):
    """Train a fresh dropout model on 40 samples (5 micro-batches per epoch: epochs wrap inside
    optimizer steps), with a noisy step using torch, python and numpy RNGs."""
    data, val = toys.ToyData(40), toys.ToyData(24, seed=1)
    model = toys.make_model(seed=11, dropout=0.3)
    scale = Scale()

    def step_fn(model, batch, step):
        if kill_at is not None and step == kill_at:
            raise Killed(step)
        scale.calls += 1
        return toys.noisy_step(model, batch, step)

    def on_step(info):
        if sigterm_at is not None and info.step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(
        model,
        step_fn,
        data,
        config=config or _config(),
        run_dir=run_dir,
        eval_fn=toys.make_eval(val),
        stateful={"scale": scale},
        resume=resume,
        on_step=on_step,
    )
    return model, result, scale


def _strip_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def reference(toys, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    model, result, scale = _run(toys, run_dir)
    return toys.params_of(model), read_metrics(run_dir / "metrics.jsonl"), result, scale.calls


def test_resume_after_a_crash_is_bit_identical(toys, tmp_path, reference):
    ref_params, ref_lines, ref_result, ref_calls = reference
    with pytest.raises(Killed):
        _run(toys, tmp_path, kill_at=6)  # the last checkpoint is at step 4; steps 5-6 are lost
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    model, result, scale = _run(toys, tmp_path, resume=True)
    for key, value in ref_params.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert _strip_seconds(read_metrics(tmp_path / "metrics.jsonl")) == _strip_seconds(ref_lines)
    assert (result.best_step, result.best_value) == (ref_result.best_step, ref_result.best_value)
    assert scale.calls == ref_calls  # the stateful extra continued from its checkpointed state


def test_sigterm_writes_a_checkpoint_and_resume_is_bit_identical(toys, tmp_path, reference):
    ref_params, ref_lines, _, _ = reference
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="SIGTERM after step 5") as info:
        _run(toys, tmp_path, sigterm_at=5)
    assert str(info.value).endswith("continue with --resume (resume=True in Python)")
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert info.value.step == 5
    assert load_checkpoint(info.value.checkpoint)["step"] == 5
    model, _, _ = _run(toys, tmp_path, resume=True)
    for key, value in ref_params.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert _strip_seconds(read_metrics(tmp_path / "metrics.jsonl")) == _strip_seconds(ref_lines)


def test_resume_of_a_finished_run_changes_nothing(toys, tmp_path, reference):
    ref_params = reference[0]
    _run(toys, tmp_path)
    model, result, _ = _run(toys, tmp_path, resume=True)
    assert result.step == STEPS
    for key, value in ref_params.items():
        assert torch.equal(model.state_dict()[key], value)


def test_resume_refuses_a_changed_config_and_allows_more_steps(toys, tmp_path, reference):
    with pytest.raises(Killed):
        _run(toys, tmp_path, kill_at=5)
    with pytest.raises(ValueError, match=r"lr: 0\.03 -> 0\.1"):
        _run(toys, tmp_path, resume=True, config=_config(lr=0.1))
    _, result, _ = _run(toys, tmp_path, resume=True, config=_config(steps=STEPS + 4))
    assert result.step == STEPS + 4
    lines = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [line["step"] for line in lines] == list(range(2, STEPS + 5, 2))


def _nan_after(toys, bad_step, term):
    def step_fn(model, batch, step):
        out = toys.plain_step(model, batch, step)
        if step == bad_step:
            out.terms[term] = out.terms[term] * float("nan")
            out.total = sum(out.terms.values())
        return out

    return step_fn


def test_nan_term_stops_the_run_and_keeps_the_last_good_checkpoint(toys, tmp_path):
    config = cpu_config(
        steps=10, batch_size=8, checkpoint_every=2, seed=1, grad_accum=2, schedule="constant"
    )
    model = toys.make_model()
    with pytest.raises(NonFiniteLossError) as info:
        train(model, _nan_after(toys, 4, "l2"), toys.ToyData(32), config=config, run_dir=tmp_path)
    message = str(info.value)
    assert "step 5" in message and "'l2'" in message and "'task'" not in message
    assert "micro-batch 1 of 2" in message and "last good checkpoint" in message
    assert info.value.step == 5 and info.value.terms == ["l2"]
    # The checkpoint is step 4's and equals an uninterrupted 4-step run's weights; the model in
    # memory was not updated by the bad step either.
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    clean = toys.make_model()
    train(
        clean,
        toys.plain_step,
        toys.ToyData(32),
        config=dataclasses.replace(config, steps=4),
        run_dir=tmp_path / "clean",
    )
    for key, value in clean.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    for value in model.state_dict().values():
        assert torch.isfinite(value).all()
    # and the run resumes from it
    resumed = toys.make_model()
    result = train(
        resumed, toys.plain_step, toys.ToyData(32), config=config, run_dir=tmp_path, resume=True
    )
    assert result.step == 10


def test_inf_total_and_inf_gradient_are_reported(toys, tmp_path):
    config = cpu_config(steps=3, batch_size=8)

    def inf_total(model, batch, step):
        out = toys.plain_step(model, batch, step)
        return out.total * float("inf"), out.terms

    with pytest.raises(NonFiniteLossError, match=r"step 1 .*the total blew up \[total=inf\]"):
        train(toys.make_model(), inf_total, toys.ToyData(16), config=config, run_dir=tmp_path / "a")

    class Explode(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    def inf_grad(model, batch, step):
        out = toys.plain_step(model, batch, step)
        if step == 1:
            out.total = Explode.apply(out.total)
        return out

    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(nan|inf\) at step 2"):
        train(toys.make_model(), inf_grad, toys.ToyData(16), config=config, run_dir=tmp_path / "b")


HERE = Path(__file__).parent
KILLED_STEPS = 40


def _killable_config(**values) -> TrainConfig:
    """Shared by the killed process and the test (only checkpoint_minutes may differ)."""
    defaults = dict(steps=KILLED_STEPS, lr=3e-2, batch_size=8, log_every=1, seed=9)
    return cpu_config(**{**defaults, **values})


def _killed_process(mode: str, run_dir: Path, progress: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.Popen(
        [sys.executable, __file__, mode, str(run_dir), str(progress)],
        env={**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish_and_compare(toys, run_dir: Path, config: TrainConfig) -> None:
    """Resume ``run_dir`` here and compare with an uninterrupted run without timed checkpoints."""
    resumed = toys.make_model(seed=1, dropout=0.3)
    result = train(
        resumed, toys.noisy_step, toys.ToyData(40), config=config, run_dir=run_dir, resume=True
    )
    assert result.step == KILLED_STEPS
    reference = toys.make_model(seed=1, dropout=0.3)
    train(
        reference,
        toys.noisy_step,
        toys.ToyData(40),
        config=_killable_config(checkpoint_minutes=None),
        run_dir=run_dir.parent / "reference",
    )
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    lines = read_metrics(run_dir / "metrics.jsonl", "train")
    assert [line["step"] for line in lines] == list(range(1, KILLED_STEPS + 1))


@pytest.mark.slow
def test_kill_9_loses_only_the_steps_since_the_last_timed_checkpoint(toys, tmp_path):
    """Default-style settings (no step-based checkpoints, a time interval) and ``kill -9`` half
    way: the run resumes from its last timed checkpoint and ends bit-identical."""
    run, progress = tmp_path / "run", tmp_path / "progress"
    process = _killed_process("timed", run, progress)
    try:
        deadline = time.monotonic() + 90
        while not (progress.exists() and progress.read_text().strip() == "15"):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 0 < saved <= 15  # written on time: checkpoint_every is None
    _finish_and_compare(toys, run, _killable_config(checkpoint_minutes=0.004))


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_leaves_a_temporary_that_resume_removes(toys, tmp_path):
    run, progress = tmp_path / "run", tmp_path / "progress"
    process = _killed_process("torn", run, progress)
    try:
        process.wait(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, process.stdout.read()
    folder = run / "checkpoints"
    leftovers = sorted(p.name for p in folder.iterdir())
    assert len(leftovers) == 2 and leftovers[1] == "last.pt"
    assert leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp")
    assert load_checkpoint(folder / "last.pt")["step"] == 3  # the step-6 write was killed
    _finish_and_compare(toys, run, _killable_config(checkpoint_every=3, checkpoint_minutes=None))
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


def _killed_main(mode: str, run_dir: str, progress: str) -> None:
    """The process the kill -9 tests kill (``timed``: by the test; ``torn``: itself, in the
    middle of writing its second checkpoint)."""
    sys.path.insert(0, str(HERE))
    import train_toys as toys

    if mode == "timed":
        config = _killable_config(checkpoint_minutes=0.004)  # every ~0.24 s: ~5 steps here
    else:
        config = _killable_config(checkpoint_every=3, checkpoint_minutes=None)
        real_save, calls = torch.save, []

        def dying_save(obj, fh):
            calls.append(1)
            if len(calls) == 2:
                fh.write(b"PK\x03\x04 the first bytes of a checkpoint")
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, fh)

        torch.save = dying_save

    def slow_step(model, batch, step):
        time.sleep(0.05)
        return toys.noisy_step(model, batch, step)

    train(
        toys.make_model(seed=1, dropout=0.3),
        slow_step,
        toys.ToyData(40),
        config=config,
        run_dir=run_dir,
        on_step=lambda info: Path(progress).write_text(str(info.step)),
    )


@pytest.mark.gpu
def test_resume_on_cuda_with_bf16_autocast_is_bit_identical(toys, tmp_path):
    config = _config(device="cuda", precision="bf16")
    reference, _, _ = _run(toys, tmp_path / "ref", config=config)
    with pytest.raises(Killed):
        _run(toys, tmp_path / "run", kill_at=6, config=config)
    model, _, _ = _run(toys, tmp_path / "run", resume=True, config=config)
    assert next(model.parameters()).is_cuda
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


if __name__ == "__main__":
    _killed_main(*sys.argv[1:])
