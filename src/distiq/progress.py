"""Progress people can follow, on a terminal and in a log file alike.

On a terminal (stderr is a TTY) training runs draw rich progress bars. Anywhere else
(``distiq demo > log 2>&1``, CI, a pipe) a bar prints nothing until it ends, so runs print plain
lines instead, at a steady interval of wall time (:data:`INTERVAL_SECONDS`)::

    teacher: step 120/2500 (5 %), loss 2.314, elapsed 1m04s, ETA 21m10s
    teacher step 500: validation vqa_accuracy 0 (vision-only warm-up: ...)

Both kinds of display (:func:`progress_display`) take the same calls: ``add_task`` /
``start`` / ``update`` / ``validation`` / ``finish`` / ``tick``. Work in stages announces each
start and end with its time (:func:`stage`), on a terminal too. The training loop reports
through ``on_step`` / ``on_eval`` callbacks (:class:`RunProgress`, :func:`step_progress`).

A run can name the *phase* of each step (``phase(step_info) -> str | None``, e.g. the demo
teacher's vision-only warm-up): step lines carry it, and a validation line carries the phase of
the step it followed. The loop evaluates after a step and reports the step just after, so a
validation line waits for that step's report (or for the run's end).

Tests replace :data:`clock` (a fake monotonic clock) and :data:`TICK_SECONDS` (``None``: no
heartbeat thread) here.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

INTERVAL_SECONDS = 15.0
"""Seconds of wall time between two plain progress lines of one run."""
TICK_SECONDS: float | None = 1.0
"""How often an in-process run's plain display checks for a silent run (``None``: never)."""
clock: Callable[[], float] = time.monotonic
"""The clock progress lines measure elapsed time and intervals with."""

Phase = Callable[[Any], str | None]


