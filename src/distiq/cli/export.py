"""``distiq export RUN_DIR --format packed|onnx``: deployable files of a run's model."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import RunDirArgument, check_run_dir, console, engine_function, user_errors


class ExportFormat(StrEnum):
    packed = "packed"
    onnx = "onnx"


class Precision(StrEnum):
    auto = "auto"
    int8 = "int8"
    int4 = "int4"
    fp32 = "fp32"


@user_errors
def command(
    run_dir: RunDirArgument,
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="packed: low-bit safetensors + JSON manifest; onnx: ONNX graphs.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (default: RUN_DIR/export/...); replaced if it exists.",
            show_default=False,
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(help="ONNX only: int8, int4, fp32, or auto (the lowest that fits)."),
    ] = Precision.auto,
) -> None:
    """Export a run's model as packed low-bit safetensors or as ONNX."""
    check_run_dir(run_dir)
    if format is ExportFormat.packed and precision is not Precision.auto:
        raise ValueError("--precision applies to --format onnx only")
    export_run = engine_function("export", "distiq.export", "export_run")
    with console(stderr=True).status(f"Exporting {run_dir} ({format.value})…"):
        target = export_run(run_dir, format.value, out=out, precision=precision.value)
    typer.echo(f"exported: {target}")
