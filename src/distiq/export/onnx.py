"""``export_onnx``: a LLaVA-architecture VLM (and its task heads) as separate ONNX graphs.

The whole VLM does not trace as one graph (its image-token bookkeeping is data-dependent), and an
edge runtime wants the parts apart anyway. ``export_onnx(model, path)`` writes::

    path/manifest.json            format "distiq.onnx": graphs, precision, per-layer forms,
                                  prompt and image-token facts the runner needs, file sizes
    path/embed_tokens.onnx        input_ids (B, L) int64            -> inputs_embeds (B, L, D)
    path/vision.onnx              pixel_values (B, 3, H, W) float32 -> image_features (B, P, Dv)
    path/projector.onnx           image_features (B, P, Dv)         -> image_embeds (B, P, D)
    path/language_model.onnx      inputs_embeds (B, L, D), attention_mask (B, L) int64
                                                                    -> logits (B, L, V)
    path/detection_head.onnx      image_features -> cls_logits (B, N, C), box_ltrb (B, N, 4)
    path/segmentation_head.onnx   image_features -> seg_logits (B, C, H, W)    (heads: VLMWithHeads)
    path/processor/               tokenizer, image processor, chat template

``image_features`` are what LLaVA's projector consumes (the selected vision layer(s), class token
dropped under the ``default`` strategy); N = (H/patch)·(W/patch) patch positions. B and L are
dynamic; the language model has no KV cache (each decoding step re-runs the prefix: simple and
exact, O(L²) per answer — fine for short VQA answers).

Quantized layers become QDQ per ``distiq.export.onnx_quant`` (``precision`` ``int8``, ``int4`` or
``fp32``). Graphs are traced by default with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, opset 20, then rewritten to opset 21 for INT4): on this
machine it exports the edge VLM's language model in ~1 s where the dynamo exporter takes 15-30 s.
``exporter="dynamo"`` uses ``torch.export`` instead (the exporter PyTorch is moving to; the
TorchScript one is deprecated) and writes the same QDQ / INT4 forms
(``distiq.export.onnx_dynamo``). Every file is written to a temporary directory that is
renamed to ``path`` when complete; all checks run before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import distiq
from distiq.export.files import (
    UnsafeFileError,
    check_destination,
    member_file,
    replace_directory,
)
from distiq.export.onnx_parts import (
    DetectionGraph,
    EmbedGraph,
    LanguageGraph,
    ProjectorGraph,
    SegmentationGraph,
    VisionGraph,
    resolve_vlm,
    vlm_image_facts,
)
from distiq.export.onnx_quant import (
    LayerPlan,
    finalize_graph,
    plan_model,
    swapped_layers,
)

log = logging.getLogger(__name__)

ONNX_FORMAT = "distiq.onnx"
ONNX_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROCESSOR_DIR = "processor"
TRACE_OPSET = 20
QUESTION_SLOT = "{question}"


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: ``graphs`` maps a part to its file."""

    path: Path
    precision: str
    graphs: dict[str, Path]
    layers: list[LayerPlan]
    manifest: dict = field(repr=False)

    @property
    def size_bytes(self) -> dict[str, int]:
        return {name: file.stat().st_size for name, file in self.graphs.items()}


# -- export ---------------------------------------------------------------------------------------
EXPORTERS = ("torchscript", "dynamo")


def _trace(
    module: nn.Module,
    args: tuple,
    file: Path,
    inputs,
    outputs,
    dynamic,
    blockwise: bool,
    exporter: str = "torchscript",
) -> None:
    if exporter == "dynamo":
        from distiq.export.onnx_dynamo import register

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=21,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic or None,
                custom_translation_table=register(),
                verbose=False,
            )
        program.save(str(file))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracer notes on HF's Python-side checks
        torch.onnx.export(
            module,
            args,
            str(file),
            dynamo=False,
            opset_version=TRACE_OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
            custom_opsets={"distiq": 1} if blockwise else None,
        )


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")


def _blockwise(plans: list[LayerPlan]) -> bool:
    return any(p.block_size is not None for p in plans)


def _save_graph(file: Path, opset: int) -> None:
    import onnx

    proto = finalize_graph(onnx.load(str(file)), opset)
    onnx.checker.check_model(proto)
    large = proto.ByteSize() > 1_800_000_000
    onnx.save(proto, str(file), save_as_external_data=large)


