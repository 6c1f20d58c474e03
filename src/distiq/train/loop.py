"""The training loop: one explicit function, used for the teacher and for every student.

Per optimizer step: ``grad_accum`` micro-batches, each ``step_fn(model, batch, step)`` under
autocast, every term checked to be finite, ``backward(total / grad_accum)`` (no all-reduce on
all but the last micro-batch); then the global gradient norm is measured (and clipped), checked
finite, AdamW steps, the LR schedule steps. Then, as due: a metrics line, an evaluation (with
best-checkpoint selection), a checkpoint, the ``on_step`` callback. Checkpoints fall due every
``checkpoint_every`` steps and every ``checkpoint_minutes`` of wall time, whichever comes first.
SIGTERM/SIGINT stop the run at the next step boundary with a checkpoint; ``--resume``
(``resume=True``) continues it exactly.

The run directory is locked for the whole run (:class:`distiq.train.lock.RunLock`): a second
process on it fails at once instead of mixing its files with this run's.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.config import dump_yaml
from distiq.train.batches import as_batch_source, move_to_device
from distiq.train.checkpoint import (
    BEST_FORMAT,
    CheckpointTimer,
    load_checkpoint,
    remove_stale_temporaries,
    seed_everything,
)
from distiq.train.config import TrainConfig
from distiq.train.distributed import (
    DistContext,
    autocast,
    barrier,
    broadcast_object,
    resolve_precision,
    setup_distributed,
)
from distiq.train.lock import locked_run_dir
from distiq.train.metrics import MetricsWriter, check_tensorboard
from distiq.train.optim import param_groups
from distiq.train.resume import restore_training_state, save_best_weights, save_training_state
from distiq.train.schedule import build_scheduler
from distiq.train.state import (
    LoopState,
    NonFiniteLossError,
    RunInterrupted,
    SignalGuard,
    StepInfo,
    TrainResult,
    checked_loss_values,
    float_metrics,
    last_good_checkpoint,
    unpack_step_output,
)
from distiq.util import option_hint, suggest

logger = logging.getLogger(__name__)

StepFn = Callable[[Any, Any, int], Any]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


def train(
    model: nn.Module,
    step_fn: StepFn,
    train_data: Any,
    *,
    config: TrainConfig,
    run_dir: str | Path,
    eval_fn: EvalFn | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    optimizer_params: Iterable[Any] | None = None,
    stateful: Mapping[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` optimizer steps.

    Args:
        model: the module to train (moved to the run's device). Parameters with
            ``requires_grad=False`` are frozen. Keep a frozen teacher *outside* it (close over it
            in ``step_fn``) so checkpoints hold only what is trained.
        step_fn: ``step_fn(model, batch, step) -> LossOutput`` with ``total`` a 0-dim tensor
            and ``terms`` a ``{name: 0-dim tensor}`` (a bare tensor or a ``(total, terms)``
            tuple also works). ``batch`` is already on the device; ``step`` is the number of
            optimizer steps already taken (0-based). Under DDP ``model`` is the wrapper: call
            ``model(...)`` for the forward pass, ``distiq.train.unwrap_model(model)`` for
            attributes. Mean-reduce the loss over the batch.
        train_data: a ``torch.utils.data.Dataset`` (batched with ``config.batch_size`` in a
            seeded, resumable order, split across processes), a ``ResumableBatches`` (or any
            object with ``state_dict``/``load_state_dict``), or an iterable of ready batches
            (replayed on resume; not split across processes).
        config: the :class:`TrainConfig`.
        run_dir: gets ``metrics.jsonl``, ``train_config.yaml``, ``checkpoints/last.pt`` and,
            with ``config.best_metric``, ``checkpoints/best.pt``. Locked for the run (the main
            process holds ``run_dir/.distiq.lock``; re-entrant for a caller that holds it).
        eval_fn: ``eval_fn(model) -> {metric: float}`` on the **validation** split, called on
            every process in eval mode under ``torch.no_grad()`` with the plain (unwrapped)
            model; the main process's result is used (see ``distiq.train.distributed`` for
            helpers to split the work and gather the results).
        collate_fn: collates samples when ``train_data`` is a dataset.
        optimizer_params: parameters or AdamW parameter groups (default: trainable parameters,
            weight decay on those with ``ndim >= 2`` only).
        stateful: extra objects with ``state_dict``/``load_state_dict`` (a learned loss
            weighting, an EMA) saved in checkpoints and restored on resume.
        resume: continue from ``checkpoints/last.pt`` (``--resume`` on the command line): model,
            optimizer, schedule, step, data position, RNG states and best-so-far are restored,
            so the run ends exactly as an uninterrupted one would.
        overwrite: start over in a run directory that already holds a run (``--overwrite``).
        on_step: called with a :class:`StepInfo` after every step (main process only).
        on_eval: called with ``(step, metrics)`` after every evaluation (main process only).

    Raises:
        NonFiniteLossError: a term, the total or the gradient norm is NaN/Inf (names the step
            and the terms; the last checkpoint is left as it was).
        RunInterrupted: SIGTERM/SIGINT arrived; a checkpoint of the last finished step exists.
        distiq.train.lock.RunDirectoryInUse: another process holds ``run_dir``'s lock.
        OSError: the disk filled up while a checkpoint was written (``errno`` ``ENOSPC``; the
            previous checkpoint is intact).
    """
    config.check()
    run_dir = Path(run_dir)
    ctx = setup_distributed(config)
    _check_run_options(run_dir, resume=resume, overwrite=overwrite)
    with locked_run_dir(run_dir, ctx):
        return _train_locked(
            model,
            step_fn,
            train_data,
            config=config,
            run_dir=run_dir,
            ctx=ctx,
            eval_fn=eval_fn,
            collate_fn=collate_fn,
            optimizer_params=optimizer_params,
            stateful=stateful,
            resume=resume,
            overwrite=overwrite,
            on_step=on_step,
            on_eval=on_eval,
        )


