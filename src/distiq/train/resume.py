"""Saving and restoring the loop's whole training state (``checkpoints/last.pt``) and the best
weights (``checkpoints/best.pt``), in single-process and distributed runs alike.

Saving is collective: every process takes part (FSDP gathers full state dicts, RNG states are
gathered from every process) and the main process writes, atomically. Restoring checks that the
config still describes the same run (:data:`distiq.train.config.RESUMABLE_CHANGES` lists what may
change), then puts back model, optimizer, LR schedule, data position, extra stateful objects,
and each process's RNG states.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distiq.config import to_dict
from distiq.train.checkpoint import (
    BEST_FORMAT,
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    seed_everything,
)
from distiq.train.config import RESUMABLE_CHANGES, TrainConfig
from distiq.train.distributed import DistContext, barrier, gather_objects
from distiq.train.schedule import LRSchedule
from distiq.train.state import LoopState

logger = logging.getLogger(__name__)


def save_training_state(
    path: Path,
    config: TrainConfig,
    ctx: DistContext,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    batches: Any,
    stateful: Mapping[str, Any],
    state: LoopState,
) -> None:
    """Collective: every process takes part (RNG states are gathered); the main one writes."""
    model_state = ctx.model_state_dict(model)
    optimizer_state = ctx.optimizer_state_dict(model, optimizer)
    rng = gather_objects(capture_rng_state())
    if ctx.is_main:
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": state.step,
                "config": to_dict(config),
                "world_size": ctx.world_size,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "data": batches.state_dict(),
                "rng": rng,
                "loop": state.to_dict(),
                "stateful": {name: obj.state_dict() for name, obj in stateful.items()},
            },
            path,
        )
        logger.info("checkpoint at step %d: %s", state.step, path)
    barrier()


def save_best_weights(
    path: Path, config: TrainConfig, ctx: DistContext, model: Any, step: int, metrics: dict
) -> None:
    model_state = ctx.model_state_dict(model)
    if ctx.is_main:
        atomic_torch_save(
            {
                "format": BEST_FORMAT,
                "step": step,
                "metric": config.best_metric,
                "mode": config.best_mode,
                "metrics": metrics,
                "model": model_state,
            },
            path,
        )
    barrier()


def restore_training_state(
    path: Path,
    config: TrainConfig,
    ctx: DistContext,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    batches: Any,
    stateful: Mapping[str, Any],
) -> LoopState:
    ckpt = load_checkpoint(path)
    old, new = ckpt["config"], to_dict(config)
    changed = sorted(k for k in new if old.get(k) != new[k])
    fixed = [k for k in changed if k not in RESUMABLE_CHANGES]
    if fixed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fixed)
        raise ValueError(
            f"cannot resume {path}: the config changed in ways that alter the steps already "
            f"taken ({diffs}); resume with the original values or start a new run"
        )
    if changed:
        logger.warning("resuming with changed settings: %s", ", ".join(changed))
    missing = sorted(set(stateful) - set(ckpt["stateful"]))
    if missing:
        raise KeyError(f"the checkpoint has no state for stateful object(s) {missing}")
    ctx.load_model_state_dict(model, ckpt["model"])
    ctx.load_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if old.get("steps") != config.steps:  # follow the new length from the restored step on
        schedule = LRSchedule(
            config.schedule, config.steps, config.warmup_steps, config.min_lr_ratio
        )
        scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    batches.load_state_dict(ckpt["data"])
    for name, obj in stateful.items():
        obj.load_state_dict(ckpt["stateful"][name])
    rng = ckpt["rng"]
    if len(rng) == ctx.world_size:
        restore_rng_state(rng[ctx.rank])
    else:
        logger.warning(
            "the checkpoint was written by %d processes, this run has %d: RNG states are re-seeded "
            "(the run continues, but not bit-identically)",
            len(rng),
            ctx.world_size,
        )
        seed_everything(config.seed + ctx.rank + ckpt["step"])
    logger.info("resumed %s at step %d of %d", path, ckpt["step"], config.steps)
    return LoopState.from_dict(ckpt["loop"])
