"""Worker for test_train_distributed.py, started once per process with RANK/WORLD_SIZE/... set
(as ``torchrun`` or ``accelerate launch --num_processes N --cpu`` set them).

Usage: dist_worker_train.py OUT_DIR [DEVICE [STEP]]
DEVICE is cpu (default) or cuda; STEP is plain (default) or ce (cross-entropy only: no use of
the parameters outside forward, as FSDP requires).

Runs, through accelerate, (a) an uninterrupted training run and (b) the same run killed at step 3
on every process and resumed; rank 0 saves both runs' final checkpointed weights, the eval
metrics and the sample ids each process saw to OUT_DIR/result.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import train_toys as toys

from distiq.train import TrainConfig, load_checkpoint, train
from distiq.train.distributed import gather_objects, get_rank, get_world_size


class Killed(Exception):
    pass


def config(device: str = "cpu", distributed: str = "auto") -> TrainConfig:
    """Shared with the single-process reference in the test (batch_size is global)."""
    return TrainConfig(
        steps=6,
        lr=3e-2,
        warmup_steps=2,
        batch_size=8,
        grad_accum=2,
        eval_every=3,
        checkpoint_every=2,
        best_metric="accuracy",
        log_every=1,
        seed=5,
        device=device,
        distributed=distributed,
    )


def data() -> tuple[toys.ToyData, toys.ToyData]:
    return toys.ToyData(40), toys.ToyData(24, seed=1)


def ce_step(model, batch, step):
    loss = F.cross_entropy(model(batch["x"]), batch["y"])
    return toys.LossOutput(loss, {"task": loss})


STEPS = {"plain": toys.plain_step, "ce": ce_step}


def killed_at_3(step_fn):
    def killed(model, batch, step):
        if step == 3:
            raise Killed
        return step_fn(model, batch, step)

    return killed


def recording(step_fn, seen: list[list[int]]):
    """``step_fn`` that records the sample ids of every micro-batch it is given."""

    def recorded(model, batch, step):
        seen.append(batch["ids"].tolist())
        return step_fn(model, batch, step)

    return recorded


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def main(out: Path, device: str = "cpu", step: str = "plain") -> None:
    from accelerate.state import PartialState

    train_set, val_set = data()
    step_fn = STEPS[step]
    cfg = config(device, distributed="accelerate")
    seen: list[list[int]] = []
    result = train(
        toys.make_model(seed=3),
        recording(step_fn, seen),
        train_set,
        config=cfg,
        run_dir=out / "a",
        eval_fn=toys.make_eval(val_set),
    )
    try:
        train(
            toys.make_model(seed=3),
            killed_at_3(step_fn),
            train_set,
            config=cfg,
            run_dir=out / "b",
            eval_fn=toys.make_eval(val_set),
        )
    except Killed:
        pass
    else:
        raise AssertionError("the run was not killed")
    seen_by_rank = gather_objects(seen)
    train(
        toys.make_model(seed=99),  # other initial weights: everything comes from the checkpoint
        step_fn,
        train_set,
        config=cfg,
        run_dir=out / "b",
        eval_fn=toys.make_eval(val_set),
        resume=True,
    )
    if get_rank() == 0:
        torch.save(
            {
                "world_size": get_world_size(),
                "distributed_type": str(PartialState().distributed_type),
                "a": final_weights(out / "a"),
                "b": final_weights(out / "b"),
                "eval": result.eval_metrics,
                "seen": seen_by_rank,
            },
            out / "result.pt",
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
