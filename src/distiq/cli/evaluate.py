"""``distiq eval DIR``: metrics of a compressed run — or of any model directory — on a test
split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import check_run_dir, console, records_table, user_errors


@user_errors
def command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            help="A run directory (made by distiq compress) or a Hugging Face model directory.",
            show_default=False,
        ),
    ],
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Recipe whose data to evaluate on (default: the run's own recipe.yaml).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where results.json is updated (default: the run directory; a model directory "
            "is never written to).",
            show_default=False,
        ),
    ] = None,
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
    """Evaluate a run's model (or a model directory, as a teacher) on the test split."""
    check_run_dir(run_dir)
    from distiq.train import evaluate

    kwargs = {"test_questions": questions} if questions else {}
    with console(stderr=True).status(f"Evaluating {run_dir}…"):
        records = evaluate(run_dir, recipe=recipe, out=out, **kwargs)
    console().print(records_table(records, title=f"{run_dir} (test split)"))
    if out is None and not (run_dir / "recipe.yaml").is_file():
        typer.echo("not saved: pass --out DIR to keep this record (e.g. for the report)")
