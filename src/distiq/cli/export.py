"""``distiq export RUN_DIR --format packed|onnx``: deployable files of a run's model."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from distiq.cli._common import (
    RunDirArgument,
    call_with_supported,
    check_run_dir,
    engine_function,
    show_result,
    user_errors,
)


class ExportFormat(StrEnum):
    packed = "packed"
    onnx = "onnx"


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
) -> None:
    """Export a run's model as packed low-bit safetensors or as ONNX."""
    check_run_dir(run_dir)
    func = engine_function("export", "distiq.export", "export_run")
    show_result(call_with_supported(func, run_dir, format.value), "exported")
