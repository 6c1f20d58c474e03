"""The demo's runs in worker processes: one per core, one torch thread each.

The demo's nine runs are independent (each reads the teacher and the scenes and writes its own
run directory), and a tiny model uses two threads badly: two one-thread processes do about twice
the work of one two-thread process on the 2-core machine. Workers are *forked* after the
parent has set up everything: they inherit the engine's functions and the validated recipes
(nothing is pickled but run names, step numbers, losses and what a job's ``after`` returns),
and they report their progress on a queue that the parent shows (:mod:`distiq.progress`): one
rich progress bar per run on a terminal, plain lines at a steady interval elsewhere, and a line
when each run starts and ends.

The teacher, a single run, is trained data-parallel instead (:func:`run_distributed`): as many
forked processes as split its global batch evenly (one thread each), which find each other through
the variables a launcher sets and the training loop's accelerate (DDP, gloo) path (without
accelerate installed, :func:`data_parallel_unavailable` says why and the demo trains it in one
process).

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

from distiq.progress import progress_display, stage_line

# Set in the parent just before the workers fork, read by them (fork copies the parent's memory).
_JOBS: dict[str, Job] = {}
_EVENTS: Any = None


@dataclass(frozen=True)
class Job:
    """One run: ``compress(recipe, overwrite=..., resume=..., on_step=..., on_eval=...)``, then,
    in :func:`run_jobs`, ``after()`` in the same worker (its result goes back to the parent);
    ``compress=None``: a job of ``after`` alone. :func:`run_distributed` takes neither."""

    name: str
    compress: Callable[..., Any] | None
    recipe: Any
    action: str  # "run" (a fresh run directory) or "resume"
    data: Any = None  # the recipe's splits, loaded in the parent (``compress(data=...)``)
    after: Callable[[], Any] | None = None  # e.g. the run's ONNX exports for the benchmark
    after_stage: str | None = None  # the line ``after``'s time is said under (None: silent)
    phase: Callable[[Any], str | None] | None = None  # a step's phase (distiq.progress)


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
    """``on_step`` / ``on_eval`` callbacks that send plain numbers (and the step's phase, worked
    out here in the worker) to the parent."""

    def __init__(self, name: str, phase: Callable[[Any], str | None] | None = None) -> None:
        self.name = name
        self.phase = phase

    def on_step(self, info: Any) -> None:
        total = getattr(info, "total", None)
        _EVENTS.put(
            (
                "step",
                self.name,
                int(getattr(info, "step", 0)),
                getattr(info, "steps", None),
                None if total is None else float(total),
                self.phase(info) if self.phase is not None else None,
            )
        )

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        shown = {k: float(v) for k, v in metrics.items() if "/" not in k}
        _EVENTS.put(("eval", self.name, int(step), shown))


def _run_job(name: str) -> tuple[float, Any]:
    """In a worker: run job ``name``, announcing its stages on the queue; returns its wall
    seconds (without ``after``) and what ``after`` returned."""
    job = _JOBS[name]
    started = time.perf_counter()
    seconds = 0.0
    if job.compress is not None:
        _EVENTS.put(("stage", name, None))
        progress = _QueuedProgress(name, job.phase)
        job.compress(
            job.recipe,
            overwrite=job.action == "run",
            resume=job.action == "resume",
            on_step=progress.on_step,
            on_eval=progress.on_eval,
            data=job.data,
        )
        seconds = round(time.perf_counter() - started, 1)
        _EVENTS.put(("stage", name, seconds))
    if job.after is None:
        return seconds, None
    label = name if job.compress is None else job.after_stage
    after_started = time.perf_counter()
    output = job.after()
    if label is not None:  # a part of the run's stage: its end alone
        _EVENTS.put(("part", label, round(time.perf_counter() - after_started, 1)))
    return seconds, output


def _draw_events(events: Any, display: Any) -> list[tuple]:
    """Show the queued ``step`` / ``eval`` / ``stage`` / ``part`` events on ``display``; returns
    the other events (``done`` / ``error`` of :func:`run_distributed`)."""
    other = []
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return other
        kind, name = event[0], event[1]
        if kind == "step":
            _, _, step, steps, loss, phase = event
            display.update(name, step, steps, loss, phase)
        elif kind == "eval":
            _, _, step, metrics = event
            display.validation(name, step, metrics)
        elif kind == "part":
            display.line(stage_line(name, event[2], part=True))
        elif kind == "stage":
            seconds = event[2]
            if seconds is None:
                display.start(name)
                display.line(stage_line(name))
            else:
                display.finish(name, seconds)
        else:
            other.append(event)


def run_jobs(jobs: list[Job], workers: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Run ``jobs`` in ``workers`` forked processes, showing each run's progress and a line
    when it starts and ends (:mod:`distiq.progress`); returns ``{name: wall seconds}`` (of
    ``compress``; jobs of ``after`` alone are left out) and ``{name: what after returned}``. The
    first failure cancels the runs not yet started, waits for the running ones and is raised
    again here."""
    context = multiprocessing.get_context("fork")
    events = context.Queue()
    _JOBS.clear()
    _JOBS.update({job.name: job for job in jobs})
    display = progress_display()
    for job in jobs:
        display.add_task(job.name, phased=job.phase is not None)
    seconds: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    try:
        with display:
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(events,)
            ) as pool:
                futures = {pool.submit(_run_job, job.name): job.name for job in jobs}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _draw_events(events, display)
                    display.tick()
                    for future in done:
                        error = future.exception()
                        if error is not None:
                            for other in pending:
                                other.cancel()
                            raise error
                        seconds[futures[future]], outputs[futures[future]] = future.result()
            # the workers have exited, so every event they sent is in the queue now
            _draw_events(events, display)
    finally:
        _JOBS.clear()
    kept = {job.name for job in jobs if job.compress is not None}
    return {k: v for k, v in seconds.items() if k in kept}, outputs


