"""``distiq export RUN_DIR --format ...``: deployable files of a run's model.

Which runtime reads which export (docs/export.md): ``compressed-tensors`` — plain transformers
``from_pretrained`` and vLLM; ``onnx`` — onnxruntime (``distiq.export.ort.OrtVLM``); ``packed``
— distiq's own ``distiq.export.load_packed``; ``gguf`` — llama.cpp (``model.gguf`` +
``mmproj.gguf``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import RunDirArgument, check_run_dir, console, user_errors


class ExportFormat(StrEnum):
    packed = "packed"
    onnx = "onnx"
    compressed_tensors = "compressed-tensors"
    gguf = "gguf"


class GGUFFallback(StrEnum):
    f32 = "f32"
    f16 = "f16"


class Precision(StrEnum):
    auto = "auto"
    int8 = "int8"
    int4 = "int4"
    fp32 = "fp32"


FORMAT_HELP = (
    "packed: distiq's low-bit safetensors + manifest (distiq.export.load_packed, every scheme); "
    "onnx: ONNX graphs for onnxruntime; compressed-tensors: a Hugging Face folder that plain "
    "transformers from_pretrained and vLLM load (weight-only schemes bit-exact); gguf: llama.cpp "
    "language model + vision projector (mmproj), weights on llama.cpp's Q4_0 / Q5_0 / Q8_0 "
    "blocks code for code."
)


@user_errors
def command(
    run_dir: RunDirArgument,
    format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help=FORMAT_HELP, show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Output folder (default: RUN_DIR/export/<format>, onnx-<precision> for ONNX). "
                "Replaces only an earlier distiq export, once the new one is verified; never "
                "the run or a folder containing it."
            ),
            show_default=False,
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(help="ONNX only: int8, int4, fp32, or auto (the lowest that fits)."),
    ] = Precision.auto,
    allow_activation_ties: Annotated[
        bool,
        typer.Option(
            "--allow-activation-ties",
            help=(
                "compressed-tensors only: also write layers with quantized activations, which "
                "transformers and vLLM round differently at ties (logits then not guaranteed "
                "bit-identical; the gap measured is recorded)."
            ),
        ),
    ] = False,
    gguf_fallback: Annotated[
        GGUFFallback | None,
        typer.Option(
            "--gguf-fallback",
            help=(
                "gguf only: write layers on grids llama.cpp lacks as f32 (dequantized, exact) "
                "or f16 (rounded) instead of refusing; the manifest lists them."
            ),
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export a run's model for a runtime: compressed-tensors, ONNX, GGUF or packed safetensors."""
    check_run_dir(run_dir)
    if format is not ExportFormat.onnx and precision is not Precision.auto:
        raise ValueError("--precision applies to --format onnx only")
    if format is not ExportFormat.compressed_tensors and allow_activation_ties:
        raise ValueError("--allow-activation-ties applies to --format compressed-tensors only")
    if format is not ExportFormat.gguf and gguf_fallback is not None:
        raise ValueError("--gguf-fallback applies to --format gguf only")
    from distiq.export import export_run

    options = {"allow_activation_ties": True} if allow_activation_ties else {}
    if gguf_fallback is not None:
        options["gguf_fallback"] = gguf_fallback.value
    with console(stderr=True).status(f"Exporting {run_dir} ({format.value})…"):
        target = export_run(run_dir, format.value, out=out, precision=precision.value, **options)
    typer.echo(f"exported: {target}")
