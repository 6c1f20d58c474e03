"""Packed low-bit checkpoints: ``save_packed`` / ``load_packed``.

A packed checkpoint is a directory::

    manifest.json        per-layer bits, format, granularity, group size, symmetry, specs,
                         distiq version, the weights file's SHA-256 (see ``manifest``)
    model.safetensors    packed codes, scales, zero-points, g_idx, activation qparams, and every
                         other tensor of the model in full precision ("fp leftovers")
    config.json, ...     for Hugging Face models: the config and the processor (tokenizer, image
                         processor, chat template), so ``load_packed(path)`` rebuilds the model

Loading never unpickles: JSON and safetensors only. ``load_packed`` rebuilds each quantized layer
as ``QuantizedLinear`` (``distiq.quant``) or ``QuantizedConv2d`` (``distiq.export.layers``) whose
forward is *identical* (``atol=0``) to the fake-quant layer it was saved from: the codes,
zero-points and scales are stored losslessly and the dequantize-then-matmul arithmetic is the
fake-quant module's. Scales are stored in each layer's ``QuantSpec.scale_dtype`` (the default,
``scale_dtype=None``): a spec with ``scale_dtype="float16"`` trains with float16-representable
scales, so its checkpoint holds 16-bit scales *and* stays exact (subnormal float16 scales
included). Each layer entry of the manifest records the dtype its scales were stored in
(``"scale_dtype"``); the manifest's top-level ``scale_dtype`` is the dtype they share
(``float32`` when layers differ). A scale that is not a value of its spec's dtype (a
``QuantizedLinear`` built by hand from other scales) is stored as float32, with a warning. Two
documented exceptions to exactness:

- an explicit ``scale_dtype="float16"`` / ``"bfloat16"`` rounds float32-trained scales to 16 bits
  (smaller file); each dequantized weight then moves by a relative ``≤ 2⁻¹¹`` (float16; ``2⁻⁸``
  bfloat16), so a layer output moves by ``≤ 2⁻¹¹ · (|x̂| @ |Ŵ|ᵀ)`` plus float32 rounding. Save
  checks that every scale is a normal float16 number or exactly representable (else it raises and
  nothing is written).
- ``load_packed(..., int_matmul=True)`` runs eligible W8A8 layers with ``torch._int_mm``; equal to
  the fake-quant output up to float rounding (bound in ``distiq.quant.quantized``).

Size: a 4-bit weight with groups of 64 costs 4 bits + one scale per 64 weights (32 bits: 4.5
bits per weight; 16-bit scales: 4.25); activation qparams stay float32 (a few values per
layer); symmetric zero-points are implicit (not stored) and asymmetric ones are packed at the
code width. ``SizeBreakdown`` reports codes, scales, zero-points, group indices, activation
qparams, fp leftovers and header bytes against the fp32 size of the same model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
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
    sha256_file,
    staging_dir,
)
from distiq.export.layers import (
    QuantizedConv2d,
    activation_quantizer,
    is_quantized,
    quantized_weight,
    uncalibrated,
)
from distiq.export.manifest import (
    HF_CONFIG_FILE,
    MANIFEST_FILE,
    PACKED_FORMAT,
    PACKED_VERSION,
    WEIGHTS_FILE,
    PackedCheckpointError,
    guard_config,
    implied_zero_point,
    read_manifest,
)
from distiq.export.scales import common_scale_dtype, stored_scales
from distiq.export.sizes import SizeBreakdown
from distiq.quant import FakeQuantConv2d, QuantSpec
from distiq.quant.functional import SCALE_DTYPES
from distiq.quant.packing import pack

log = logging.getLogger(__name__)


# -- saving ---------------------------------------------------------------------------------------
def _zero_points(qw, spec: QuantSpec, where: str) -> tuple[str, dict[str, torch.Tensor]]:
    zero = qw.zero_point.to(torch.float32)
    implied = implied_zero_point(spec)
    if implied is not None and bool((zero == implied).all()):
        return "implicit", {}
    integral = bool((zero == torch.round(zero)).all())
    inside = bool(((zero >= spec.quant_min) & (zero <= spec.quant_max)).all())
    if spec.format == "int" and integral and inside:
        packed = pack(zero.to(torch.int64), spec.bits, signed=spec.is_signed)
        return "packed", {"qzeros": packed}
    log.info("%s: zero-points outside the code grid are stored as float32", where)
    return "float32", {"zeros": zero.contiguous()}


def _module_entry(name: str, module: nn.Module, scale_dtype: str | None, spec_index):
    """(manifest entry, {suffix: tensor}, {suffix: byte category}) for one quantized layer
    (``scale_dtype`` None: the weight spec's ``scale_dtype``)."""
    is_conv = isinstance(module, FakeQuantConv2d | QuantizedConv2d)
    act = activation_quantizer(module)
    qw = quantized_weight(module)
    entry: dict[str, Any] = {"bias": module.bias is not None}
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    if is_conv:
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        entry["conv"] = {
            "stride": list(module.stride),
            "padding": padding,
            "dilation": list(module.dilation),
            "groups": module.groups,
        }
    if qw is None:  # activation-only fake quantization: the float weight is a leftover
        entry.update(
            type="fake_conv2d" if is_conv else "fake_linear",
            weight_shape=list(module.weight.shape),
            weight_spec=None,
            zero_point=None,
            num_groups=None,
        )
        tensors["weight"], kinds["weight"] = module.weight.detach().contiguous(), "fp"
    else:
        spec = qw.spec
        zero_mode, zero_tensors = _zero_points(qw, spec, name)
        codes = qw.codes
        if spec.format == "fp8_e4m3":
            codes = codes.view(torch.uint8) if codes.dtype != torch.uint8 else codes
        signed = spec.format == "int" and spec.is_signed
        tensors["qweight"], kinds["qweight"] = pack(codes, qw.code_bits, signed=signed), "codes"
        scales, stored_dtype = stored_scales(qw.scale.detach(), spec, scale_dtype, name)
        tensors["scales"], kinds["scales"] = scales.contiguous(), "scale"
        for key, value in zero_tensors.items():
            tensors[key], kinds[key] = value, "zero_point"
        if qw.g_idx is not None:
            tensors["g_idx"], kinds["g_idx"] = qw.g_idx.to(torch.int32).contiguous(), "index"
        entry.update(
            type="conv2d" if is_conv else "linear",
            weight_shape=list(qw.weight_shape),
            bits=spec.bits,
            format=spec.format,
            granularity=spec.granularity._to_config(),
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            signed=spec.is_signed,
            weight_spec=spec_index(spec),
            zero_point=zero_mode,
            num_groups=int(qw.scale.shape[1]) if qw.g_idx is not None else None,
            scale_dtype=stored_dtype,
        )
    entry["activation_spec"] = spec_index(act.spec.replace(learnable=False)) if act else None
    if act is not None and act.static:
        scale, zero = act.qparams()
        tensors["input_scale"], kinds["input_scale"] = scale.float().contiguous(), "activation"
        tensors["input_zero_point"] = zero.float().contiguous()
        kinds["input_zero_point"] = "activation"
    if module.bias is not None:
        tensors["bias"], kinds["bias"] = module.bias.detach().contiguous(), "fp"
    return entry, tensors, kinds


def _model_info(model: nn.Module, adapter) -> tuple[dict, Any, Any]:
    """(manifest "model" entry, the HF model to save a config of, the adapter)."""
    from distiq.models import VLMWithHeads

    if isinstance(model, VLMWithHeads):
        vlm = model.vlm
        kind, adapter = "hf+heads", adapter or model.base_adapter
    elif hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        vlm, kind = model, "hf"
    else:
        vlm, kind = None, "module"
    info = {"kind": kind, "class": type(model).__name__}
    if vlm is not None:
        info["class"] = type(vlm).__name__
        info["attn_implementation"] = getattr(vlm.config, "_attn_implementation", None)
    return info, vlm, adapter


def _unique(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, cloned where two share storage (safetensors refuses sharing)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ident in seen:
            value = value.clone()
        seen.add(ident)
        out[key] = value
    return out


def _save_hf_config(vlm: nn.Module, folder: Path) -> None:
    """The model's config as ``hf_config.json`` beside a guard ``config.json`` (see
    ``distiq.export.manifest``), and its generation config."""
    vlm.config.to_json_file(folder / HF_CONFIG_FILE)
    (folder / "config.json").write_text(json.dumps(guard_config(type(vlm).__name__), indent=2))
    if getattr(vlm, "generation_config", None) is not None:
        vlm.generation_config.save_pretrained(folder)


def save_packed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter: Any = None,
    scale_dtype: str | None = None,
    leftover_dtype: str = "float32",
    overwrite: bool = False,
) -> SizeBreakdown:
    """Write ``model``'s quantized layers as packed codes (see the module docstring).

    Args:
        model: a model with ``FakeQuantLinear`` / ``FakeQuantConv2d`` (after ``quantize_``
            prepare and, for static activations, calibration), ``QuantizedLinear`` or
            ``QuantizedConv2d`` layers. A Hugging Face model or ``VLMWithHeads`` also gets its
            config (and, with ``adapter``, its processor) saved so ``load_packed(path)`` can
            rebuild it; any other module loads with ``load_packed(path, model=float_twin)``.
        path: the directory to write (created; written to a temporary directory first and
            renamed when complete).
        adapter: the model's ``VLMAdapter`` (its processor is saved with the weights).
        scale_dtype: None (default): each layer's scales in its weight spec's ``scale_dtype``
            (exact); ``float32`` (exact), ``float16`` or ``bfloat16``: every layer's scales in
            that dtype (smaller, not exact for float32-trained scales; see above).
        leftover_dtype: dtype of the full-precision tensors (embeddings, norms, biases,
            unquantized layers): ``float32`` (exact) or ``float16`` / ``bfloat16`` (half the
            bytes; those tensors are then rounded to 16 bits, relative error ``2⁻¹¹`` /
            ``2⁻⁸``, and the loaded model is no longer identical).
        overwrite: replace an earlier export in ``path`` (a folder holding anything else is
            never replaced: ``distiq.export.files.check_destination``).

    Returns:
        The ``SizeBreakdown`` (also logged).

    Raises:
        ValueError: nothing to pack, static activation scales never calibrated, scales that do
            not fit ``scale_dtype``, token-importance layers — all before anything is written.
        FileExistsError: ``path`` is not empty and ``overwrite`` is off, or holds something
            other than a distiq export.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype must be None (each layer's spec.scale_dtype) or one of "
            f"{', '.join(SCALE_DTYPES)}, got {scale_dtype!r}"
        )
    quantized = {name: m for name, m in model.named_modules() if is_quantized(m)}
    if not quantized:
        raise ValueError(
            "the model has no quantized layer to pack: run distiq.quant.quantize_(model, config) "
            "(and training or calibration) first; a float model needs no packed format"
        )
    missing = uncalibrated(model)
    if missing:
        raise ValueError(
            f"{len(missing)} layer(s) have static activation quantizers that were never "
            f"calibrated (activation scales missing), e.g. {', '.join(missing[:3])}: run "
            "`with distiq.quant.calibration(model): model(batch)` on calibration data first"
        )
    check_destination(path, overwrite=overwrite)

    manifest_modules: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    sizes = SizeBreakdown()
    category = {}
    specs: list[dict] = []

    def spec_index(spec: QuantSpec) -> int:
        data = spec.to_dict()
        if data not in specs:
            specs.append(data)
        return specs.index(data)

    for name, module in quantized.items():
        entry, layer_tensors, kinds = _module_entry(name, module, scale_dtype, spec_index)
        manifest_modules[name] = entry
        for suffix, value in layer_tensors.items():
            tensors[f"{name}.{suffix}"] = value
            category[f"{name}.{suffix}"] = kinds[suffix]
        weight_numel = int(torch.Size(entry["weight_shape"]).numel())
        sizes.fp32_bytes += 4 * weight_numel
        if entry["type"] in ("linear", "conv2d"):
            sizes.quantized_params += weight_numel
        if module.bias is not None:
            sizes.fp32_bytes += 4 * module.bias.numel()
    prefixes = tuple(f"{name}." for name in quantized)
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        tensors[key] = value
        category[key] = "fp"
        sizes.fp32_bytes += 4 * value.numel() if value.is_floating_point() else value.nbytes
    tensors = _unique(tensors)
    if leftover_dtype != "float32":
        target = SCALE_DTYPES[leftover_dtype]
        for key, value in tensors.items():
            if category[key] == "fp" and value.is_floating_point():
                tensors[key] = value.to(target)
    for key, value in tensors.items():
        kind = category[key]
        nbytes = value.numel() * value.element_size()
        attr = {
            "codes": "codes_bytes",
            "scale": "scale_bytes",
            "zero_point": "zero_point_bytes",
            "index": "index_bytes",
            "activation": "activation_bytes",
            "fp": "fp_bytes",
        }[kind]
        setattr(sizes, attr, getattr(sizes, attr) + nbytes)
        if kind == "fp":
            sizes.fp_params += value.numel()

    model_info, vlm, adapter = _model_info(model, adapter)
    tmp = staging_dir(path)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": PACKED_FORMAT})
        if vlm is not None:
            _save_hf_config(vlm, tmp)
        if model_info["kind"] == "hf+heads":
            from distiq.models.multitask import HEADS_CONFIG

            settings = {
                key: getattr(model, key).settings
                for key in ("detection_head", "segmentation_head")
                if getattr(model, key) is not None
            }
            (tmp / HEADS_CONFIG).write_text(json.dumps(settings, indent=2))
        if adapter is not None:
            adapter.save_pretrained(tmp)
        tensor_bytes = sum(v.numel() * v.element_size() for v in tensors.values())
        manifest = {
            "format": PACKED_FORMAT,
            "format_version": PACKED_VERSION,
            "distiq_version": distiq.__version__,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "scale_dtype": common_scale_dtype(manifest_modules),
            "leftover_dtype": leftover_dtype,
            "specs": specs,
            "model": model_info,
            "modules": manifest_modules,
        }
        files = [f for f in tmp.iterdir() if f.is_file()]
        sizes.processor_bytes = sum(f.stat().st_size for f in files if f.name != WEIGHTS_FILE)
        st_header = (tmp / WEIGHTS_FILE).stat().st_size - tensor_bytes
        for _ in range(3):  # the size entry is part of what it measures: settle its digits
            text = json.dumps({**manifest, "size": sizes.to_dict()}, separators=(",", ":"))
            header = st_header + len(text.encode())
            if header == sizes.header_bytes:
                break
            sizes.header_bytes = header
        (tmp / MANIFEST_FILE).write_text(text)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("packed %d layers into %s\n%s", len(quantized), path, sizes.table())
    return sizes


def packed_size(path: str | os.PathLike) -> SizeBreakdown:
    """The ``SizeBreakdown`` recorded in a packed checkpoint's manifest (headers re-measured)."""
    manifest = read_manifest(path)
    data = dict(manifest.get("size") or {})
    fields = {f.name for f in dataclasses.fields(SizeBreakdown)}
    return SizeBreakdown(**{k: v for k, v in data.items() if k in fields})


# -- loading --------------------------------------------------------------------------------------
def load_packed(
    path: str | os.PathLike, model: nn.Module | None = None, *, int_matmul: bool = False
) -> nn.Module:
    """Rebuild a model from a packed checkpoint (never unpickles).

    Args:
        path: the directory ``save_packed`` wrote.
        model: a model of the same architecture to fill in place (float, or fake-quant): its
            layers named in the manifest are replaced by ``QuantizedLinear`` /
            ``QuantizedConv2d`` and every other tensor is loaded. None rebuilds a Hugging Face
            model (or ``VLMWithHeads``) from the config saved beside the weights.
        int_matmul: run W8A8-eligible linear layers with the int8 matmul (``torch._int_mm``).

    Returns:
        The model (eval mode) whose quantized layers compute exactly as the saved fake-quant
        layers (see the module docstring for the exceptions).

    Raises:
        PackedCheckpointError: missing / corrupt manifest or weights, a weights file whose
            SHA-256 differs from the manifest's, tensors that do not match the manifest, or a
            ``model`` whose layers do not match.
    """
    from distiq.export.unpack import build_model, install_layers

    path = Path(path)
    manifest = read_manifest(path)
    if model is None and manifest["model"]["kind"] == "module":
        raise PackedCheckpointError(
            f"{path} holds a plain nn.Module ({manifest['model'].get('class')}); pass a model of "
            "that architecture: load_packed(path, model=...)"
        )
    try:
        weights = member_file(path, manifest["weights_file"], f"{MANIFEST_FILE} weights_file")
    except UnsafeFileError as exc:
        raise PackedCheckpointError(str(exc)) from None
    if not weights.is_file():
        raise PackedCheckpointError(
            f"{path} has no {manifest['weights_file']} (the manifest names it)"
        )
    if sha256_file(weights) != manifest["weights_sha256"]:
        raise PackedCheckpointError(
            f"{weights} does not match the SHA-256 in {MANIFEST_FILE}: the file is corrupt or was "
            "replaced; export the checkpoint again"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise PackedCheckpointError(f"cannot read {weights}: {exc}") from None
    if model is None:
        model = build_model(path, manifest)
    install_layers(model, manifest, tensors, int_matmul=int_matmul)
    model.eval()
    return model


__all__ = ["SizeBreakdown", "load_packed", "packed_size", "save_packed"]
