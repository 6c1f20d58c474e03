"""ONNX export of dense vision models (segmentation, detection, depth): one graph at the
model's fixed input size, its quantized layers in the QDQ forms of
:mod:`distiq.export.onnx_quant` (the same stand-ins, ``plan_model`` / ``swapped_layers`` /
``finalize_graph`` through :func:`distiq.export.onnx.export_module`).

Layout of an export folder::

    model.onnx          pixel_values (batch, 3, H, W) float32 -> the model's outputs:
                          segmentation: logits (batch, C, h, w)
                          detection:    logits (batch, Q, K), boxes (batch, Q, 4) (cx, cy, w, h)
                          depth:        depth (batch, h, w)
    processor/          the image processor and config.json (classes, the family), from which
                        :class:`OrtDense` rebuilds the adapter: pixel values and predictions
                        in the original images' pixels, exactly as the run computes them
    manifest.json       format, task, family, input size, outputs, precision, the layers' forms

H × W is static (the processor's fixed size); only the batch axis is dynamic.
:class:`OrtDense` runs an export in onnxruntime and returns ``distiq.models.DenseOutputs``, so
the engine's evaluation scores it as it scores the PyTorch model (:class:`OrtDenseEngine`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ONNX_DENSE_FORMAT = "distiq.onnx-dense"
ONNX_DENSE_VERSION = 1
GRAPH_FILE = "model.onnx"
PROCESSOR_DIR = "processor"
MANIFEST_FILE = "manifest.json"
OUTPUTS = {"segmentation": ("logits",), "detection": ("logits", "boxes"), "depth": ("depth",)}


class DenseGraph(nn.Module):
    """``pixel_values -> outputs`` of a dense model (the tuple :data:`OUTPUTS` names)."""

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        super().__init__()
        self.inner = model
        self.adapter = adapter

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.adapter.forward(self.inner, pixel_values)
        return tuple(getattr(out, name) for name in OUTPUTS[self.adapter.task])


def export_dense_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter: Any,
    precision: str = "int8",
    int8_weights: str = "auto",
    exporter: str = "torchscript",
) -> dict[str, Any]:
    """Export a dense model (float, fake-quant, or with real quantized layers) into the new
    folder ``path`` (see the module docstring); returns the manifest.

    Args:
        precision: ``int8`` (QDQ), ``int4`` (blockwise INT4 weights) or ``fp32`` (dequantized
            weights, exact): :mod:`distiq.export.onnx_quant`.
        int8_weights, exporter: as for :func:`distiq.export.onnx.export_module`.
    Raises:
        ValueError: a layer the precision cannot hold (all listed), a folder that is not empty.
    """
    from distiq.config import atomic_write
    from distiq.export.onnx import export_module

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} is not empty; export dense models into a new folder")
    names = list(OUTPUTS[adapter.task])
    height, width = adapter.input_size
    # traced at batch 2: a trace at batch 1 can fold the batch size into reshapes
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    dynamic = {name: {0: "batch"} for name in ["pixel_values", *names]}
    was_training = model.training
    try:
        plans = export_module(
            DenseGraph(model, adapter).eval(), (example,), path / GRAPH_FILE,
            input_names=["pixel_values"], output_names=names, dynamic_axes=dynamic,
            precision=precision, int8_weights=int8_weights, exporter=exporter,
        )  # fmt: skip
    finally:
        model.train(was_training)
    adapter.save_pretrained(path / PROCESSOR_DIR)
    model.config.save_pretrained(path / PROCESSOR_DIR)
    manifest = {
        "format": ONNX_DENSE_FORMAT,
        "format_version": ONNX_DENSE_VERSION,
        "task": adapter.task,
        "family": adapter.family,
        "model_type": model.config.model_type,
        "graph": GRAPH_FILE,
        "input": {"name": "pixel_values", "shape": ["batch", 3, height, width]},
        "outputs": names,
        "precision": precision,
        "int8_weights": int8_weights,
        "layers": dict(Counter(f"{p.kind}:{p.weight}:{p.activation}" for p in plans)),
    }
    atomic_write(path / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    log.info("dense ONNX export %s (%s, %d quantized layers)", path, precision, len(plans))
    return manifest


def read_dense_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a dense ONNX export.

    Raises:
        FileNotFoundError / ValueError: no manifest, or not a dense export of a known version.
    """
    from distiq.export.files import member_file

    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no {MANIFEST_FILE}: not a distiq ONNX export")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != ONNX_DENSE_FORMAT:
        raise ValueError(f"{path} is a {manifest.get('format')!r} export, not {ONNX_DENSE_FORMAT}")
    if manifest.get("format_version") != ONNX_DENSE_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r} unsupported")
    member_file(path, manifest["graph"], "the graph")  # a plain name inside the folder
    return manifest


