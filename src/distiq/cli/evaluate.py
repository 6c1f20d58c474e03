"""``distiq eval RUN_DIR``: metrics of a compressed model on the test split."""

from __future__ import annotations

from typing import Annotated

import typer

from distiq.cli._common import (
    RunDirArgument,
    check_run_dir,
    console,
    engine_function,
    records_table,
    user_errors,
)


@user_errors
def command(
    run_dir: RunDirArgument,
    questions: Annotated[
        int | None,
        typer.Option(
            "--questions",
            min=1,
            help="Evaluate at most this many test questions (default: the recipe's limit).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Evaluate a run's model on the test split and update its results.json."""
    check_run_dir(run_dir)
    evaluate = engine_function("eval", "distiq.train", "evaluate")
    with console(stderr=True).status(f"Evaluating {run_dir}…"):
        records = evaluate(run_dir, **({"test_questions": questions} if questions else {}))
    console().print(records_table(records, title=f"{run_dir} (test split)"))
