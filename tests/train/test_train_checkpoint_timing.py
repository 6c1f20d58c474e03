"""Time-based checkpoints (TrainConfig.checkpoint_minutes): on by default, due when the minutes
have passed on a monotonic clock (whichever of steps and minutes comes first), taken on the same
step by every process of a data-parallel run (the main process's clock decides), and changing
no number of the run.

Run as a script (with launcher variables set), this file is one rank of the data-parallel test:
    test_train_checkpoint_timing.py OUT_DIR
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distiq.config import ConfigError, from_dict
from distiq.train import TrainConfig, load_checkpoint, read_metrics, train
from distiq.train import checkpoint as checkpoint_module
from distiq.train import loop as loop_module
from distiq.train.checkpoint import CheckpointTimer

HERE = Path(__file__).parent


class MinutePerCall:
    """A monotonic clock that advances one minute every time it is read."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return 60.0 * self.calls


def _record_saves(monkeypatch) -> list[int]:
    """The steps at which the loop writes last.pt (the real writer still runs)."""
    steps: list[int] = []
    real = loop_module.save_training_state

    def recording(path, config, ctx, model, optimizer, scheduler, batches, stateful, state):
        steps.append(state.step)
        real(path, config, ctx, model, optimizer, scheduler, batches, stateful, state)

    monkeypatch.setattr(loop_module, "save_training_state", recording)
    return steps


def test_checkpoints_are_on_by_default_and_validated():
    assert TrainConfig(steps=1).checkpoint_minutes == 10.0
    assert from_dict(TrainConfig, {"steps": 1}).checkpoint_minutes == 10.0
    assert from_dict(TrainConfig, {"steps": 1, "checkpoint_minutes": 2}).checkpoint_minutes == 2.0
    assert TrainConfig(steps=1, checkpoint_minutes=None).check().checkpoint_minutes is None
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="checkpoint_minutes must be a number of minutes"):
            TrainConfig(steps=1, checkpoint_minutes=bad).check()


def test_timer_reads_a_monotonic_clock(monkeypatch):
    clock = MinutePerCall()
    monkeypatch.setattr(checkpoint_module, "monotonic", clock)
    timer = CheckpointTimer(2.5)  # reset: minute 1
    assert [timer.due() for _ in range(4)] == [False, False, True, True]  # minutes 2-5
    timer.reset()  # minute 6
    assert [timer.due() for _ in range(3)] == [False, False, True]
    never = CheckpointTimer(None)
    assert not any(never.due() for _ in range(5))


def _config(**values) -> TrainConfig:
    defaults = dict(steps=8, lr=3e-2, batch_size=8, grad_accum=2, log_every=1, seed=4)
    return TrainConfig(**{"device": "cpu", **defaults, **values})


def test_timed_checkpoints_change_no_number(toys, tmp_path, monkeypatch):
    """One minute passes per step boundary; 2.5 minutes between checkpoints: saved after steps 2
    and 5, and at the end. Weights and metrics equal a run without timed checkpoints."""
    reference = toys.make_model(dropout=0.2)
    train(
        reference,
        toys.noisy_step,
        toys.ToyData(40),
        config=_config(checkpoint_minutes=None),
        run_dir=tmp_path / "reference",
    )
    saved = _record_saves(monkeypatch)
    monkeypatch.setattr(checkpoint_module, "monotonic", MinutePerCall())
    model = toys.make_model(dropout=0.2)
    train(
        model,
        toys.noisy_step,
        toys.ToyData(40),
        config=_config(checkpoint_minutes=2.5),
        run_dir=tmp_path / "timed",
    )
    assert saved == [2, 5, 8]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    def strip(lines):
        return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]

    assert strip(read_metrics(tmp_path / "timed" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "reference" / "metrics.jsonl")
    )


def test_steps_and_minutes_whichever_comes_first(toys, tmp_path, monkeypatch):
    saved = _record_saves(monkeypatch)
    monkeypatch.setattr(checkpoint_module, "monotonic", MinutePerCall())
    train(
        toys.make_model(),
        toys.plain_step,
        toys.ToyData(40),
        config=_config(steps=10, checkpoint_every=5, checkpoint_minutes=2.5),
        run_dir=tmp_path,
    )
    # minutes: due at the boundary after step 2; step 5's checkpoint restarts the clock, so the
    # next is due after step 7; steps: 5 and 10 (the end, already saved)
    assert saved == [2, 5, 7, 10]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_ranks_checkpoint_on_the_same_steps(tmp_path):
    """Rank 0's clock races (a minute per read), rank 1's stands still: had each rank decided
    alone, rank 0 would enter the collective checkpoint alone and the run would hang."""
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(tmp_path)],
            env={
                **env,
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=100)[0] for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in ranks] == [0, 0], outputs
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["saved"] == [[2, 5, 8], [2, 5, 8]]
    for key, value in result["untimed"].items():
        assert torch.equal(result["timed"][key], value), key


def _rank_main(out: Path) -> None:
    sys.path.insert(0, str(HERE))
    import train_toys as toys

    from distiq.train.distributed import gather_objects, get_rank

    rank = int(os.environ["RANK"])
    clock = MinutePerCall() if rank == 0 else (lambda: 0.0)
    checkpoint_module.monotonic = clock
    saved: list[int] = []
    real = loop_module.save_training_state

    def recording(path, config, ctx, model, optimizer, scheduler, batches, stateful, state):
        saved.append(state.step)
        real(path, config, ctx, model, optimizer, scheduler, batches, stateful, state)

    loop_module.save_training_state = recording
    weights = {}
    for name, minutes in (("timed", 2.5), ("untimed", None)):
        model = toys.make_model(seed=2)
        config = _config(checkpoint_minutes=minutes, distributed="accelerate")
        train(model, toys.plain_step, toys.ToyData(40), config=config, run_dir=out / name)
        weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    every = gather_objects(saved[:3])  # the timed run's saves, on each rank
    if get_rank() == 0:
        torch.save({"saved": every, **weights}, out / "result.pt")


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
