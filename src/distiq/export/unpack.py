"""The loading half of the packed format: rebuild the model, check every tensor, install layers.

Every check happens before the model is changed: a checkpoint whose tensors do not match its
manifest, or a model whose layers do not match the checkpoint, raises
``PackedCheckpointError`` naming the layer and what differs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.export.files import UnsafeFileError, member_file
from distiq.export.layers import QuantizedConv2d
from distiq.export.manifest import (
    HF_CONFIG_FILE,
    PackedCheckpointError,
    implied_zero_point,
    module_specs,
)
from distiq.quant import FakeQuantConv2d, FakeQuantLinear, QuantizedLinear, QuantSpec
from distiq.quant.packing import packed_numel, unpack
from distiq.quant.quantizers import ActivationQuantizer


def _member(path: Path, name: str, what: str) -> Path:
    try:
        file = member_file(path, name, what)
    except UnsafeFileError as exc:
        raise PackedCheckpointError(str(exc)) from None
    if not file.is_file():
        raise PackedCheckpointError(f"{path} has no {name} ({what}); the checkpoint is incomplete")
    return file


def _hf_config(path: Path, manifest: dict) -> Any:
    """The saved Hugging Face config: ``hf_config.json`` (format version 2, where
    ``config.json`` is the guard that stops transformers) or ``config.json`` (version 1)."""
    from transformers import AutoConfig

    name = HF_CONFIG_FILE if manifest["format_version"] >= 2 else "config.json"
    file = _member(path, name, "the model's Hugging Face config")
    return AutoConfig.from_pretrained(str(file), local_files_only=True)


def build_model(path: Path, manifest: dict) -> nn.Module:
    """A float model of the saved architecture (random weights; every tensor is loaded next)."""
    info = manifest["model"]
    if info["kind"] == "module":
        raise PackedCheckpointError(
            f"{path} holds a plain nn.Module ({info.get('class')}); pass a model of that "
            "architecture: load_packed(path, model=...)"
        )
    from transformers import AutoModelForImageTextToText

    config = _hf_config(path, manifest)
    kwargs = {}
    if info.get("attn_implementation"):
        kwargs["attn_implementation"] = info["attn_implementation"]
    vlm = AutoModelForImageTextToText.from_config(config, **kwargs)
    if info["kind"] == "hf":
        return vlm
    from distiq.models import VLMWithHeads, adapter_class
    from distiq.models.multitask import HEADS_CONFIG

    settings = json.loads(_member(path, HEADS_CONFIG, "the heads' settings").read_text())
    adapter = adapter_class(config).from_pretrained(path, vlm.config)
    det, seg = settings.get("detection_head"), settings.get("segmentation_head")

    def head_kwargs(entry):
        return {k: v for k, v in (entry or {}).items() if k not in ("in_dim", "num_classes")}

    return VLMWithHeads(
        vlm,
        adapter,
        num_detection_classes=det["num_classes"] if det else None,
        num_segmentation_classes=seg["num_classes"] if seg else None,
        detection_kwargs=head_kwargs(det),
        segmentation_kwargs=head_kwargs(seg),
    )


def _take(tensors: dict, key: str, shape, dtype, name: str) -> torch.Tensor:
    if key not in tensors:
        raise PackedCheckpointError(f"layer {name!r}: tensor {key!r} is missing from the weights")
    value = tensors[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise PackedCheckpointError(
            f"layer {name!r}: tensor {key!r} has shape {tuple(value.shape)}, the manifest implies "
            f"{tuple(shape)}"
        )
    if dtype is not None and value.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise PackedCheckpointError(f"layer {name!r}: tensor {key!r} has dtype {value.dtype}")
    return value


def _check_target(model: nn.Module, name: str, entry: dict) -> nn.Module:
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise PackedCheckpointError(
            f"the checkpoint's layer {name!r} is not in the model: is it the same architecture?"
        ) from None
    shape = tuple(entry["weight_shape"])
    if isinstance(target, QuantizedLinear):
        have = (target.out_features, target.in_features)
    elif isinstance(target, QuantizedConv2d):
        have = target.weight_shape
    elif isinstance(target, nn.Linear | nn.Conv2d):
        have = tuple(target.weight.shape)
    else:
        raise PackedCheckpointError(
            f"layer {name!r} is a {type(target).__name__} in the model, not a linear or conv layer"
        )
    if have != shape:
        raise PackedCheckpointError(
            f"layer {name!r} has weight shape {have} in the model but {shape} in the checkpoint"
        )
    return target


def _activation(spec: QuantSpec | None, tensors: dict, name: str, features: int, axis: int):
    if spec is None:
        return None
    quantizer = ActivationQuantizer(spec.replace(learnable=False), features, axis)
    if quantizer.static:
        shape = tuple(quantizer.scale.shape)
        scale = _take(tensors, f"{name}.input_scale", shape, torch.float32, name)
        zero = _take(tensors, f"{name}.input_zero_point", shape, torch.float32, name)
        with torch.no_grad():
            quantizer.scale.copy_(scale)
            quantizer.zero_point.copy_(zero)
            quantizer.calibrated.fill_(True)
            quantizer.num_batches.fill_(1)
    return quantizer


def _zero_point(entry: dict, spec: QuantSpec, tensors: dict, name: str, shape) -> torch.Tensor:
    mode = entry["zero_point"]
    if mode == "implicit":
        implied = implied_zero_point(spec)
        if implied is None:
            raise PackedCheckpointError(
                f"layer {name!r}: zero_point 'implicit' is impossible for an asymmetric spec"
            )
        return torch.full(shape, implied)
    if mode == "packed":
        n = math.prod(shape)
        packed = _take(tensors, f"{name}.qzeros", (packed_numel(n, spec.bits),), torch.uint8, name)
        return unpack(packed, spec.bits, shape, signed=spec.is_signed).to(torch.float32)
    return _take(tensors, f"{name}.zeros", shape, torch.float32, name)


def _build_layer(name: str, manifest: dict, tensors: dict, int_matmul: bool) -> nn.Module:
    entry = manifest["modules"][name]
    kind = entry["type"]
    shape = tuple(entry["weight_shape"])
    spec, act_spec = module_specs(manifest, name)
    bias = _take(tensors, f"{name}.bias", (shape[0],), None, name) if entry["bias"] else None
    if kind in ("fake_linear", "fake_conv2d"):
        weight = _take(tensors, f"{name}.weight", shape, None, name)
        if kind == "fake_linear":
            layer = FakeQuantLinear(shape[1], shape[0], bias is not None, activation_spec=act_spec)
            layer.act_quant = _activation(act_spec, tensors, name, shape[1], -1)
        else:
            conv = entry["conv"]
            padding = (
                conv["padding"] if isinstance(conv["padding"], str) else tuple(conv["padding"])
            )
            float_conv = nn.Conv2d(
                shape[1] * conv["groups"], shape[0], tuple(shape[2:]), tuple(conv["stride"]),
                padding, tuple(conv["dilation"]), conv["groups"], bias is not None,
            )  # fmt: skip
            layer = FakeQuantConv2d.from_float(float_conv, None, act_spec)
            layer.act_quant = _activation(act_spec, tensors, name, layer.in_channels, 1)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer
    out_features, cols = shape[0], math.prod(shape[1:])
    bits = 8 if spec.format == "fp8_e4m3" else spec.bits
    packed = _take(
        tensors, f"{name}.qweight", (packed_numel(out_features * cols, bits),), torch.uint8, name
    )
    groups = entry["num_groups"]
    if kind == "linear":
        layer = QuantizedLinear(
            shape[1], out_features, spec, bias=bias is not None, activation_spec=act_spec,
            num_groups=groups,
        )  # fmt: skip
        if groups is not None:
            g_idx = _take(tensors, f"{name}.g_idx", (shape[1],), torch.int32, name)
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
                raise PackedCheckpointError(f"layer {name!r}: g_idx values outside [0, {groups})")
            layer.g_idx.copy_(g_idx.long())
        layer.act_quant = _activation(act_spec, tensors, name, shape[1], -1)
    else:
        conv = entry["conv"]
        padding = conv["padding"] if isinstance(conv["padding"], str) else tuple(conv["padding"])
        layer = QuantizedConv2d(
            shape[1] * conv["groups"], out_features, tuple(shape[2:]), spec,
            stride=tuple(conv["stride"]), padding=padding, dilation=tuple(conv["dilation"]),
            groups=conv["groups"], bias=bias is not None, activation_spec=act_spec,
        )  # fmt: skip
        layer.act_quant = _activation(act_spec, tensors, name, layer.in_channels, 1)
    qshape = tuple(layer.weight_scale.shape)
    scale = _take(
        tensors, f"{name}.scales", qshape, (torch.float32, torch.float16, torch.bfloat16), name
    )
    zero = _zero_point(entry, spec, tensors, name, qshape)
    with torch.no_grad():
        layer.packed_weight.copy_(packed)
        layer.weight_scale.copy_(scale.to(torch.float32))
        layer.weight_zero_point.copy_(zero)
        if bias is not None:
            layer.bias.copy_(bias)
    if int_matmul and isinstance(layer, QuantizedLinear) and layer.int_matmul_supported():
        layer.int_matmul = True
    return layer


def install_layers(
    model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor], *, int_matmul: bool
) -> None:
    """Build every manifest layer from ``tensors``, then swap them in and load the leftovers."""
    modules: dict[str, Any] = manifest["modules"]
    layers = {}
    for name, entry in modules.items():
        target = _check_target(model, name, entry)
        layer = _build_layer(name, manifest, tensors, int_matmul)
        layers[name] = layer.to(next(iter(target.parameters()), torch.empty(0)).device)
    prefixes = tuple(f"{name}." for name in modules)
    leftovers = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    expected = [k for k in model.state_dict() if not k.startswith(prefixes)]
    missing = sorted(set(expected) - set(leftovers))
    unexpected = sorted(set(leftovers) - set(expected))
    if missing or unexpected:
        raise PackedCheckpointError(
            "the checkpoint's full-precision tensors do not match the model: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    state = model.state_dict()
    for key in expected:
        if tuple(state[key].shape) != tuple(leftovers[key].shape):
            raise PackedCheckpointError(
                f"tensor {key!r} has shape {tuple(leftovers[key].shape)} in the checkpoint but "
                f"{tuple(state[key].shape)} in the model"
            )
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    model.load_state_dict(leftovers, strict=False)