def is_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def console(stderr: bool = False) -> Any:
    """A rich console writing to the current ``sys.stdout`` / ``sys.stderr``."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # a pipe or a file gets wide lines rather than tables folded to 80 columns
    width = None if is_terminal(stream) else 160
    return Console(stderr=stderr, highlight=False, width=width)


def say(message: str) -> None:
    """One line for the person watching, on stderr (above any progress bar on a terminal;
    flushed at once in a log file)."""
    if is_terminal():
        console(stderr=True).print(message, markup=False)
    else:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def format_seconds(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3m05s``, ``1h02m``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def stage_line(
    name: str, seconds: float | None = None, failed: bool = False, part: bool = False
) -> str:
    """``stage NAME: started`` / ``stage NAME: done in 3.2 s`` / ``... failed after ...``; a
    ``part`` of a stage: ``  NAME: done in 3.2 s``."""
    if seconds is None:
        return f"stage {name}: started"
    done = f"{'failed after' if failed else 'done in'} {format_seconds(seconds)}"
    return f"  {name}: {done}" if part else f"stage {name}: {done}"


@dataclass
class Stage:
    """What :func:`stage` yields; ``seconds`` is set when the stage ends."""

    name: str
    seconds: float | None = None


@contextmanager
def stage(name: str, status: str | None = None, part: bool = False) -> Iterator[Stage]:
    """A stage of work between two lines, ``stage NAME: started`` and ``stage NAME: done in
    3.2 s`` (``failed after`` when it raises); a ``part`` of a stage (one model's benchmark)
    gets the second line alone. On a terminal ``status`` shows as a spinner meanwhile. Yields a
    :class:`Stage` whose ``seconds`` is the stage's wall time."""
    if not part:
        say(stage_line(name))
    started = clock()
    found = Stage(name)
    try:
        if status is not None and is_terminal():
            with console(stderr=True).status(status):
                yield found
        else:
            yield found
    except BaseException:
        say(stage_line(name, clock() - started, failed=True, part=part))
        raise
    found.seconds = clock() - started
    say(stage_line(name, found.seconds, part=part))


def validation_text(name: str, step: int, metrics: dict[str, float], phase: str | None) -> str:
    """``NAME step S: validation m1 v1, m2 v2 (phase)``; per-type keys (with ``/``) left out."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "/" not in k)
    return f"{name} step {step}: validation {shown}" + (f" ({phase})" if phase else "")


@dataclass
class _Task:
    name: str
    total: int | None = None
    phased: bool = False  # its validation lines wait for the next step's phase
    started: float | None = None
    step: int | None = None
    loss: float | None = None
    phase: str | None = None
    rate_from: tuple[float, int] | None = None  # (time, step) of the first step seen
    last_step_at: float | None = None
    last_line: float | None = None  # when a line about it was last printed
    step_shown: bool = False  # whether a step line was printed
    finished: bool = False
    pending: list[tuple[int, dict]] = field(default_factory=list)


class _Display:
    """What both displays share: tasks by name, validation lines held for their step's phase,
    a lock (a heartbeat thread may print too)."""

    def __init__(self) -> None:
        self.tasks: dict[str, _Task] = {}
        self.lock = threading.RLock()

    def __enter__(self) -> _Display:
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            for task in self.tasks.values():
                self._flush(task, None, None)

    def add_task(self, name: str, total: int | None = None, phased: bool = False) -> None:
        """A run to show (not started yet: see :meth:`start`)."""
        with self.lock:
            self.tasks[name] = _Task(name, total, phased)

    def start(self, name: str) -> None:
        """The run ``name`` has started (its elapsed time counts from now)."""
        with self.lock:
            self.tasks[name].started = clock()

    def update(
        self, name: str, step: int, total: int | None, loss: float | None, phase: str | None = None
    ) -> None:
        """Step ``step`` of ``total`` is done (``loss``: its training loss; ``phase``: what the
        step was, e.g. a warm-up)."""
        with self.lock:
            task = self.tasks[name]
            now = clock()
            if task.started is None:
                task.started = now
            if task.rate_from is None or step < task.rate_from[1]:
                task.rate_from = (now, step)
            task.step, task.total, task.loss, task.phase = step, total or task.total, loss, phase
            task.last_step_at = now
            self._flush(task, step, phase)
            self._draw_step(task, now)

    def validation(self, name: str, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics after step ``step`` (held until that step's report when the run
        has phases)."""
        with self.lock:
            task = self.tasks[name]
            if task.phased:
                task.pending.append((step, dict(metrics)))
            else:
                self.line(validation_text(name, step, metrics, None))

    def finish(self, name: str, seconds: float | None = None) -> None:
        """The run ``name`` is over (``seconds``: its wall time, for the stage line)."""
        with self.lock:
            task = self.tasks[name]
            self._flush(task, None, None)
            task.finished = True
            self._draw_finish(task)
            if seconds is not None:
                self.line(stage_line(name, seconds))

    def tick(self) -> None:
        """Called now and then while runs go on (a plain display reports silent runs)."""

    def line(self, message: str) -> None:
        raise NotImplementedError

    def _flush(self, task: _Task, step: int | None, phase: str | None) -> None:
        """Print the held validation lines up to ``step`` (all with ``None``); the one of
        ``step`` itself carries ``phase``."""
        keep = []
        for at, metrics in task.pending:
            if step is None or at <= step:
                self.line(validation_text(task.name, at, metrics, phase if at == step else None))
            else:
                keep.append((at, metrics))
        task.pending = keep

    def _draw_step(self, task: _Task, now: float) -> None:
        raise NotImplementedError

    def _draw_finish(self, task: _Task) -> None:
        raise NotImplementedError


class LineDisplay(_Display):
    """Plain lines on stderr (see the module docstring): a run's first step, then one line per
    ``interval`` seconds, and its last step; :meth:`tick` (called by a poller, or by a thread
    every ``tick_seconds``) reports a started run with no line for ``interval`` seconds."""

    def __init__(self, interval: float | None = None, tick_seconds: float | None = None) -> None:
        super().__init__()
        self.interval = INTERVAL_SECONDS if interval is None else interval
        self.tick_seconds = tick_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LineDisplay:
        if self.tick_seconds is not None:
            self._thread = threading.Thread(target=self._beat, name="distiq-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        super().__exit__(*exc)

    def _beat(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            self.tick()

    def line(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def _draw_step(self, task: _Task, now: float) -> None:
        last = task.total is not None and task.step >= task.total
        if not task.step_shown or now - task.last_line >= self.interval or last:
            self.line(self.step_text(task, now))
            task.last_line, task.step_shown = now, True

    def _draw_finish(self, task: _Task) -> None:
        pass

    def step_text(self, task: _Task, now: float) -> str:
        """``NAME: step 120/2500 (5 %), loss 2.314, elapsed 1m04s, ETA 21m10s (phase)``."""
        text = f"{task.name}: step {task.step}"
        if task.total:
            text += f"/{task.total} ({100 * task.step / task.total:.0f} %)"
        text += ", loss " + ("n/a" if task.loss is None else f"{task.loss:.4g}")
        text += f", elapsed {format_seconds(now - task.started)}"
        if task.total:
            text += f", ETA {self._eta(task, now)}"
        return text + (f" ({task.phase})" if task.phase else "")

    @staticmethod
    def _eta(task: _Task, now: float) -> str:
        since, first = task.rate_from
        if task.step <= first or now <= since:
            return "unknown yet"
        per_step = (now - since) / (task.step - first)
        return format_seconds(per_step * max(0, task.total - task.step))

    def tick(self) -> None:
        with self.lock:
            now = clock()
            for task in self.tasks.values():
                if task.started is None or task.finished:
                    continue
                if now - (task.last_line or task.started) < self.interval:
                    continue
                elapsed = format_seconds(now - task.started)
                if task.step is None:
                    self.line(f"{task.name}: still running, elapsed {elapsed}")
                else:
                    quiet = format_seconds(now - task.last_step_at)
                    self.line(
                        f"{task.name}: step {task.step}"
                        + (f"/{task.total}" if task.total else "")
                        + f", no new step for {quiet}, elapsed {elapsed}"
                    )
                task.last_line = now


class BarDisplay(_Display):
    """rich progress bars on stderr (name, bar, step m/n, loss, elapsed, remaining)."""

    def __init__(self) -> None:
        super().__init__()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console(stderr=True),
        )
        self._ids: dict[str, Any] = {}

    def __enter__(self) -> BarDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.progress.__exit__(*exc)

    def add_task(self, name: str, total: int | None = None, phased: bool = False) -> None:
        super().add_task(name, total, phased)
        self._ids[name] = self.progress.add_task(name, total=total, loss="—", start=False)

    def start(self, name: str) -> None:
        super().start(name)
        self.progress.start_task(self._ids[name])

    def line(self, message: str) -> None:
        self.progress.console.print(message, markup=False)

    def _draw_step(self, task: _Task, now: float) -> None:
        task_id = self._ids[task.name]
        if not self.progress.tasks[task_id].started:
            self.progress.start_task(task_id)
        shown = "—" if task.loss is None else f"{task.loss:.4g}"
        self.progress.update(task_id, completed=task.step, total=task.total, loss=shown)

    def _draw_finish(self, task: _Task) -> None:
        task_id = self._ids[task.name]
        total = self.progress.tasks[task_id].total or 1
        self.progress.update(task_id, completed=total, total=total)


def progress_display(heartbeat: bool = False) -> _Display:
    """Bars on a terminal, else plain lines (with a heartbeat thread when ``heartbeat``: for
    runs in this process, which report only when a step ends)."""
    if is_terminal():
        return BarDisplay()
    return LineDisplay(tick_seconds=TICK_SECONDS if heartbeat else None)


class RunProgress:
    """The training loop's callbacks for one run shown on a display: ``on_step(info)`` takes
    :class:`distiq.train.StepInfo`-like objects (``step``, ``steps``, ``total``; ``phase(info)``
    names the step's phase), ``on_eval(step, metrics)`` shows the validation metrics."""

    def __init__(self, display: _Display, name: str, phase: Phase | None = None) -> None:
        self.display = display
        self.name = name
        self.phase = phase

    def on_step(self, info: Any) -> None:
        loss = getattr(info, "total", None)
        self.display.update(
            self.name,
            int(getattr(info, "step", 0)),
            getattr(info, "steps", None),
            None if loss is None else float(loss),
            self.phase(info) if self.phase is not None else None,
        )

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.display.validation(self.name, int(step), metrics)


@contextmanager
def step_progress(description: str, phase: Phase | None = None) -> Iterator[RunProgress]:
    """The display of one training run in this process (bars on a terminal, plain lines
    elsewhere); yields the :class:`RunProgress` whose callbacks drive it."""
    display = progress_display(heartbeat=True)
    display.add_task(description, phased=phase is not None)
    with display:
        display.start(description)
        yield RunProgress(display, description, phase)


def quiet_library_bars() -> None:
    """Outside a terminal, turn off the Hugging Face libraries' own tqdm bars (loading and
    writing weights), which would fill a log with carriage-return lines; a value the user gave
    ``HF_HUB_DISABLE_PROGRESS_BARS`` is kept. Child processes inherit the setting."""
    import os

    if is_terminal() or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1") != "1":
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when the libraries are imported
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:  # imported already: tell them
        hub.disable_progress_bars()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()
