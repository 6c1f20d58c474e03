"""Run directories -> exportable models (``load_run``).

A run directory is what ``distiq.train`` writes (``distiq.train.runs``)::

    config.json, model.safetensors, processor files   the model (Hugging Face directory) with
                                                       its *effective* weights: a quantized
                                                       layer's weight stored dequantized
    distiq_heads.json / .safetensors                   task heads (optional)
    quantization.json                                  {"version": 1, "modules": {name: {"type",
                                                       "weight": QuantSpec | null, "activation":
                                                       QuantSpec | null, "weights_from"}}}
    quant_state.safetensors                            <name>.weight_scale / .weight_zero_point,
                                                       <name>.act.scale / .act.zero_point
    results.json                                       distiq.results records

A teacher (float) run has no ``quantization.json``. ``load_run`` rebuilds the evaluated model
with real quantized layers: the integer codes are recovered from the effective weight as
``clamp(round(Ŵ · (1/s)) + z)`` and checked — ``dequantize(codes) == Ŵ`` bit for bit — so the
packed / ONNX model computes what was evaluated. A layer without stored qparams (nf4, fp8, some
PTQ layers) gets them from ``choose_qparams(Ŵ)`` and the same check; if that check fails the
layer cannot be exported exactly and ``load_run`` says which.

Every file of the run that is read is checked first to be a plain name resolving inside the run
directory (``distiq.export.files.member_file``): the fixed names above, and the shard names a
``model.safetensors.index.json`` lists.

Exporting a run (``export_run``, what ``distiq export`` calls) lives in
``distiq.export.run_export``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.export.files import UnsafeFileError, member_file
from distiq.export.layers import QuantizedConv2d, float_twin  # noqa: F401  (bench imports it here)
from distiq.quant import (
    FakeQuantConv2d,
    FakeQuantLinear,
    QuantizedLinear,
    QuantSpec,
    choose_qparams,
    dequantize,
    quantize,
)

log = logging.getLogger(__name__)

QUANT_MANIFEST = "quantization.json"
QUANT_STATE = "quant_state.safetensors"
RESULTS_FILE = "results.json"
EXPORT_DIR = "export"


class RunDirError(ValueError):
    """A run directory that cannot be exported: no model, or a corrupt quantization record."""


@dataclass
class LoadedRun:
    """A run's model with real quantized layers.

    Attributes:
        model: the Hugging Face VLM or ``VLMWithHeads`` (eval mode), quantized layers as
            ``QuantizedLinear`` / ``QuantizedConv2d`` (activation-only layers stay
            ``FakeQuantLinear`` with static qparams).
        adapter: the model's (unprefixed) adapter.
        modules: ``quantization.json``'s module entries ({} for a float run).
        path: the run directory.
    """

    model: nn.Module
    adapter: Any
    modules: dict[str, dict] = field(default_factory=dict)
    path: Path | None = None

    @property
    def quantized(self) -> bool:
        return bool(self.modules)


def run_file(path: Path, name: str) -> Path:
    """``path / name`` after ``member_file``'s check (a link leading out is a ``RunDirError``)."""
    try:
        return member_file(path, name, f"the run's {name}")
    except UnsafeFileError as exc:
        raise RunDirError(str(exc)) from None


def _check_weight_files(path: Path) -> None:
    """The model's weight files, and the shard names of a safetensors index, are members."""
    from distiq.models.multitask import HEADS_CONFIG, HEADS_WEIGHTS

    for name in ("model.safetensors", HEADS_CONFIG, HEADS_WEIGHTS):
        run_file(path, name)
    index = run_file(path, "model.safetensors.index.json")
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise RunDirError(f"{index} is not a valid safetensors index ({exc})") from None
    if not isinstance(weight_map, dict):
        raise RunDirError(f"{index}: weight_map must be a mapping")
    for shard in set(weight_map.values()):
        try:
            member_file(path, shard, f"{index.name} shard")
        except UnsafeFileError as exc:
            raise RunDirError(str(exc)) from None


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run directory as a Path; raises ``RunDirError`` when it holds no model."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist (or is not a directory)")
    if not run_file(path, "config.json").is_file():
        raise RunDirError(
            f"{path} holds no model (no config.json): point to a run directory written by "
            "`distiq teacher` / `distiq compress` (or any save_pretrained directory)"
        )
    _check_weight_files(path)
    return path


def read_quant_manifest(path: Path) -> dict[str, dict]:
    """``quantization.json``'s modules ({} when absent), every entry checked."""
    file = run_file(path, QUANT_MANIFEST)
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{file} is not valid JSON ({exc}); the run is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        raise RunDirError(f"{file} must be an object with a 'modules' mapping")
    if data.get("version") != 1:
        raise RunDirError(f"{file}: version {data.get('version')!r} is not supported (1)")
    errors = []
    for name, entry in data["modules"].items():
        if not isinstance(entry, dict):
            errors.append(f"{name}: entry must be a mapping")
            continue
        for key in ("weight", "activation"):
            value = entry.get(key)
            if value is None:
                continue
            try:
                QuantSpec.from_dict(value)
            except (ValueError, TypeError) as exc:
                errors.append(f"{name}.{key}: {exc}")
    if errors:
        raise RunDirError(f"{file} is not a valid quantization record:\n  " + "\n  ".join(errors))
    return data["modules"]