def export_module(
    module: nn.Module,
    args: tuple,
    file: str | os.PathLike,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict | None = None,
    precision: str = "int8",
    int8_weights: str = "auto",
    exporter: str = "torchscript",
) -> list[LayerPlan]:
    """Export any module (a vision model, a single layer) to one ONNX file, its quantized
    layers in the forms of ``distiq.export.onnx_quant``. ``args`` are example inputs; the file
    is written beside ``file`` and renamed when complete. Returns the per-layer plans."""
    file = Path(file)
    _check_exporter(exporter)
    plans = plan_model(module, precision, int8_weights)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=file.parent, prefix=f".{file.name}.tmp-"))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), swapped_layers(module, plans, exporter):
            _trace(
                module, args, tmp / file.name, input_names, output_names, dynamic_axes or {},
                _blockwise(plans), exporter,
            )  # fmt: skip
        _save_graph(tmp / file.name, 21)
        os.replace(tmp / file.name, file)
    finally:
        module.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return plans


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter: Any = None,
    precision: str = "int8",
    int8_weights: str = "auto",
    overwrite: bool = False,
    exporter: str = "torchscript",
) -> OnnxExport:
    """Export a LLaVA-architecture VLM (optionally ``VLMWithHeads``) as separate ONNX graphs.

    Args:
        model: ``LlavaForConditionalGeneration`` (float, fake-quant after ``quantize_``, or with
            ``QuantizedLinear`` layers) or ``VLMWithHeads``.
        path: output directory (see the module docstring for its contents).
        adapter: the model's ``VLMAdapter`` (not needed for ``VLMWithHeads``).
        precision: ``int8`` (8-bit per-channel weights, QDQ), ``int4`` (4-bit blockwise weights,
            opset-21 INT4) or ``fp32`` (dequantized float weights); activation quantization is
            kept as QDQ in all three (see ``distiq.export.onnx_quant``).
        int8_weights: ``auto`` / ``int8`` / ``uint8`` (see ``distiq.export.onnx_quant``).
        overwrite: replace an earlier distiq export in ``path`` (a folder holding anything else
            is never replaced: ``distiq.export.files.check_destination``).
        exporter: ``torchscript`` (default: fast) or ``dynamo`` (``torch.export``-based, the
            exporter PyTorch is moving to; same graphs, ~10x slower to export here).

    Returns:
        ``OnnxExport`` (files, per-layer forms, the manifest).

    Raises:
        ValueError: an unsupported model family, bit width, format or granularity, dynamic or
            uncalibrated activation quantization — before anything is written.
    """
    path = Path(path)
    vlm, adapter, heads = resolve_vlm(model, adapter)
    _check_exporter(exporter)
    plans = plan_model(model, precision, int8_weights)
    check_destination(path, overwrite=overwrite)
    facts = vlm_image_facts(vlm, adapter)
    names = adapter.module_names()
    text = vlm.config.get_text_config()
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    height, width = facts["image_size"]
    grid = tuple(facts["grid"])
    prefix = 0 if facts["drop_class_token"] else 1

    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    graphs: dict[str, dict] = {}
    try:
        with torch.no_grad(), swapped_layers(model, plans, exporter):
            tower = vlm.get_submodule(names.vision)
            vision = VisionGraph(tower, facts["feature_layers"], facts["drop_class_token"])
            pixels = torch.randn(2, 3, height, width)
            features = vision(pixels)
            embeds = torch.randn(2, 7, hidden)
            mask = torch.ones(2, 7, dtype=torch.long)
            mask[0, :2] = 0  # trace the padded case, not an all-ones shortcut
            parts: list[tuple[str, nn.Module, tuple, list, list, dict]] = [
                ("embed_tokens", EmbedGraph(vlm.get_input_embeddings()),
                 (torch.zeros(2, 7, dtype=torch.long),), ["input_ids"], ["inputs_embeds"],
                 {"input_ids": {0: "batch", 1: "sequence"},
                  "inputs_embeds": {0: "batch", 1: "sequence"}}),
                ("vision", vision, (pixels,), ["pixel_values"], ["image_features"],
                 {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}}),
                ("projector", ProjectorGraph(vlm.get_submodule(names.projector)), (features,),
                 ["image_features"], ["image_embeds"],
                 {"image_features": {0: "batch", 1: "tokens"},
                  "image_embeds": {0: "batch", 1: "tokens"}}),
                ("language_model", LanguageGraph(vlm.get_submodule(names.language_model),
                                             vlm.get_submodule(names.lm_head)),
                 (embeds, mask), ["inputs_embeds", "attention_mask"], ["logits"],
                 {"inputs_embeds": {0: "batch", 1: "sequence"},
                  "attention_mask": {0: "batch", 1: "sequence"},
                  "logits": {0: "batch", 1: "sequence"}}),
            ]  # fmt: skip
            if heads is not None and heads.detection_head is not None:
                parts.append(
                    ("detection_head", DetectionGraph(heads.detection_head, prefix, grid,
                                                  facts["patch_size"]),
                     (features,), ["image_features"], ["cls_logits", "box_ltrb"],
                     {"image_features": {0: "batch"}, "cls_logits": {0: "batch"},
                      "box_ltrb": {0: "batch"}})
                )  # fmt: skip
            if heads is not None and heads.segmentation_head is not None:
                parts.append(
                    ("segmentation_head", SegmentationGraph(heads.segmentation_head, prefix, grid,
                                                        (height, width)),
                     (features,), ["image_features"], ["seg_logits"],
                     {"image_features": {0: "batch"}, "seg_logits": {0: "batch"}})
                )  # fmt: skip
            for name, module, args, inputs, outputs, dynamic in parts:
                file = tmp / f"{name}.onnx"
                _trace(module, args, file, inputs, outputs, dynamic, _blockwise(plans), exporter)
                _save_graph(file, 21)
                graphs[name] = {"file": file.name, "inputs": inputs, "outputs": outputs}
        adapter.save_pretrained(tmp / PROCESSOR_DIR)
        tokenizer = adapter.tokenizer
        manifest = {
            "format": ONNX_FORMAT,
            "format_version": ONNX_VERSION,
            "distiq_version": distiq.__version__,
            "precision": precision,
            "int8_weights": int8_weights,
            "exporter": exporter,
            "opset": 21,
            "graphs": graphs,
            "vlm": {
                "family": adapter.family,
                "model_class": type(vlm).__name__,
                "hidden_size": hidden,
                "vocab_size": vocab,
                "max_length": adapter.max_length,
                "image_token_id": adapter.image_token_id,
                "image_placeholder": adapter.image_placeholder,
                "prompt_template": adapter.format_prompt(QUESTION_SLOT),
                "add_special_tokens": adapter.add_special_tokens,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_ids": _eos_ids(vlm, tokenizer),
                "pad_token_id": tokenizer.pad_token_id,
                **facts,
            },
            "heads": _head_facts(heads, facts) if heads is not None else {},
            "layers": [vars(p) for p in plans],
            "sizes": {n: (tmp / g["file"]).stat().st_size for n, g in graphs.items()},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    log.info("exported %s (%s, %d quantized layers) to %s", type(vlm).__name__, precision,
             len(plans), path)  # fmt: skip
    return OnnxExport(
        path, precision, {n: path / g["file"] for n, g in graphs.items()}, plans, manifest
    )


def _eos_ids(vlm: nn.Module, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(vlm, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return sorted(int(i) for i in ids)


def _head_facts(heads: nn.Module, facts: dict) -> dict:
    out = {}
    if heads.detection_head is not None:
        out["detection"] = {
            "num_classes": heads.detection_head.num_classes,
            "stride": facts["patch_size"],
            "grid": facts["grid"],
        }
    if heads.segmentation_head is not None:
        out["segmentation"] = {"num_classes": heads.segmentation_head.num_classes}
    return out


def read_onnx_manifest(path: str | os.PathLike) -> dict:
    """Read and check ``path/manifest.json`` of an ONNX export."""
    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} has no {MANIFEST_FILE}: not an ONNX export (write one with "
            "distiq.export.export_onnx or `distiq export RUN_DIR --format onnx`)"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); the file is corrupt") from None
    problems = []
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT:
        raise ValueError(f"{file} is not a distiq ONNX manifest (format {ONNX_FORMAT!r})")
    if manifest.get("format_version") != ONNX_VERSION:
        problems.append(f"format_version {manifest.get('format_version')!r} is not supported")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict):
        problems.append("graphs must be a mapping")
    else:
        for name in ("embed_tokens", "vision", "projector", "language_model"):
            if not isinstance(graphs.get(name), dict):
                problems.append(f"graph {name!r} is missing")
        for name, entry in graphs.items():
            if not isinstance(entry, dict):
                continue
            try:  # a plain name inside the export, checked before anything is opened
                graph = member_file(path, entry.get("file"), f"graphs[{name!r}].file")
            except UnsafeFileError as exc:
                problems.append(str(exc))
                continue
            if not graph.is_file():
                problems.append(f"graph {name!r} is missing (no file {graph.name})")
    if not isinstance(manifest.get("vlm"), dict):
        problems.append("vlm facts are missing")
    if problems:
        raise ValueError(f"{file} is not a usable distiq ONNX export: " + "; ".join(problems))
    return manifest
