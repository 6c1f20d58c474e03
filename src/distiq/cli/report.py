"""``distiq report RUN_DIR...``: Markdown + HTML + plots from result JSON and run metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import console, records_table, user_errors

DEMO_TIMES = "demo_times.json"  # what `distiq demo` leaves in its output directory


def default_out(paths: list[Path]) -> Path:
    """Where the report goes without ``--out``: the one directory given (or the folder of the one
    file given); with several paths ``--out`` is required."""
    if len(paths) != 1:
        raise ValueError(
            f"{len(paths)} paths given: say where the report goes with --out DIR "
            "(with one run or demo directory the report is written into it)"
        )
    path = paths[0]
    return path if path.is_dir() else path.parent


@user_errors
def command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR...",
            help="Run directories, `distiq demo` output directories or results JSON files.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Directory for report.md, report.html and the PNGs "
            "(default: the one directory given).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write report.md and report.html (tables, plots, training curves; the demo's goals for a
    demo output directory) from result JSON."""
    from distiq.report import DEFAULT_GOALS, collect_inputs, goals_summary, write_report

    for path in paths:  # clear errors before anything is created
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; pass a run directory, a demo output directory or a "
                "results JSON file"
            )
    out_dir = out if out is not None else default_out(paths)
    inputs = collect_inputs(paths)
    # the demo's goals judge the demo's runs; a user's own runs have none of them
    demo = any(p.is_dir() and (p / DEMO_TIMES).is_file() for p in paths)
    goals = DEFAULT_GOALS if demo else ()
    term = console()
    with term.status("Rendering the report…"):
        files = write_report(inputs, out_dir, goals)
    if inputs.records:
        term.print(records_table(inputs.records, title="Results"))
        if goals:
            term.print(goals_summary(files.goals))  # as the report shows them
    # plain echo (no wrapping) so that the paths can be copied
    typer.echo(f"report: {files.markdown}")
    typer.echo(f"report: {files.html}")