def _train_locked(
    model: nn.Module,
    step_fn: StepFn,
    train_data: Any,
    *,
    config: TrainConfig,
    run_dir: Path,
    ctx: DistContext,
    eval_fn: EvalFn | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    optimizer_params: Iterable[Any] | None,
    stateful: Mapping[str, Any] | None,
    resume: bool,
    overwrite: bool,
    on_step: Callable[[StepInfo], None] | None,
    on_eval: Callable[[int, dict[str, float]], None] | None,
) -> TrainResult:
    """:func:`train`'s body, run while the run directory is locked."""
    last_path = run_dir / "checkpoints" / "last.pt"
    best_path = run_dir / "checkpoints" / "best.pt"
    _prepare_run_dir(run_dir, last_path, best_path, ctx, resume=resume, overwrite=overwrite)
    if config.tensorboard:
        check_tensorboard()
    precision = resolve_precision(ctx.device, config.precision)
    seed_everything(config.seed + ctx.rank)

    model.to(ctx.device)
    optimizer = torch.optim.AdamW(
        _param_groups(model, optimizer_params, config.weight_decay),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        # on CPU torch picks its per-tensor loop unless told; the multi-tensor one gives the
        # same numbers bit for bit (test_train_loop.py) in less time (benchmarks/loop_overheads.py)
        foreach=True if ctx.device.type == "cpu" else None,
    )
    scheduler = build_scheduler(
        optimizer,
        config.schedule,
        config.steps,
        warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio,
    )
    batches = as_batch_source(
        train_data,
        batch_size=config.batch_size,
        seed=config.seed,
        collate_fn=collate_fn,
        shuffle=config.shuffle,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=config.num_workers,
    )
    wrapped, optimizer = ctx.prepare(model, optimizer)
    stateful = dict(stateful or {})

    state = LoopState()
    if resume:
        state = restore_training_state(
            last_path, config, ctx, wrapped, optimizer, scheduler, batches, stateful
        )
    elif ctx.is_main:
        dump_yaml(config, run_dir / "train_config.yaml")

    def save_last() -> None:
        nonlocal saved_at
        save_training_state(
            last_path, config, ctx, wrapped, optimizer, scheduler, batches, stateful, state
        )
        saved_at = state.step
        timer.reset()

    def evaluate() -> None:
        assert eval_fn is not None
        started = time.perf_counter()
        wrapped.eval()
        with torch.no_grad(), autocast(ctx.device, precision):
            raw = eval_fn(ctx.unwrap(wrapped) if not ctx.is_fsdp else wrapped)
        wrapped.train()
        metrics = broadcast_object(float_metrics(raw))
        is_best = False
        if config.best_metric is not None:
            if config.best_metric not in metrics:
                raise KeyError(
                    f"best_metric {config.best_metric!r} is not among the metrics eval_fn "
                    f"returned ({', '.join(metrics) or 'none'})"
                    f"{suggest(config.best_metric, list(metrics))}"
                )
            is_best = state.improves(metrics[config.best_metric], config.best_mode)
            if is_best:
                state.best_step = state.step
                state.best_value = metrics[config.best_metric]
                state.best_metrics = metrics
                save_best_weights(best_path, config, ctx, wrapped, state.step, metrics)
        state.eval_metrics = metrics
        seconds = time.perf_counter() - started
        writer.write(
            {
                "kind": "eval",
                "step": state.step,
                "metrics": metrics,
                "best": is_best,
                "seconds": seconds,
            }
        )
        logger.info("step %d eval %s%s", state.step, _fmt(metrics), "  (best)" if is_best else "")
        if on_eval is not None and ctx.is_main:
            on_eval(state.step, metrics)

    writer = MetricsWriter(
        run_dir,
        enabled=ctx.is_main,
        resume_step=state.step if resume else None,
        tensorboard=config.tensorboard,
    )
    last_log: dict[str, Any] | None = None
    saved_at: int | None = state.step if resume else None
    timer = CheckpointTimer(config.checkpoint_minutes)
    wrapped.train()
    optimizer.zero_grad(set_to_none=True)
    iterator = iter(batches)
    try:
        with SignalGuard() as guard:
            while state.step < config.steps:
                # one collective for both: every process stops, or checkpoints, on the same step
                signalled, on_time = _on_any_process(
                    ctx, guard.requested is not None, ctx.is_main and timer.due()
                )
                if (signalled or on_time) and saved_at != state.step:
                    save_last()
                if signalled:
                    name = guard.requested or "a signal on another process"
                    raise RunInterrupted(
                        f"training stopped by {name} after step {state.step} of {config.steps}; "
                        f"checkpoint written to {last_path}; continue with {option_hint('resume')}",
                        step=state.step,
                        signal_name=name,
                        checkpoint=last_path,
                    )
                started = time.perf_counter()
                step_total, step_terms = 0.0, {}
                for micro in range(config.grad_accum):
                    batch = move_to_device(next(iterator), ctx.device)
                    last_micro = micro == config.grad_accum - 1
                    with ctx.no_sync(wrapped, skip=not last_micro):
                        with autocast(ctx.device, precision):
                            output = step_fn(wrapped, batch, state.step)
                        total, terms = unpack_step_output(output)
                        values = checked_loss_values(
                            total, terms, state, config, ctx, micro, last_path
                        )
                        ctx.backward(total / config.grad_accum)
                    step_total += values[0] / config.grad_accum
                    for name, value in zip(terms, values[1:]):
                        step_terms[name] = step_terms.get(name, 0.0) + value / config.grad_accum
                grad_norm = float(ctx.clip_grad_norm(wrapped, config.grad_clip))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"non-finite gradient norm ({grad_norm}) at step {state.step + 1} "
                        f"(step_fn step={state.step}) although every loss term was finite; "
                        f"parameters were not updated. {last_good_checkpoint(last_path)}",
                        step=state.step + 1,
                        terms=["grad_norm"],
                    )
                lr = float(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                seconds = time.perf_counter() - started
                state.window.add(step_total, step_terms, grad_norm, seconds)

                logged = state.step % config.log_every == 0 or state.step == config.steps
                if logged:
                    last_log = _log_line(state, ctx, lr, getattr(batches, "epoch", 0))
                    writer.write(last_log)
                if eval_fn is not None and (
                    state.step == config.steps
                    or (config.eval_every and state.step % config.eval_every == 0)
                ):
                    evaluate()
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    save_last()
                if on_step is not None and ctx.is_main:
                    on_step(
                        StepInfo(
                            step=state.step,
                            steps=config.steps,
                            epoch=int(getattr(batches, "epoch", 0)),
                            lr=lr,
                            total=step_total,
                            terms=dict(step_terms),
                            grad_norm=grad_norm,
                            seconds=seconds,
                            logged=logged,
                        )
                    )
        if saved_at != state.step:
            save_last()
        if config.load_best_at_end and best_path.is_file():
            best = load_checkpoint(best_path, expect=BEST_FORMAT)
            ctx.load_model_state_dict(wrapped, best["model"])
            logger.info("loaded the best weights (step %d) into the model", best["step"])
    finally:
        writer.close()
    barrier()
    return TrainResult(
        step=state.step,
        run_dir=run_dir,
        checkpoint=last_path,
        best_checkpoint=best_path if state.best_step is not None else None,
        best_step=state.best_step,
        best_value=state.best_value,
        best_metrics=state.best_metrics,
        eval_metrics=state.eval_metrics,
        last_log=last_log,
    )


def unwrap_model(model: Any) -> nn.Module:
    """The plain module inside a DDP/accelerate wrapper (the module itself otherwise)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def _check_run_options(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """The checks that need no lock (so that a bad ``resume`` creates no directory)."""
    if resume and overwrite:
        raise ValueError(
            f"{option_hint('resume')} and {option_hint('overwrite')} exclude each other: pick one"
        )
    last_path = run_dir / "checkpoints" / "last.pt"
    if resume and not last_path.is_file():
        raise FileNotFoundError(
            f"cannot resume: there is no checkpoint at {last_path}; start the run without "
            "--resume (resume=False in Python)"
        )


def _on_any_process(ctx: DistContext, *flags: bool) -> list[bool]:
    """For each flag, whether it is true on any process (one all-reduce for all of them)."""
    sums = ctx.mean_floats([1.0 if flag else 0.0 for flag in flags])
    return [value > 0 for value in sums]


def _prepare_run_dir(
    run_dir: Path,
    last_path: Path,
    best_path: Path,
    ctx: DistContext,
    *,
    resume: bool,
    overwrite: bool,
) -> None:
    """Refuse to clobber or to resume nothing, before any long work (every process checks the
    same files before anything is deleted, so they all fail alike); remove the temporary files
    of checkpoint writes a killed run left (the lock is held: nobody is writing them)."""
    if resume:
        _check_run_options(run_dir, resume=resume, overwrite=overwrite)  # again, under the lock
        if ctx.is_main:
            remove_stale_temporaries(last_path.parent)
        return
    existing = [p for p in (last_path, best_path, run_dir / "metrics.jsonl") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(p.name for p in existing)}); pass "
            f"{option_hint('resume')} to continue it, {option_hint('overwrite')} to start over, "
            "or use a new directory"
        )
    barrier()
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the run directory {run_dir}: {exc}") from exc
        remove_stale_temporaries(last_path.parent)
        if overwrite:
            for path in existing:
                path.unlink()
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    barrier()


def _param_groups(model: nn.Module, params: Iterable[Any] | None, weight_decay: float) -> list[Any]:
    if params is not None:
        groups = list(params)
        if not groups:
            raise ValueError("optimizer_params is empty: nothing would be trained")
        return groups
    return param_groups([model], weight_decay)


def _log_line(state: LoopState, ctx: DistContext, lr: float, epoch: int) -> dict[str, Any]:
    window = state.window
    names = sorted(window.terms)
    means = ctx.mean_floats(window.means())
    total, term_values, grad_norm, seconds = means[0], means[1:-2], means[-2], means[-1]
    terms = dict(zip(names, term_values))
    record = {
        "kind": "train",
        "step": state.step,
        "epoch": int(epoch),
        "lr": lr,
        "total": total,
        "terms": terms,
        "grad_norm": grad_norm,
        "seconds": seconds,
    }
    logger.info(
        "step %d  loss %.4f%s  lr %.3g  grad %.3g  %.3fs/step",
        state.step,
        total,
        f" ({_fmt(terms)})" if terms else "",
        lr,
        grad_norm,
        seconds,
    )
    state.window = type(window)()
    return record


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())