def data_parallel_unavailable() -> str | None:
    """Why a data-parallel run cannot start here (``None`` when it can): the training loop's
    multi-process path needs Hugging Face accelerate, a dependency of distiq that an install
    may still lack."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        return "Hugging Face accelerate is not installed (pip install accelerate)"
    return None


def data_parallel_size(batch_size: int, jobs: int, min_per_process: int = 8) -> int:
    """Processes for one data-parallel run: the most, up to ``jobs``, that split the global
    ``batch_size`` evenly with at least ``min_per_process`` items each (1: no split)."""
    sizes = [
        w for w in range(1, max(1, jobs) + 1)
        if batch_size % w == 0 and batch_size // w >= min_per_process
    ]  # fmt: skip
    return max(sizes, default=1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_rank(name: str, rank: int, world_size: int, port: int, events: Any) -> None:
    """In a forked process: rank ``rank`` of the data-parallel run of job ``name``. Sets the
    variables a launcher (torchrun, ``accelerate launch``) sets, so the training loop's
    ``setup_distributed`` finds the process group; reports ``done`` / ``error`` on ``events``."""
    import pickle
    import traceback
    import warnings

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",  # what the process uses (accelerate warns when it is unset)
    )
    # 1x1 convolutions' gradients come with strides DDP's buckets do not expect; harmless here
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    _init_worker(events)
    job = _JOBS[name]
    started = time.perf_counter()
    progress = _QueuedProgress(name, job.phase) if rank == 0 else None
    try:
        job.compress(
            job.recipe,
            overwrite=job.action == "run",
            resume=job.action == "resume",
            on_step=progress.on_step if progress else None,
            on_eval=progress.on_eval if progress else None,
            data=job.data,
        )
    except BaseException as exc:  # sent to the parent, which raises it
        try:
            payload = pickle.dumps(exc)
        except Exception:  # an exception that does not pickle
            payload = pickle.dumps(RuntimeError("".join(traceback.format_exception(exc))))
        events.put(("error", name, rank, payload))
        events.close()
        events.join_thread()  # the report reaches the pipe before the process ends
        os._exit(1)
    events.put(("done", name, rank, round(time.perf_counter() - started, 1)))


def run_distributed(job: Job, world_size: int) -> float:
    """Run one job data-parallel in ``world_size`` forked processes (gloo, one torch thread
    each: DDP through the training loop's accelerate path, the same global batch), showing rank
    0's progress; returns the wall seconds. If a process fails, the others are stopped (they
    would wait forever in the next all-reduce) and its exception is raised here."""
    import pickle

    if job.compress is None or job.after is not None:
        raise ValueError(f"{job.name}: run_distributed runs compress alone (no after)")
    context = multiprocessing.get_context("fork")
    events = context.Queue()
    _JOBS.clear()
    _JOBS[job.name] = job
    display = progress_display()
    display.add_task(job.name, phased=job.phase is not None)
    port = _free_port()
    started = time.perf_counter()
    processes = [
        context.Process(target=_run_rank, args=(job.name, rank, world_size, port, events))
        for rank in range(world_size)
    ]
    finished: set[int] = set()
    try:
        with display:
            display.start(job.name)
            for process in processes:
                process.start()
            while len(finished) < world_size:
                for event in _draw_events(events, display):
                    if event[0] == "error":
                        raise pickle.loads(event[3])
                    finished.add(event[2])
                dead = [
                    rank for rank, p in enumerate(processes)
                    if rank not in finished and p.exitcode not in (None, 0)
                ]  # fmt: skip
                if dead and not _draw_pending(events):
                    raise RuntimeError(
                        f"{job.name}: process {dead[0]} of {world_size} died "
                        f"(exit code {processes[dead[0]].exitcode}) without a report"
                    )
                display.tick()
                time.sleep(0.2)
            display.finish(job.name)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                # a process blocked inside an all-reduce runs no Python signal handler: kill it
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
            process.join()
        _JOBS.clear()
    return round(time.perf_counter() - started, 1)


def _draw_pending(events: Any) -> bool:
    """Whether ``events`` may still hold reports (read them before calling a process dead)."""
    try:
        return not events.empty()
    except (OSError, ValueError):
        return False
