"""``distiq bench RUN_DIR``: size, latency and memory of a run's model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import (
    RunDirArgument,
    check_run_dir,
    console,
    records_table,
    user_errors,
)


@user_errors
def command(
    run_dir: RunDirArgument,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per backend.")] = 30,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads (torch, onnxruntime).")] = 2,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="results.json to update (default: the run's own; a model directory that is "
            "not a distiq run is never written to).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure a run's model: size, latency, memory (merged into its results.json)."""
    check_run_dir(run_dir)
    from distiq.bench import bench_run

    with console(stderr=True).status(f"Measuring {run_dir}…"):
        records = bench_run(run_dir, repeats=repeats, threads=threads, results=out)
    console().print(records_table(records, title=f"{run_dir} (bench)"))
    from distiq.bench.run import is_distiq_run

    if out is None and not is_distiq_run(run_dir):
        typer.echo("not saved: pass --out FILE to keep these numbers (e.g. for the report)")
