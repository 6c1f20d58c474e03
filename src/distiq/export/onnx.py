"""``export_onnx``: a VLM as the three ONNX graphs of onnxruntime-genai's multimodal pipeline,
with a KV cache, plus a ``genai_config.json`` that ``onnxruntime_genai.Model(path)`` loads.

LLaVA (the built-in edge VLM included, optionally ``VLMWithHeads``), Idefics3 / SmolVLM and
Qwen2-VL models. ``export_onnx(model, path)`` writes::

    path/genai_config.json        onnxruntime-genai: model type, the three graphs with their
                                  input / output names, the cache geometry, token ids, search
    path/vision.onnx              pixels -> image_features (N, D): the rows that replace the N
                                  image tokens (see distiq.export.onnx_vision per family)
    path/embedding.onnx           input_ids (B, L) int64, image_features (N, D)
                                                                -> inputs_embeds (B, L, D)
    path/language_model.onnx      the decoder ("decoder" in genai_config.json):
                                  inputs_embeds (B, L, D), attention_mask (B, P + L) int64,
                                  position_ids (B, L) int64 ((3, B, L) for Qwen2-VL),
                                  past_key_values.N.key / .value (B, Hkv, P, hd)
                                    -> logits (B, L, V), present.N.key / .value (B, Hkv, P + L, hd)
    path/detection_head.onnx      vision_features -> cls_logits, box_ltrb   (VLMWithHeads)
    path/segmentation_head.onnx   vision_features -> seg_logits             (VLMWithHeads)
    path/tokenizer.json, ...      the tokenizer files, for onnxruntime_genai.Tokenizer
    path/processor/               the Hugging Face tokenizer, image processor and config
                                  (``distiq.export.ort.OrtVLM`` prepares inputs with them)
    path/manifest.json            format "distiq.onnx" version 2: graphs, precision, per-layer
                                  forms, prompt, image and cache facts, file sizes

A prompt runs the decoder once over all its tokens with an empty cache (P = 0); each new token
then runs it on that one token with the previous presents as pasts, so the work per new token
no longer re-runs the prompt. onnxruntime-genai drives exactly this (``distiq.export.onnx_genai``
says which model type each family uses and what genai can and cannot do with it);
``OrtVLM`` runs the same loop with onnxruntime alone.

Quantized layers become QDQ per ``distiq.export.onnx_quant`` (``precision`` ``int8``, ``int4``
(``MatMulNBits`` after onnxruntime's fusion) or ``fp32``), in every graph. Graphs are traced
with the TorchScript-based exporter by default (``torch.onnx.export(..., dynamo=False)``, opset
20, rewritten to opset 21 for INT4); ``exporter="dynamo"`` uses ``torch.export`` and writes the
same QDQ / INT4 forms (``distiq.export.onnx_dynamo``). Every file is written to a temporary
directory that is renamed to ``path`` when complete; all checks run before anything is written.
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
    MROPE_FAMILIES,
    DecoderGraph,
    decoder_part,
    embedding_part,
    head_parts,
    kv_geometry,
    language_parts,
    resolve_vlm,
)
from distiq.export.onnx_quant import (
    LayerPlan,
    finalize_graph,
    plan_model,
    swapped_layers,
)

log = logging.getLogger(__name__)

ONNX_FORMAT = "distiq.onnx"
ONNX_VERSION = 2
GRAPHS = ("vision", "embedding", "language_model")  # what every export has
MANIFEST_FILE = "manifest.json"
PROCESSOR_DIR = "processor"
GENAI_CONFIG = "genai_config.json"
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
                dynamic_shapes=_dynamic_shapes(module, inputs, dynamic),
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


def _dynamic_shapes(module: nn.Module, inputs: list[str], dynamic: dict) -> Any:
    """``dynamic_axes`` as torch.export's ``dynamic_shapes``: every named axis dynamic (sizes
    that must agree, such as the batch, are related by the trace itself). A forward taking
    ``*args`` (the decoder's cache) gets them as one tuple after the named parameters."""
    import inspect

    if not dynamic:
        return None
    axes = [{axis: torch.export.Dim.DYNAMIC for axis in dynamic.get(n, {})} for n in inputs]
    parameters = list(inspect.signature(module.forward).parameters.values())
    named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    if len(named) == len(parameters):
        return tuple(axes)
    return (*axes[: len(named)], tuple(axes[len(named) :]))


def _check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")


def _blockwise(plans: list[LayerPlan]) -> bool:
    return any(p.block_size is not None for p in plans)


# Protobuf cannot serialize a message over 2 GiB: larger graphs keep their weights in one
# external data file beside the graph (``<name>.onnx.data``), and are checked from disk.
LARGE_GRAPH_BYTES = 1_800_000_000


def _save_graph(file: Path, opset: int) -> None:
    """Finish the traced graph in ``file`` (opset, checks) and write it back: one file, or the
    graph plus ``<name>.onnx.data`` when it is too large for one protobuf message (the tracer's
    own external-data files are removed then)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(file), load_external_data=False)
    traced_data = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if traced_data:
        load_external_data_for_model(model, str(file.parent))
    proto = finalize_graph(model, opset)
    for name in traced_data:  # the tracer wrote them into the export's own temporary folder
        path = (file.parent / name).resolve()
        if path.parent == file.parent.resolve():
            path.unlink(missing_ok=True)
    # the initializers' bytes: ByteSize() itself fails on a message over 2 GiB
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weight_bytes <= LARGE_GRAPH_BYTES:
        onnx.checker.check_model(proto)
        onnx.save(proto, str(file))
        return
    data = file.with_name(file.name + ".data")
    data.unlink(missing_ok=True)  # save appends to an existing data file
    onnx.save(
        proto, str(file), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name,
    )  # fmt: skip
    onnx.checker.check_model(str(file))


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
        data = tmp / (file.name + ".data")
        if data.is_file():  # a large graph's weights: beside it, where the graph points
            os.replace(data, file.with_name(data.name))
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
    int4_accuracy_level: int | None = None,
) -> OnnxExport:
    """Export a VLM as onnxruntime-genai's vision / embedding / decoder graphs with a KV cache.

    Args:
        model: ``LlavaForConditionalGeneration`` (or ``VLMWithHeads``),
            ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` or
            ``Qwen2VLForConditionalGeneration`` — float, fake-quant after ``quantize_``, or with
            ``QuantizedLinear`` layers.
        path: output directory (see the module docstring for its contents).
        adapter: the model's ``VLMAdapter`` (not needed for ``VLMWithHeads``).
        precision: ``int8`` (8-bit per-channel weights, QDQ), ``int4`` (4-bit blockwise weights,
            opset-21 INT4) or ``fp32`` (dequantized float weights); activation quantization is
            kept as QDQ in all three (see ``distiq.export.onnx_quant``).
        int8_weights: ``auto`` / ``int8`` / ``uint8`` (see ``distiq.export.onnx_quant``).
        overwrite: replace an earlier distiq export in ``path`` (a folder holding anything else
            is never replaced: ``distiq.export.files.check_destination``).
        exporter: ``torchscript`` (default: fast) or ``dynamo`` (``torch.export``-based, the
            exporter PyTorch is moving to; same graphs, much slower to export).
        int4_accuracy_level: written into ``genai_config.json``'s session options as
            onnxruntime's ``MatMulNBits`` accuracy level (``0`` keeps float activations: the
            exported arithmetic; None leaves onnxruntime's default).

    Returns:
        ``OnnxExport`` (files, per-layer forms, the manifest).

    Raises:
        ValueError: an unsupported model family, bit width, format or granularity, dynamic or
            uncalibrated activation quantization, a decoder with sliding-window layers —
            before anything is written.
    """
    from distiq.export.onnx_genai import genai_config, write_genai_files
    from distiq.export.onnx_vision import vision_part

    path = Path(path)
    vlm, adapter, heads = resolve_vlm(model, adapter)
    _check_exporter(exporter)
    plans = plan_model(model, precision, int8_weights)
    check_destination(path, overwrite=overwrite)
    language_model, lm_head = language_parts(vlm, adapter)
    decoder = DecoderGraph(language_model, lm_head)  # checks the decoder
    geometry = kv_geometry(language_model)
    text = vlm.config.get_text_config()
    vocab = int(text.vocab_size)
    vision = vision_part(vlm, adapter, tower_features=heads is not None)
    mrope = adapter.family in MROPE_FAMILIES

    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    graphs: dict[str, dict] = {}
    try:
        with torch.no_grad(), swapped_layers(model, plans, exporter):
            # the swapped lm_head is a new module: the decoder must hold it, not the old one
            decoder = DecoderGraph(*language_parts(vlm, adapter))
            parts = [
                ("vision", vision.module, vision.example, vision.input_names,
                 vision.output_names, vision.dynamic_axes),
                embedding_part(vlm, adapter, geometry["hidden_size"]),
                decoder_part(decoder, geometry, mrope),
                *head_parts(heads, vision),
            ]  # fmt: skip
            for name, module, args, inputs, outputs, dynamic in parts:
                file = tmp / f"{name}.onnx"
                _trace(module, args, file, inputs, outputs, dynamic, _blockwise(plans), exporter)
                _save_graph(file, 21)
                graphs[name] = {"file": file.name, "inputs": inputs, "outputs": outputs}
        adapter.save_pretrained(tmp / PROCESSOR_DIR)
        vlm.config.save_pretrained(tmp / PROCESSOR_DIR)  # config.json: distiq.models.load_adapter
        tokenizer = adapter.tokenizer
        facts = {
            "family": adapter.family,
            "model_type": vlm.config.model_type,
            "model_class": type(vlm).__name__,
            "hidden_size": geometry["hidden_size"],
            "vocab_size": vocab,
            "max_length": adapter.max_length,
            "image_token_id": adapter.image_token_id,
            "image_placeholder": adapter.image_placeholder,
            "prompt_template": adapter.format_prompt(QUESTION_SLOT),
            "prompt_template_override": adapter.prompt_template,
            "add_special_tokens": adapter.add_special_tokens,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_ids": _eos_ids(vlm, tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "mrope": mrope,
            "kv_cache": geometry,
            **vision.facts,
        }
        config = genai_config(
            facts, vision, {n: g["file"] for n, g in graphs.items()}, int4_accuracy_level
        )
        write_genai_files(tmp, config, tmp / PROCESSOR_DIR)
        manifest = {
            "format": ONNX_FORMAT,
            "format_version": ONNX_VERSION,
            "distiq_version": distiq.__version__,
            "precision": precision,
            "int8_weights": int8_weights,
            "exporter": exporter,
            "opset": 21,
            "graphs": graphs,
            "genai": {"config": GENAI_CONFIG, "model_type": config["model"]["type"]},
            "vlm": facts,
            "heads": _head_facts(heads, vision.facts) if heads is not None else {},
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
    if manifest.get("format_version") == 1:
        raise ValueError(
            f"{file} is an ONNX export of an earlier distiq (format version 1: separate graphs "
            "without a KV cache); export the model again (`distiq export RUN_DIR --format onnx`)"
        )
    if manifest.get("format_version") != ONNX_VERSION:
        problems.append(f"format_version {manifest.get('format_version')!r} is not supported")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict):
        problems.append("graphs must be a mapping")
    else:
        for name in GRAPHS:
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
