"""``distiq eval RUN_DIR``: metrics of a compressed model on the test split."""

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
    """Evaluate a run's model on the test split and add the result to its results.json."""
    check_run_dir(run_dir)
    func = engine_function("eval", "distiq.train", "evaluate")
    show_result(call_with_supported(func, run_dir), "eval")
