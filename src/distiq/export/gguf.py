"""``export_gguf``: a run's model as llama.cpp GGUF files, low-bit weights code for code.

Writes, into one directory::

    model.gguf       the language model (llama.cpp architecture per ``distiq.export.gguf_text``)
                     with the tokenizer llama.cpp needs (``distiq.export.gguf_vocab``)
    mmproj.gguf      the vision encoder + projector, for the families llama.cpp's multimodal
                     library covers (``distiq.export.gguf_mmproj``): LLaVA, Idefics3 / SmolVLM,
                     Qwen2-VL / Qwen2.5-VL, Gemma 3
    manifest.json    what was written: every tensor's source, ggml type and exactness, the
                     tokenizer, what was left out, and the read-back verification

Run them with ``llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf`` (or ``llama-cli`` for text).

Quantized layers are written on the run's own grid: their integer codes and scales are packed
into llama.cpp blocks (``distiq.export.gguf_grid``: Q4_0 / Q5_0 / Q8_0), so llama.cpp's
dequantized weights are bit for bit the evaluated ones. Letting llama.cpp re-quantize the
dequantized weights instead would round many codes differently (its Q4_0 scale is the block's
signed maximum over -8, not the trained scale) and undo the training. A grid llama.cpp does not
have is refused with the list of those it has, unless ``fallback`` asks for float tensors:
``"f32"`` (the dequantized weights, exact, 32 bits each) or ``"f16"`` (rounded: not exact);
either is recorded per tensor. Unquantized tensors are written as F32 (exact; norms and other
1-D tensors always, as llama.cpp requires), or F16 with ``float_type="f16"``.

What GGUF does not carry is said in the manifest: activation quantization (llama.cpp quantizes
activations its own way inside its kernels) and distiq's task heads.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.export.gguf_grid import EXACT_GRIDS, BlockWeight, GridError, to_blocks
from distiq.export.gguf_mmproj import MMPROJ_FAMILIES, MmprojSpec, check_single_tokens
from distiq.export.gguf_text import (
    Mapped,
    map_text_tensors,
    rope_freq_factors,
    text_arch,
    text_config,
    write_text_metadata,
)
from distiq.export.gguf_vocab import build_vocab
from distiq.export.layers import QuantizedWeight, is_quantized, quantized_weight

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
MANIFEST_FILE = "manifest.json"
GGUF_FORMAT = "distiq.gguf"
FALLBACKS = (None, "f32", "f16")


@dataclass
class Tensor:
    """One tensor as written: its GGUF name, ggml type, payload and provenance."""

    name: str
    source: str
    ggml_type: str
    data: Any  # numpy: float32 / float16 values, or uint8 blocks
    expected: torch.Tensor  # float32 values llama.cpp will read (the verification's reference)
    exact: bool  # expected == the run's effective weight, bit for bit
    note: str = ""


@dataclass
class GGUFFile:
    """The tensors and metadata writer of one GGUF file."""

    arch: str
    tensors: list[Tensor] = field(default_factory=list)


def _sources(model: nn.Module) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], set[str]]:
    """``{tensor name: float tensor | QuantizedWeight}``, their shapes, and the names of
    parameters that share storage with an earlier one (tied weights)."""
    sources: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    seen: dict[int, str] = {}
    tied: set[str] = set()
    from distiq.quant.quantizers import ActivationQuantizer, WeightQuantizer

    for module_name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer | WeightQuantizer):
            continue  # qparams: carried by the packed blocks, or not by GGUF at all
        prefix = f"{module_name}." if module_name else ""
        qw = quantized_weight(module) if is_quantized(module) else None
        if qw is not None:
            sources[prefix + "weight"] = qw
            shapes[prefix + "weight"] = tuple(qw.weight_shape)
        for name, param in module.named_parameters(recurse=False):
            if qw is not None and name == "weight":
                continue
            if id(param) in seen:
                tied.add(prefix + name)
            seen.setdefault(id(param), prefix + name)
            sources[prefix + name] = param.detach()
            shapes[prefix + name] = tuple(param.shape)
    return sources, shapes, tied


def _float_tensor(
    entry: Mapped, values: torch.Tensor, float_type: str, *, exact: bool, note: str = ""
) -> Tensor:
    values = values.detach().to(torch.float32)
    if entry.rows is not None:
        values = values[entry.rows]
    if entry.transform is not None:
        values = entry.transform(values)
    if entry.shift:
        values = values + entry.shift
    values = values.contiguous()
    if float_type == "f16" and values.dim() > 1:
        half = values.to(torch.float16)
        same = torch.equal(half.float(), values)
        return Tensor(entry.gguf_name, entry.source, "F16", half.numpy(), half.float(),
                      exact and same, note)  # fmt: skip
    return Tensor(entry.gguf_name, entry.source, "F32", values.numpy(), values, exact, note)


def _tensor(entry: Mapped, value: Any, fallback: str | None, float_type: str, errors: list):
    """The written form of ``value`` under ``entry``; a grid error goes to ``errors``."""
    if not isinstance(value, QuantizedWeight):
        note = f"+{entry.shift:g} (llama.cpp's form of Gemma's (1 + w) norm)" if entry.shift else ""
        return _float_tensor(entry, value, float_type, exact=True, note=note)
    effective = value.dequantized()
    if len(value.weight_shape) != 2:  # a quantized convolution: ggml convolves float kernels
        return _float_tensor(entry, effective, "f32", exact=True, note="quantized conv as F32")
    try:
        blocks: BlockWeight = to_blocks(
            entry.source, value.codes, value.scale, value.zero_point, value.spec, value.g_idx
        )
    except GridError as exc:
        if fallback is None:
            errors.append(exc)
            return None
        note = f"{value.spec.bits}-bit grid has no llama.cpp block: {fallback.upper()} fallback"
        return _float_tensor(entry, effective, fallback, exact=True, note=note)
    if entry.rows is not None:
        blocks = blocks.take_rows(entry.rows)
        effective = effective[entry.rows]
    expected = blocks.dequantize()
    exact = torch.equal(expected, effective)
    return Tensor(entry.gguf_name, entry.source, blocks.fmt.name, blocks.pack(), expected, exact)


def _file_type(tensors: list[Tensor]) -> int:
    import gguf

    counts: dict[str, int] = {}
    for t in tensors:
        if t.ggml_type.startswith("Q"):
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + t.expected.numel()
    if not counts:
        has_f16 = any(t.ggml_type == "F16" for t in tensors)
        return gguf.LlamaFileType.MOSTLY_F16 if has_f16 else gguf.LlamaFileType.ALL_F32
    return getattr(gguf.LlamaFileType, f"MOSTLY_{max(counts, key=counts.get)}")


def _write(path: Path, arch: str, name: str, tensors: list[Tensor], metadata) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    metadata(writer)
    writer.add_file_type(_file_type(tensors))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_bool("distiq.exact", all(t.exact for t in tensors))
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=getattr(gguf.GGMLQuantizationType, t.ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def verify_file(path: Path, tensors: list[Tensor]) -> dict:
    """Read ``path`` back with gguf-py's reader and dequantizer and compare every tensor with
    what was meant to be written, bit for bit; raises RuntimeError on any difference."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    for t in tensors:
        read = found.get(t.name)
        if read is None or read.tensor_type.name != t.ggml_type:
            raise RuntimeError(f"{path}: tensor {t.name} is missing or not {t.ggml_type}")
        values = gguf.quants.dequantize(read.data, read.tensor_type)
        if not np.array_equal(values.reshape(t.expected.shape), t.expected.numpy()):
            raise RuntimeError(
                f"{path}: tensor {t.name} does not read back as written; this is a bug in "
                "distiq's GGUF writer, please report it"
            )
    return {"tensors": len(tensors), "read_back_identical": True}


