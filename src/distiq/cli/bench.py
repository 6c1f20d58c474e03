"""``distiq bench RUN_DIR``: size, latency and memory of a run's model."""

from __future__ import annotations

from distiq.cli._common import (
    RunDirArgument,
    call_with_supported,
    check_run_dir,
    engine_function,
    show_result,
    user_errors,
)


@user_errors
def command(run_dir: RunDirArgument) -> None:
    """Measure a run's model: size, latency, memory (added to its results.json)."""
    check_run_dir(run_dir)
    func = engine_function("bench", "distiq.bench", "bench_run")
    show_result(call_with_supported(func, run_dir), "bench")
