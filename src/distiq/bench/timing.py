"""Latency and memory measurement: warm-up then median, interleaved backends, peak RSS.

Latency: each callable runs ``warmup`` times untimed, then ``repeats`` timed runs
(``time.perf_counter``, garbage collection off while timing). With several callables the timed
runs are *interleaved* in rounds of ``chunk`` runs each, so background load on a shared machine
(this one's 2 cores are shared) falls on every backend alike and ratios measured in one run stay
meaningful. Reported: median (the headline), mean, min, p90.

Memory: ``peak_memory()`` measures the peak resident set size of this process inside a block. On
Linux it resets the kernel's high-water mark first (``/proc/self/clear_refs`` ← 5) and reads
``VmHWM`` after, so each block gets its own peak; elsewhere it falls back to
``ru_maxrss`` (the process's peak so far: an upper bound, marked ``method="ru_maxrss"``).
``delta_mb`` = peak − resident size at the start of the block: what the block added.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class Timing:
    """Milliseconds over ``repeats`` timed runs after ``warmup`` untimed ones."""

    median_ms: float
    mean_ms: float
    min_ms: float
    p90_ms: float
    repeats: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


def _summary(samples: list[float], warmup: int) -> Timing:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Timing(
        median_ms=statistics.median(ordered) * 1e3,
        mean_ms=statistics.fmean(ordered) * 1e3,
        min_ms=ordered[0] * 1e3,
        p90_ms=p90 * 1e3,
        repeats=len(ordered),
        warmup=warmup,
    )


def time_interleaved(
    functions: dict[str, Callable[[], object]],
    *,
    warmup: int = 5,
    repeats: int = 30,
    chunk: int = 5,
) -> dict[str, Timing]:
    """``{name: Timing}`` of zero-argument callables, timed in interleaved rounds."""
    if warmup < 0 or repeats < 1 or chunk < 1:
        raise ValueError("need warmup >= 0, repeats >= 1 and chunk >= 1")
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    enabled = gc.isenabled()
    gc.disable()
    try:
        while any(len(s) < repeats for s in samples.values()):
            for name, fn in functions.items():
                for _ in range(min(chunk, repeats - len(samples[name]))):
                    start = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - start)
    finally:
        if enabled:
            gc.enable()
    return {name: _summary(s, warmup) for name, s in samples.items()}


def _status_kb(field: str) -> int | None:
    try:
        with open(_PROC_STATUS) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak resident memory inside a ``with peak_memory() as mem:`` block (MiB)."""

    start_mb: float = 0.0
    peak_mb: float = 0.0
    method: str = "VmHWM"

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)

    def to_dict(self) -> dict:
        return {
            "peak_mb": round(self.peak_mb, 2),
            "delta_mb": round(self.delta_mb, 2),
            "method": self.method,
        }

    def __enter__(self) -> PeakMemory:
        # Young generations only: a full collection in a process that holds a data set took a
        # large share of the demo's bench time (profiled by hand), and freed Python memory
        # mostly stays mapped, so it barely moved the starting RSS.
        gc.collect(1)
        rss = _status_kb("VmRSS")
        self.start_mb = (rss or 0) / 1024
        if not (rss is not None and _reset_peak()):
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc) -> None:
        if self.method == "VmHWM":
            self.peak_mb = (_status_kb("VmHWM") or 0) / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def peak_memory() -> PeakMemory:
    """Context manager measuring the peak resident memory of its block (see the docstring)."""
    return PeakMemory()


def set_threads(threads: int) -> int:
    """Fix torch's intra-op threads (onnxruntime sessions take theirs in SessionOptions);
    returns the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return previous