def _load_model(path: Path) -> tuple[nn.Module, Any]:
    from distiq.models import VLMWithHeads, dense_model_type, load, load_dense
    from distiq.models.multitask import HEADS_CONFIG

    if dense_model_type(path) is not None:  # a dense vision model (segmentation, ...)
        return load_dense(path)
    if (path / HEADS_CONFIG).is_file():
        model = VLMWithHeads.from_pretrained(path, attn_implementation="eager")
        return model, model.base_adapter
    vlm, adapter = load(path, attn_implementation="eager")
    return vlm, adapter


def _codes(name: str, weight: torch.Tensor, spec: QuantSpec, state: dict):
    """(codes, scale, zero) of an effective weight (2-D view), checked to dequantize to it."""
    w2d = weight.detach().float().reshape(weight.shape[0], -1)
    if f"{name}.weight_scale" in state:
        scale = state[f"{name}.weight_scale"].float()
        zero = state[f"{name}.weight_zero_point"].float()
    else:
        scale, zero = choose_qparams(w2d, spec)
    try:
        codes = quantize(w2d, scale, zero, spec)
        exact = torch.equal(dequantize(codes, scale, zero, spec), w2d)
    except (RuntimeError, ValueError):
        exact = False
    if not exact:
        raise RunDirError(
            f"layer {name!r}: its stored weight is not on the {spec.bits}-bit grid of its "
            f"qparams ({'stored' if f'{name}.weight_scale' in state else 'recomputed'}), so its "
            "codes cannot be recovered exactly; the run's quant_state.safetensors needs "
            f"{name}.weight_scale / .weight_zero_point"
        )
    return codes, scale, zero


def _activation(name: str, spec: QuantSpec | None, state: dict, features: int, axis: int):
    from distiq.quant.quantizers import ActivationQuantizer

    if spec is None:
        return None
    quantizer = ActivationQuantizer(spec.replace(learnable=False), features, axis)
    if quantizer.static:
        if f"{name}.act.scale" not in state:
            raise RunDirError(
                f"layer {name!r}: static activation scales are missing from {QUANT_STATE} (the "
                "model was never calibrated); calibrate and save the run again"
            )
        with torch.no_grad():
            quantizer.scale.copy_(state[f"{name}.act.scale"].reshape(quantizer.scale.shape))
            quantizer.zero_point.copy_(
                state[f"{name}.act.zero_point"].reshape(quantizer.zero_point.shape)
            )
            quantizer.calibrated.fill_(True)
            quantizer.num_batches.fill_(1)
    return quantizer


def _rebuild(model: nn.Module, name: str, entry: dict, state: dict) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise RunDirError(f"{QUANT_MANIFEST} names {name!r}, which the model lacks") from None
    weight_spec = QuantSpec.from_dict(entry["weight"]) if entry.get("weight") else None
    act_spec = QuantSpec.from_dict(entry["activation"]) if entry.get("activation") else None
    is_conv = isinstance(module, nn.Conv2d)
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise RunDirError(f"{name!r} is a {type(module).__name__}, not a linear or conv layer")
    features = module.in_channels if is_conv else module.in_features
    act = _activation(name, act_spec, state, features, 1 if is_conv else -1)
    if weight_spec is None:
        if act is None:
            return module
        cls = FakeQuantConv2d if is_conv else FakeQuantLinear
        fake = cls.from_float(module, None, act_spec)
        fake.act_quant = act
        return fake
    codes, scale, zero = _codes(name, module.weight, weight_spec, state)
    bias = module.bias.detach() if module.bias is not None else None
    if not is_conv:
        return QuantizedLinear.from_quantized(codes, scale, zero, weight_spec, bias, activation=act)
    layer = QuantizedConv2d(
        module.in_channels, module.out_channels, module.kernel_size, weight_spec,
        stride=module.stride, padding=module.padding, dilation=module.dilation,
        groups=module.groups, bias=bias is not None, activation_spec=act_spec,
    )  # fmt: skip
    layer.load_quantized(codes, scale, zero, bias)
    if act is not None:
        layer.act_quant = act
    return layer


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a run directory's model with real quantized layers (see the module docstring)."""
    from distiq.integrity import load_safetensors, verify_hashes

    path = check_run_dir(run_dir)
    verify_hashes(path)  # a weight file changed since the run wrote it: said, not exported
    modules = read_quant_manifest(path)
    state: dict[str, torch.Tensor] = {}
    state_file = run_file(path, QUANT_STATE)
    if state_file.is_file():
        state = load_safetensors(state_file, what="the run's quantization state")
    elif any(e.get("activation") or e.get("weight") for e in modules.values()):
        log.info("%s has no %s: weight qparams are recomputed", path, QUANT_STATE)
    model, adapter = _load_model(path)
    layers = {name: _rebuild(model, name, entry, state) for name, entry in modules.items()}
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    model.eval()
    return LoadedRun(model, adapter, modules, path)