def _check_options(fallback: str | None, float_type: str) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None, 'f32' or 'f16', got {fallback!r}")
    if float_type not in ("f32", "f16"):
        raise ValueError(f"float_type must be 'f32' or 'f16', got {float_type!r}")


def export_gguf(
    model: nn.Module,
    path: str | Path,
    *,
    adapter: Any,
    name: str = "model",
    fallback: str | None = None,
    float_type: str = "f32",
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> dict:
    """Write ``model`` as ``path/model.gguf`` (+ ``path/mmproj.gguf``) and ``path/manifest.json``.

    Args:
        model: a loaded run's model (``distiq.export.load_run``): quantized layers as
            ``QuantizedLinear`` (or fake-quant layers), a Hugging Face VLM or ``VLMWithHeads``.
        path: the output folder, written whole (``distiq.export.files``).
        adapter: the model's adapter (its tokenizer and image processor are read).
        name: ``general.name`` of the files.
        fallback: for layers whose grid llama.cpp lacks: None (refuse), ``"f32"`` (dequantized,
            exact) or ``"f16"`` (rounded).
        float_type: ``"f32"`` (exact) or ``"f16"`` for unquantized matrices (1-D tensors stay
            F32).
        tokenizer_pre: llama.cpp's pre-tokenizer name when distiq does not recognise the
            tokenizer's (``distiq.export.gguf_vocab``).
        overwrite: replace an earlier distiq export in ``path`` (nothing else is replaced).
        verify: read the files back and compare every tensor (recorded in the manifest).

    Returns:
        The manifest (also written as ``path/manifest.json``).

    Raises:
        TokenizerError, ArchitectureError, GridError (all ValueError): what llama.cpp cannot
            hold; FileExistsError: a ``path`` that may not be replaced — all before anything is
            written. RuntimeError: a file that does not read back as written.
    """
    from distiq.export.files import check_destination, replace_directory, staging_dir

    _check_options(fallback, float_type)
    path = check_destination(path, overwrite=overwrite)
    from distiq.models.multitask import unwrap_vlm

    vlm = unwrap_vlm(model)
    config = vlm.config
    names = adapter.module_names()
    sources, shapes, tied = _sources(vlm)
    embed = f"{names.language_model}.{adapter.text_embeddings}.weight"
    if embed not in sources:
        raise ValueError(f"the model has no token embedding {embed!r}")
    n_vocab = int(shapes[embed][0])
    vocab = build_vocab(adapter.tokenizer, n_vocab, tokenizer_pre=tokenizer_pre)
    arch = text_arch(config)
    text_names = [n for n in sources if n not in tied]
    text_entries = map_text_tensors(text_names, config, names.language_model, names.lm_head)
    mmproj, vision_entries = None, []
    if config.model_type in MMPROJ_FAMILIES:
        check_single_tokens(config.model_type, adapter.tokenizer)
        mmproj = MmprojSpec(config, adapter.image_processor, names.vision, names.projector)
        vision_entries = mmproj.map_tensors(list(sources), shapes)
    errors: list[GridError] = []
    text = [_tensor(e, sources[e.source], fallback, float_type, errors) for e in text_entries]
    factors = rope_freq_factors(config)
    if factors is not None:  # computed, not a model tensor: exact by construction
        text.append(Tensor("rope_freqs.weight", "rope_parameters (llama3)", "F32",
                           factors.numpy(), factors, True))  # fmt: skip
    vision = [_tensor(e, sources[e.source], fallback, float_type, errors) for e in vision_entries]
    if errors:
        raise _grid_error(errors)
    tmp = staging_dir(path)
    try:
        _write(tmp / MODEL_FILE, arch.gguf_name, name, text,
               lambda w: (write_text_metadata(w, config, arch, n_vocab), vocab.write(w)))  # fmt: skip
        if mmproj is not None:
            _write(tmp / MMPROJ_FILE, "clip", f"{name} mmproj", vision, mmproj.write)
        manifest = _manifest(model, vlm, arch.gguf_name, mmproj, vocab, fallback, float_type,
                             text, vision)  # fmt: skip
        if verify:
            manifest["verification"] = {"model": verify_file(tmp / MODEL_FILE, text)}
            if mmproj is not None:
                manifest["verification"]["mmproj"] = verify_file(tmp / MMPROJ_FILE, vision)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        replace_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("GGUF export %s: %s", path, manifest["summary"])
    return manifest


def _grid_error(errors: list[GridError]) -> GridError:
    layers = [str(e).split(". llama.cpp holds")[0] for e in errors]
    return GridError(
        f"{len(errors)} quantized layer(s) are on grids llama.cpp does not have:\n  "
        + "\n  ".join(layers[:10])
        + ("\n  ..." if len(layers) > 10 else "")
        + "\nllama.cpp holds these grids exactly: "
        + "; ".join(EXACT_GRIDS)
        + ". Re-train on one of them (e.g. recipes/qad-q4_0.yaml), or pass fallback='f32' "
        "(--gguf-fallback f32: the dequantized weights, exact, 32 bits each) or 'f16' (rounded)"
    )


def _manifest(model, vlm, arch, mmproj, vocab, fallback, float_type, text, vision) -> dict:
    activation = sorted(
        n for n, m in vlm.named_modules() if is_quantized(m) and getattr(m, "act_quant", None)
    )
    everything = text + vision
    types: dict[str, int] = {}
    for t in everything:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    return {
        "format": GGUF_FORMAT,
        "files": {"model": MODEL_FILE, "mmproj": MMPROJ_FILE if mmproj else None},
        "family": vlm.config.model_type,
        "architecture": arch,
        "projector_type": mmproj.metadata["projector_type"] if mmproj else None,
        "mmproj_missing_reason": None
        if mmproj
        else f"llama.cpp's multimodal library has no projector for {vlm.config.model_type!r} "
        f"(it covers {', '.join(MMPROJ_FAMILIES)}): the language model only",
        "fallback": fallback,
        "float_type": float_type,
        "summary": {
            "tensors": len(everything),
            "ggml_types": types,
            "all_exact": all(t.exact for t in everything),
            "fallback_tensors": [t.name for t in everything if "fallback" in t.note],
            "not_exact": [t.name for t in everything if not t.exact],
        },
        "not_carried": {
            "activation_quantization": activation
            and "llama.cpp does not simulate distiq's activation quantizers (it quantizes "
            f"activations its own way in its kernels): {len(activation)} layers",
            "task_heads": "distiq's detection / segmentation heads" if model is not vlm else None,
        },
        "tokenizer": vocab.summary(),
        "text_config": {"model_type": text_config(vlm.config).model_type},
        "tensors": {
            t.name: {"source": t.source, "type": t.ggml_type, "exact": t.exact, "note": t.note}
            for t in everything
        },
        "exact_grids": list(EXACT_GRIDS),
    }