class OrtDense:
    """A dense ONNX export in onnxruntime: ``ort(pixel_values) -> DenseOutputs``; ``adapter``
    turns images into pixel values and outputs into predictions.

    Args:
        path: the export folder.
        threads: onnxruntime intra-op threads (None: its default).
        int4_accuracy_level: ``MatMulNBits`` accuracy level of int4 exports (None: default).
        spinning: let idle onnxruntime threads busy-wait (its default; benchmarks that
            interleave backends turn it off).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        *,
        int4_accuracy_level: int | None = None,
        spinning: bool = True,
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoConfig

        from distiq.export.ort import session_options
        from distiq.models.dense import DENSE_ADAPTERS

        self.path = Path(path)
        self.manifest = read_dense_manifest(self.path)
        processor_dir = self.path / PROCESSOR_DIR
        config = AutoConfig.from_pretrained(processor_dir, local_files_only=True)
        self.adapter = DENSE_ADAPTERS.get(self.manifest["model_type"]).from_pretrained(
            processor_dir, config
        )
        options = session_options(threads, int4_accuracy_level, spinning=spinning)
        self.session = ort.InferenceSession(
            str(self.path / self.manifest["graph"]), options, ["CPUExecutionProvider"]
        )

    def run(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        """The graph's raw outputs for ``pixel_values`` ``(B, 3, H, W)`` float32."""
        return self.session.run(None, {"pixel_values": np.ascontiguousarray(pixel_values)})

    def __call__(self, pixel_values: torch.Tensor) -> Any:
        from distiq.models.dense import DenseOutputs

        arrays = self.run(pixel_values.detach().cpu().float().numpy())
        named = dict(zip(self.manifest["outputs"], (torch.from_numpy(a) for a in arrays)))
        return DenseOutputs(**named)


class OrtDenseEngine(nn.Module):
    """An :class:`OrtDense` export behind the engine's dense forward path
    (``engine(batch) -> DenseOutputs``, ``engine.adapter``), so that the engine's evaluation
    scores it on a test split exactly as it scores the PyTorch model."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.ort = OrtDense(path, threads)
        self.adapter = self.ort.adapter

    def forward(self, batch: dict, heads: bool = False, targets: bool = False) -> Any:
        return self.ort(batch["pixel_values"])


@torch.no_grad()
def dense_parity(
    model: nn.Module, adapter: Any, path: str | os.PathLike, images: list[Any]
) -> dict[str, Any]:
    """The export against the model on ``images``: per output the largest absolute difference,
    and how often the predictions agree — segmentation: the share of pixels with the same
    class; detection: the share of images whose top detection has the same class (boxes
    within one pixel); depth: the largest relative difference."""
    ort_model = OrtDense(path)
    pixels = adapter.pixel_values(images)
    expected = adapter.forward(model.eval(), pixels)
    got = ort_model(pixels)
    report: dict[str, Any] = {"images": len(images)}
    for name in OUTPUTS[adapter.task]:
        a, b = getattr(expected, name).float(), getattr(got, name).float()
        report[f"max_abs_diff/{name}"] = float((a - b).abs().max())
    sizes = [(image.size[1], image.size[0]) for image in images]
    if adapter.task == "segmentation":
        pairs = list(zip(adapter.predict(expected, sizes), adapter.predict(got, sizes)))
        agree = torch.cat([(x == y).flatten() for x, y in pairs])
        report["pixel_agreement"] = float(agree.float().mean())
        report["identical_maps"] = sum(torch.equal(x, y) for x, y in pairs)
    elif adapter.task == "detection":
        ours, theirs = adapter.predict(expected, sizes), adapter.predict(got, sizes)
        top = [
            int(x["labels"][0]) == int(y["labels"][0])
            and float((x["boxes"][0] - y["boxes"][0]).abs().max()) <= 1.0
            for x, y in zip(ours, theirs)
        ]
        report["top_detection_agreement"] = sum(top) / len(top)
    else:
        a, b = expected.depth.float(), got.depth.float()
        report["max_rel_diff/depth"] = float(((a - b).abs() / a.abs().clamp(min=1e-6)).max())
    return report


__all__ = [
    "GRAPH_FILE",
    "ONNX_DENSE_FORMAT",
    "OUTPUTS",
    "DenseGraph",
    "OrtDense",
    "OrtDenseEngine",
    "dense_parity",
    "export_dense_onnx",
    "read_dense_manifest",
]
