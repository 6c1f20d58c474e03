"""``distiq demo``: the embedded example end to end, offline (:mod:`distiq.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import console, records_table, user_errors


@user_errors
def command(
    quick: Annotated[
        bool,
        typer.Option("--quick", help="A small, fast version (about 2 minutes) for a first look."),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (default: distiq-demo, or distiq-demo-quick with --quick).",
            show_default=False,
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Worker processes, one torch thread each: the teacher trains data-parallel "
            "over them and the compression runs go side by side (default: one per CPU core).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the embedded example end to end, offline: data, teacher, compression, report."""
    from distiq.demo import FULL, QUICK, default_jobs, run_demo
    from distiq.report import goals_summary

    settings = QUICK if quick else FULL
    target = out if out is not None else Path("distiq-demo-quick" if quick else "distiq-demo")
    result = run_demo(target, settings, jobs=jobs if jobs is not None else default_jobs())
    term = console()
    term.print(records_table(result["records"], title="distiq demo"))
    term.print(goals_summary(result["goals"]))
    times = result["times"]
    typer.echo(
        "times (s): " + ", ".join(f"{stage} {seconds:g}" for stage, seconds in times.items())
    )
    if result["reused"]:
        typer.echo("reused from an earlier run: " + ", ".join(result["reused"]))
    typer.echo(f"report: {result['report'].markdown}")
    typer.echo(f"report: {result['report'].html}")
