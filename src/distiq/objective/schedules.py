"""Step schedules for term weights and the distillation temperature.

A :class:`Schedule` maps the optimizer step (0-based) to a number. For a term's ``schedule`` the
number multiplies the term's ``weight``; for ``temperature_schedule`` it is the temperature.

    kind       value at step t (f = clamp((t − delay) / steps, 0, 1))
    constant   end
    linear     start + (end − start) · f
    cosine     start + (end − start) · (1 − cos(π f)) / 2
    warmup     end · f                      (linear warm-up from 0; ``start`` must stay 0)

Before ``delay`` steps the value is ``start`` (0 for ``warmup``); after ``delay + steps`` it is
``end``. YAML: ``schedule: {kind: warmup, steps: 100}`` or
``temperature_schedule: {kind: cosine, start: 4.0, end: 1.0, steps: 1000}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine", "warmup"]


@dataclass(frozen=True)
class Schedule:
    """A number that follows the training step (see the module doc for the formulas).

    Args:
        kind: ``constant``, ``linear``, ``cosine`` or ``warmup``.
        start: the value at (and before) ``delay``; unused by ``constant``, 0 for ``warmup``.
        end: the value after the ramp (and the value of a ``constant`` schedule).
        steps: length of the ramp in optimizer steps (≥ 1 unless ``constant``).
        delay: steps to hold ``start`` before the ramp begins.
    """

    kind: ScheduleKind = "constant"
    start: float = 0.0
    end: float = 1.0
    steps: int = 0
    delay: int = 0

    def _validate(self) -> list[str]:
        errors = []
        if self.kind != "constant" and self.steps < 1:
            errors.append(
                f"a {self.kind} schedule needs steps >= 1 (the ramp length), got {self.steps}"
            )
        if self.steps < 0 or self.delay < 0:
            errors.append("steps and delay must be >= 0")
        if self.kind == "warmup" and self.start != 0.0:
            errors.append(
                f"a warmup schedule always starts at 0 (got start={self.start}); use kind: linear "
                "to ramp from another value"
            )
        return errors

    def __post_init__(self) -> None:
        errors = self._validate()
        if errors:
            raise ValueError("; ".join(errors))

    def value(self, step: int) -> float:
        """The scheduled value at optimizer step ``step`` (0-based)."""
        if self.kind == "constant":
            return self.end
        frac = min(max((step - self.delay) / self.steps, 0.0), 1.0)
        if self.kind == "linear" or self.kind == "warmup":
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.start + (self.end - self.start) * (1.0 - math.cos(math.pi * frac)) / 2.0
        raise AssertionError(f"unhandled schedule kind {self.kind!r}")

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value the schedule takes."""
        if self.kind == "constant":
            return self.end, self.end
        return min(self.start, self.end), max(self.start, self.end)


CONSTANT = Schedule()
