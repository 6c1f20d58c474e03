"""The demo's compression runs side by side: one worker process per core, one torch thread each.

The demo's nine runs are independent (each reads the teacher and the scenes and writes its own
run directory), and a tiny model uses two threads badly: two one-thread processes do about twice
the work of one two-thread process on the 2-core machine. Workers are *forked* after the
parent has set up everything: they inherit the engine's functions and the validated recipes
(nothing is pickled but run names, step numbers and losses), and they report their progress on a
queue that the parent draws as one rich progress bar per run.

Each worker runs ``torch.set_num_threads(1)`` before any work, which also keeps it clear of the
parent's OpenMP thread pool (GNU OpenMP's pool does not survive a fork). Where ``fork`` does not
exist (Windows), :func:`default_jobs` is 1 and the demo runs the recipes one after the other.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from distiq.cli._common import run_progress_bar

# Set in the parent just before the workers fork, read by them (fork copies the parent's memory).
_JOBS: dict[str, Job] = {}
_EVENTS: Any = None


@dataclass(frozen=True)
class Job:
    """One run: ``compress(recipe, overwrite=..., resume=..., on_step=..., on_eval=...)``."""

    name: str
    compress: Callable[..., Any]
    recipe: Any
    action: str  # "run" (a fresh run directory) or "resume"


def default_jobs() -> int:
    """Worker processes the demo uses by default: one per core (1 without ``fork``)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, os.cpu_count() or 1)


def _init_worker(events: Any) -> None:
    global _EVENTS
    import torch

    torch.set_num_threads(1)
    _EVENTS = events


class _QueuedProgress:
    """``on_step`` / ``on_eval`` callbacks that send plain numbers to the parent."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_step(self, info: Any) -> None:
        total = getattr(info, "total", None)
        _EVENTS.put(
            (
                "step",
                self.name,
                int(getattr(info, "step", 0)),
                getattr(info, "steps", None),
                None if total is None else float(total),
            )
        )

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        shown = {k: float(v) for k, v in metrics.items() if "/" not in k}
        _EVENTS.put(("eval", self.name, int(step), shown))


def _run_job(name: str) -> float:
    """In a worker: run job ``name``; returns its wall seconds."""
    job = _JOBS[name]
    started = time.perf_counter()
    progress = _QueuedProgress(name)
    job.compress(
        job.recipe,
        overwrite=job.action == "run",
        resume=job.action == "resume",
        on_step=progress.on_step,
        on_eval=progress.on_eval,
    )
    return round(time.perf_counter() - started, 1)


def run_jobs(jobs: list[Job], workers: int) -> dict[str, float]:
    """Run ``jobs`` in ``workers`` forked processes, drawing a progress bar per run; returns
    ``{name: wall seconds}``. The first failure cancels the runs not yet started, waits for the
    running ones and is raised again here."""
    context = multiprocessing.get_context("fork")
    events = context.Queue()
    _JOBS.clear()
    _JOBS.update({job.name: job for job in jobs})
    progress = run_progress_bar()
    tasks = {job.name: progress.add_task(job.name, total=None, loss="—") for job in jobs}
    seconds: dict[str, float] = {}

    def draw_events() -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            kind, name = event[0], event[1]
            if kind == "step":
                _, _, step, steps, loss = event
                shown = "—" if loss is None else f"{loss:.4g}"
                progress.update(tasks[name], completed=step, total=steps, loss=shown)
            else:
                _, _, step, metrics = event
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                progress.console.print(f"{name} step {step}: validation {shown}")

    try:
        with (
            progress,
            ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(events,)
            ) as pool,
        ):
            futures = {pool.submit(_run_job, job.name): job.name for job in jobs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                draw_events()
                for future in done:
                    name = futures[future]
                    error = future.exception()
                    if error is not None:
                        for other in pending:
                            other.cancel()
                        raise error
                    seconds[name] = future.result()
                    task = progress.tasks[tasks[name]]
                    progress.update(tasks[name], completed=task.total or 1, total=task.total or 1)
            draw_events()
    finally:
        _JOBS.clear()
    return seconds
