"""The loop's small types: what a step returns (and the checks of it), what callbacks receive,
the result, the errors, the running state saved in checkpoints, and the SIGTERM/SIGINT guard."""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from distiq.train.config import TrainConfig
from distiq.train.distributed import DistContext, gather_objects

logger = logging.getLogger(__name__)


@runtime_checkable
class LossOutputLike(Protocol):
    """What a step function returns: ``total`` (0-dim tensor, the loss to minimise) and
    ``terms`` (``{name: 0-dim tensor}``, each logged). ``distiq.objective.LossOutput`` fits."""

    total: torch.Tensor
    terms: Mapping[str, torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """A loss term, the total or the gradient norm was NaN/Inf; parameters were not updated."""

    def __init__(self, message: str, *, step: int, terms: list[str]) -> None:
        super().__init__(message)
        self.step = step
        self.terms = terms


class RunInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run after a checkpoint was written; resume it with
    ``--resume`` (``resume=True`` in Python)."""

    def __init__(self, message: str, *, step: int, signal_name: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class StepInfo:
    """Given to ``on_step`` after every optimizer step (main process only).

    ``total``/``terms`` are this step's values on the main process (mean over micro-batches);
    ``logged`` says whether a metrics line was written at this step."""

    step: int
    steps: int
    epoch: int
    lr: float
    total: float
    terms: dict[str, float]
    grad_norm: float
    seconds: float
    logged: bool


@dataclass
class TrainResult:
    """What :func:`distiq.train.train` returns. ``step`` counts optimizer steps done."""

    step: int
    run_dir: Path
    checkpoint: Path
    best_checkpoint: Path | None = None
    best_step: int | None = None
    best_value: float | None = None
    best_metrics: dict[str, float] | None = None
    eval_metrics: dict[str, float] | None = None
    last_log: dict[str, Any] | None = None


@dataclass
class LogWindow:
    """Sums over the steps since the last metrics line."""

    count: int = 0
    total: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    term_counts: dict[str, int] = field(default_factory=dict)
    grad_norm: float = 0.0
    seconds: float = 0.0

    def add(
        self, total: float, terms: Mapping[str, float], grad_norm: float, seconds: float
    ) -> None:
        self.count += 1
        self.total += total
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
            self.term_counts[name] = self.term_counts.get(name, 0) + 1
        self.grad_norm += grad_norm
        self.seconds += seconds

    def means(self) -> list[float]:
        """``[total, *terms (sorted by name), grad_norm, seconds]`` averaged over the window."""
        n = max(1, self.count)
        names = sorted(self.terms)
        terms = [self.terms[k] / self.term_counts[k] for k in names]
        return [self.total / n, *terms, self.grad_norm / n, self.seconds / n]


@dataclass
class LoopState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0
    best_step: int | None = None
    best_value: float | None = None
    best_metrics: dict[str, float] | None = None
    eval_metrics: dict[str, float] | None = None
    window: LogWindow = field(default_factory=LogWindow)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopState:
        values = dict(data)
        values["window"] = LogWindow(**values.get("window", {}))
        return cls(**values)

    def improves(self, value: float, mode: str) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if mode == "max" else value < self.best_value


class SignalGuard:
    """For the loop's duration, SIGTERM/SIGINT set :attr:`requested` instead of killing the
    process; a second signal raises ``KeyboardInterrupt`` at once. Previous handlers come back on
    exit. Outside the main thread (where handlers cannot be installed) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.requested = name
        logger.warning(
            "received %s: finishing this step, writing a checkpoint, then stopping "
            "(send it again to stop at once)",
            name,
        )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def unpack_step_output(output: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total, terms)`` of what ``step_fn`` returned (a ``LossOutput``, a ``(total, terms)``
    tuple or a bare loss tensor), ``total`` as a 0-dim tensor; a clear error for anything else."""
    if isinstance(output, LossOutputLike):
        total, terms = output.total, dict(output.terms)
    elif isinstance(output, torch.Tensor):
        total, terms = output, {}
    elif isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Mapping):
        total, terms = output[0], dict(output[1])
    else:
        raise TypeError(
            f"step_fn returned {type(output).__name__}; return a LossOutput(total, terms), a "
            "(total, terms) tuple or a 0-dim loss tensor"
        )
    if not isinstance(total, torch.Tensor) or total.numel() != 1:
        raise TypeError(f"step_fn's total must be a one-element tensor, got {total!r:.80}")
    if not total.requires_grad:
        raise RuntimeError(
            "step_fn's total does not require grad: no trainable parameter reaches the loss "
            "(frozen model, or the loss computed under torch.no_grad())"
        )
    return total.reshape(()), terms


def checked_loss_values(
    total: torch.Tensor,
    terms: dict[str, Any],
    state: LoopState,
    config: TrainConfig,
    ctx: DistContext,
    micro: int,
    last_path: Path,
) -> list[float]:
    """``[total, *terms]`` as floats (one device sync); raise if any is NaN/Inf on any process."""
    parts = [total.detach().float()]
    for name, value in terms.items():
        value = torch.as_tensor(value)
        if value.numel() != 1:
            raise ValueError(
                f"loss term {name!r} has shape {tuple(value.shape)}; terms must be scalars"
            )
        parts.append(value.detach().float().reshape(()).to(parts[0].device))
    values = torch.stack(parts).cpu().tolist()
    bad = [name for name, v in zip(["total", *terms], values) if not math.isfinite(v)]
    if not ctx.any_true(bool(bad)):
        return values
    everywhere = gather_objects(bad)
    named = sorted({n for per_rank in everywhere for n in per_rank if n != "total"})
    shown = ", ".join(f"{n}={v}" for n, v in zip(["total", *terms], values) if n in bad) or (
        "finite here, non-finite on another process"
    )
    where = f" (process {ctx.rank} of {ctx.world_size})" if ctx.world_size > 1 else ""
    raise NonFiniteLossError(
        f"non-finite loss at step {state.step + 1} (step_fn step={state.step}, micro-batch "
        f"{micro + 1} of {config.grad_accum}){where}: "
        f"{'term(s) ' + ', '.join(repr(n) for n in named) if named else 'the total'} blew up "
        f"[{shown}]; parameters were not updated. {last_good_checkpoint(last_path)}",
        step=state.step + 1,
        terms=named or ["total"],
    )


def last_good_checkpoint(last_path: Path) -> str:
    """The sentence of an error message that says whether a checkpoint to resume from exists."""
    if last_path.is_file():
        return f"The last good checkpoint, {last_path}, is intact."
    return "No checkpoint was written before it."


def float_metrics(raw: Mapping[str, Any]) -> dict[str, float]:
    """``eval_fn``'s result as ``{name: float}``; a clear error for anything that is not."""
    if not isinstance(raw, Mapping):
        raise TypeError(
            f"eval_fn must return a mapping of metric names to numbers, got {type(raw).__name__}"
        )
    metrics = {}
    for name, value in raw.items():
        try:
            metrics[str(name)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"eval_fn's metric {name!r} is not a number: {value!r:.80}") from None
    return metrics
