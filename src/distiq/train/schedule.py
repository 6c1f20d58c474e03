"""Learning-rate schedules: linear warm-up, then cosine, linear or constant decay.

The schedule is a multiplicative factor on each parameter group's base ``lr`` as a function of
the optimizer step index ``k = 0, 1, …, steps − 1`` (the factor used *for* the ``k``-th update):

    warm-up  (k < W):   f(k) = (k + 1) / W
    decay    (k ≥ W):   p = min(1, (k − W) / max(1, S − W))
                        cosine:   f = m + (1 − m) · ½ (1 + cos(π p))
                        linear:   f = m + (1 − m) · (1 − p)
                        constant: f = 1

with ``W = warmup_steps``, ``S = steps`` and ``m = min_lr_ratio``. The peak ``f = 1`` is reached
at the last warm-up step (or at ``k = 0`` without warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distiq.util import suggest

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


@dataclass
class LRSchedule:
    """Callable ``step -> factor`` (see the module doc); picklable, so ``LambdaLR`` saves it."""

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.kind!r}{suggest(self.kind, SCHEDULES)}; "
                f"choose one of {', '.join(SCHEDULES)}"
            )
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must lie in [0, total_steps={self.total_steps}], "
                f"got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(
            1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        )
        floor = self.min_lr_ratio
        if self.kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following :class:`LRSchedule`; call ``.step()`` once per
    optimizer step. Its ``state_dict()`` holds the schedule's fields and the step count."""
    schedule = LRSchedule(kind, total_steps, warmup_steps, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
