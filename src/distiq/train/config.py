"""``TrainConfig``: every knob of the training loop, validated by :func:`distiq.config.from_dict`.

Batch semantics: ``batch_size`` is the *global* micro-batch (summed over processes); each of
``W`` processes takes ``batch_size / W`` samples of it, so a run on 2 processes sees exactly the
batches of a 1-process run with the same config. One optimizer step consumes ``grad_accum``
micro-batches, i.e. ``batch_size · grad_accum`` samples.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from distiq.config import ConfigError

Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16", "auto"]
Distributed = Literal["auto", "none", "accelerate"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

# Fields that may change between a run and its resumption without breaking exactness of the
# steps already taken (they change only what happens from now on, or only bookkeeping).
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {
        "steps",
        "eval_every",
        "checkpoint_every",
        "checkpoint_minutes",
        "log_every",
        "tensorboard",
        "device",
        "load_best_at_end",
        "num_workers",
        "distributed",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`distiq.train.train`.

    Attributes:
        steps: optimizer steps to take in all (not epochs).
        lr: peak learning rate of AdamW (per-group ``lr`` in ``optimizer_params`` overrides it).
        weight_decay: AdamW decoupled weight decay; by default applied only to parameters with
            ``ndim >= 2`` (weights), not to biases, norms, scales.
        betas, eps: AdamW's.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
        schedule: decay after warm-up: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: floor of the decay, as a fraction of ``lr``.
        grad_clip: max global L2 norm of the gradients; ``None`` disables clipping (the norm is
            still measured and logged).
        grad_accum: micro-batches per optimizer step; the loss of each is divided by it.
        batch_size: global micro-batch size (see the module doc). Used when the training data
            is a dataset; ignored for an iterable of ready batches.
        shuffle: draw a fresh seeded permutation of the dataset every epoch.
        num_workers: DataLoader worker processes used to collate batches from a dataset.
        eval_every: evaluate every N optimizer steps (and always after the last one); ``None``
            evaluates only at the end.
        checkpoint_every: write ``checkpoints/last.pt`` every N steps (and always at the end and
            on SIGTERM/SIGINT); ``None``: no step-based checkpoints.
        checkpoint_minutes: also write ``checkpoints/last.pt`` when this many minutes of wall
            time have passed since the last one (checked after each step; whichever of this and
            ``checkpoint_every`` comes first), so a killed run (``kill -9``, a lost machine)
            loses at most about that much work; ``None``: no time-based checkpoints. In a
            data-parallel run the main process's clock decides, for every process alike.
            Checkpoints change no number of the run: resuming stays bit-identical.
        best_metric: name of the validation metric that picks ``checkpoints/best.pt``
            (``None``: no best checkpoint). Evaluate on a validation split, never on test.
        best_mode: ``max`` (accuracy, mAP) or ``min`` (a loss).
        load_best_at_end: load the best checkpoint's weights into the model when training ends.
        log_every: write a metrics line every N steps (values averaged over those N steps).
        seed: seeds python ``random``, numpy, torch (``seed + rank`` per process) and the data
            order (``seed`` only, shared by every process).
        precision: ``fp32``; ``bf16`` autocast (CUDA only, refused elsewhere); ``auto`` = bf16
            where CUDA supports it, fp32 otherwise.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        distributed: ``auto`` uses Hugging Face accelerate when launched with more than one
            process (``accelerate launch``/``torchrun``); ``accelerate`` always uses it;
            ``none`` never does (and refuses a multi-process launch).
        ddp_find_unused_parameters: passed to DistributedDataParallel.
        tensorboard: also write TensorBoard events to ``RUN/tensorboard`` (needs tensorboard).
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    batch_size: int = 32
    shuffle: bool = True
    num_workers: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 10.0
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    load_best_at_end: bool = False
    log_every: int = 10
    seed: int = 0
    precision: Precision = "fp32"
    device: str = "auto"
    distributed: Distributed = "auto"
    ddp_find_unused_parameters: bool = False
    tensorboard: bool = False

    def _validate(self) -> list[str]:
        errors: list[str] = []

        def positive_int(name: str, value: object, *, optional: bool = False) -> None:
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be an integer >= 1, got {value!r}")

        positive_int("steps", self.steps)
        positive_int("grad_accum", self.grad_accum)
        positive_int("batch_size", self.batch_size)
        positive_int("log_every", self.log_every)
        positive_int("eval_every", self.eval_every, optional=True)
        positive_int("checkpoint_every", self.checkpoint_every, optional=True)
        minutes = self.checkpoint_minutes
        if minutes is not None and (
            isinstance(minutes, bool)
            or not isinstance(minutes, int | float)
            or not math.isfinite(minutes)
            or minutes <= 0
        ):
            errors.append(
                f"checkpoint_minutes must be a number of minutes > 0 or null (no time-based "
                f"checkpoints), got {minutes!r}"
            )
        if not self.lr > 0:
            errors.append(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            errors.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            errors.append(f"betas must lie in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            errors.append(f"eps must be > 0, got {self.eps!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            errors.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        elif isinstance(self.steps, int) and self.warmup_steps > self.steps:
            errors.append(
                f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps}); "
                "lower warmup_steps or raise steps"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errors.append(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            errors.append(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            errors.append(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            errors.append(
                f"device {self.device!r} is not understood; use auto, cpu, cuda, cuda:N or mps"
            )
        if self.load_best_at_end and self.best_metric is None:
            errors.append("load_best_at_end needs best_metric (the validation metric to select on)")
        return errors

    def check(self) -> TrainConfig:
        """Raise one :class:`ConfigError` listing every problem (for configs built in Python)."""
        errors = self._validate()
        if errors:
            raise ConfigError(errors, "TrainConfig")
        return self
