"""Progress people can follow: rich bars on a terminal, and the callbacks that drive them.

Used by the command line and the demo alike (both import this module, which imports rich only
when a bar is made). The training loop reports through ``on_step`` / ``on_eval`` callbacks
(:class:`RunProgress`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def console(stderr: bool = False) -> Any:
    """A rich console writing to the current ``sys.stdout`` / ``sys.stderr``."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # a pipe or a file gets wide lines rather than tables folded to 80 columns
    width = None if getattr(stream, "isatty", lambda: False)() else 160
    return Console(stderr=stderr, highlight=False, width=width)


class RunProgress:
    """Callbacks for a training run, drawing a rich progress bar: ``on_step(info)`` takes
    :class:`distiq.train.StepInfo`-like objects (``step``, ``steps``, ``total``),
    ``on_eval(step, metrics)`` prints the validation metrics above the bar."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress = progress
        self.task = task

    def on_step(self, info: Any) -> None:
        loss = getattr(info, "total", None)
        self.progress.update(
            self.task,
            completed=getattr(info, "step", 0),
            total=getattr(info, "steps", None),
            loss="—" if loss is None else f"{loss:.4g}",
        )

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "/" not in k)
        self.progress.console.print(f"step {step}: validation {shown}")


def run_progress_bar() -> Any:
    """A rich ``Progress`` for training runs (name, bar, step m/n, loss, elapsed, remaining),
    drawn on stderr; tasks carry a ``loss`` field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(stderr=True),
    )


@contextmanager
def step_progress(description: str) -> Iterator[RunProgress]:
    """A rich progress bar for a training run (a pulsing bar for work without steps); yields
    the :class:`RunProgress` whose callbacks drive it."""
    progress = run_progress_bar()
    task = progress.add_task(description, total=None, loss="—")
    with progress:
        yield RunProgress(progress, task)
