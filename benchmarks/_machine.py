"""Machine description for the benchmarks: ``distiq.bench``'s (CPU model, cores, threads, versions,
GPU, load average) plus the command that produced the numbers."""

from __future__ import annotations

import os
import sys

from distiq.bench.run import machine


def machine_info() -> dict:
    return {**machine(), "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
