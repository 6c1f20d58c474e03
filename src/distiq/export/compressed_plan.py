"""Which compressed-tensors scheme holds each quantized layer exactly (``plan_layers``).

A layer's weight becomes compressed-tensors ``QuantizationArgs`` and the int8 codes
``q − z`` (symmetric, one more bit when the distiq spec is asymmetric) with its scales in the
spec's ``scale_dtype``; its input activations become ``QuantizationArgs`` plus the static
``input_scale`` / ``input_zero_point`` (zero-points shifted by ``2^(b-1)`` for distiq's unsigned
ranges: compressed-tensors' integer range is always signed). Why each rule is exact, and what
is refused, is in ``distiq.export.compressed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distiq.export.layers import (
    QuantizedConv2d,
    QuantizedWeight,
    activation_quantizer,
    is_quantized,
    quantized_weight,
)
from distiq.quant import FakeQuantConv2d
from distiq.quant.spec import PerChannel, PerGroup, PerTensor, PerToken

EXACT_SCHEMES = (
    "weight-only integer quantization of linear layers, 2-8 bits (2-7 when asymmetric), per "
    "channel, per group or per tensor, symmetric or asymmetric, float32 / float16 / bfloat16 "
    "scales"
)
WITH_TIES = (
    "input activations of 2-8 bits per tensor (static or dynamic) or per token (dynamic), "
    "symmetric or asymmetric, written exactly but rounded by compressed-tensors as "
    "round(x / s + z) instead of distiq's round(x · (1/s)) + z: a code moves by one step at "
    "rounding ties (every exact tie when the zero-point is odd), so transformers' logits are "
    "not guaranteed bit-identical; allow_activation_ties=True (--allow-activation-ties) writes "
    "them anyway and records the logit gap measured"
)


@dataclass
class CompressedLayer:
    """One layer's compressed-tensors scheme.

    Attributes:
        name: the module's fully qualified name.
        weight_args: ``QuantizationArgs`` fields of the weight (None: activation-only layer).
        input_args: ``QuantizationArgs`` fields of the input activations (None: float inputs).
        codes: ``(out, in)`` int8 symmetric codes (``q − z``), or None.
        scale: the weight scales in compressed-tensors' shape (``(out, 1)`` channel,
            ``(out, G)`` group, ``(1,)`` tensor), in the dtype to store.
        input_scale, input_zero_point: static activation qparams, ``(1,)`` float32 / int8.
    """

    name: str
    weight_args: dict | None
    input_args: dict | None
    codes: torch.Tensor | None = field(default=None, repr=False)
    scale: torch.Tensor | None = field(default=None, repr=False)
    input_scale: torch.Tensor | None = field(default=None, repr=False)
    input_zero_point: torch.Tensor | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return json.dumps([self.weight_args, self.input_args], sort_keys=True)


def _integral(values: torch.Tensor) -> bool:
    return bool(torch.isfinite(values).all() and (values == torch.round(values)).all())


def _weight_scheme(qw: QuantizedWeight) -> tuple[dict, torch.Tensor, torch.Tensor] | str:
    """(weight args, int8 codes ``q − z``, scales) or why the weight has no exact form."""
    from distiq.quant.functional import SCALE_DTYPES, group_view

    spec, g = qw.spec, qw.spec.granularity
    if spec.format != "int":
        return f"{spec.format} weights (compressed-tensors' integer formats hold integer codes)"
    if qw.g_idx is not None:
        return "act-order group indices (g_idx), which compressed-tensors no longer reads"
    bits = spec.bits if spec.symmetric else spec.bits + 1
    if bits > 8:
        return (
            f"{spec.bits}-bit asymmetric weights (written as symmetric codes q − z they need "
            f"{bits} bits; the integer formats hold 1-8): quantize them symmetrically"
        )
    out = qw.codes.shape[0]
    if isinstance(g, PerGroup):
        args, scale = {"strategy": "group", "group_size": g.size}, qw.scale.reshape(out, -1)
    elif isinstance(g, PerChannel) and g.axis in (0, -2):
        args, scale = {"strategy": "channel"}, qw.scale.reshape(out, 1)
    elif isinstance(g, PerTensor):
        args, scale = {"strategy": "tensor"}, qw.scale.reshape(1)
    else:
        return f"{g!r} weights (scales along the input axis have no compressed-tensors form)"
    if not _integral(qw.zero_point):
        return "zero-points that are not integers"
    shifted = group_view(qw.codes.to(torch.float32), spec) - qw.zero_point
    shifted = shifted.reshape(qw.codes.shape)
    if shifted.min() < -(2 ** (bits - 1)) or shifted.max() > 2 ** (bits - 1) - 1:
        return f"codes q − z outside the {bits}-bit range"
    dtype = SCALE_DTYPES[spec.scale_dtype]
    stored = scale.to(dtype)
    if not torch.equal(stored.to(scale.dtype), scale):
        stored = scale.to(torch.float32)  # not values of the spec's dtype: keep them exact
    args.update(num_bits=bits, type="int", symmetric=True)
    return args, shifted.to(torch.int8), stored


def _input_scheme(module: nn.Module) -> tuple[dict, torch.Tensor | None, torch.Tensor | None] | str:
    """(input activation args, static scale, static zero-point) or why they have no exact form;
    raises nothing for a layer without activation quantization (returns ``({}, None, None)``)."""
    act = activation_quantizer(module)
    if act is None:
        return {}, None, None
    spec, g = act.spec, act.spec.granularity
    if spec.format != "int":
        return f"{spec.format} activations"
    if isinstance(g, PerTensor):
        strategy = "tensor"
    elif isinstance(g, PerToken) and spec.dynamic:
        strategy = "token"
    else:
        return (
            f"{g!r} activations (compressed-tensors applies input scales per tensor, or per token "
            "when dynamic)"
        )
    offset = 0 if spec.is_signed else 2 ** (spec.bits - 1)
    symmetric = spec.symmetric  # unsigned symmetric: zero-point 2^(b-1), shifted to 0 below
    args: dict[str, Any] = {"num_bits": spec.bits, "type": "int", "symmetric": symmetric}
    args.update(strategy=strategy, dynamic=bool(spec.dynamic))
    if spec.dynamic:
        if spec.scale_dtype != "float32":
            args["scale_dtype"] = spec.scale_dtype
        return args, None, None
    scale, zero = act.qparams()
    scale, zero = scale.reshape(-1).float(), zero.reshape(-1).float() - offset
    if scale.numel() != 1:
        return "static activation scales that are not one per tensor"
    if not _integral(zero) or zero.abs().max() > 2 ** (spec.bits - 1):
        return "static activation zero-points that are not integers of the code range"
    if symmetric and bool((zero != 0).any()):
        return "a symmetric activation spec with a non-zero zero-point"
    return args, scale.contiguous(), zero.to(torch.int8)


def plan_layers(model: nn.Module, *, allow_activation_ties: bool = False) -> list[CompressedLayer]:
    """The compressed-tensors scheme of every quantized layer of ``model``.

    Args:
        model: the model (its quantized layers: ``distiq.export.layers.is_quantized``).
        allow_activation_ties: accept layers with quantized input activations (see the
            module docstring); otherwise they are refused.

    Raises:
        ValueError: listing every layer that has no exact compressed-tensors form, with the
            reason, and what is exact — before anything is written.
    """
    layers, problems = [], []
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        if isinstance(module, FakeQuantConv2d | QuantizedConv2d):
            problems.append(f"{name}: a convolution (compressed-tensors quantizes linear layers)")
            continue
        qw = quantized_weight(module)
        weight = _weight_scheme(qw) if qw is not None else None
        inputs = _input_scheme(module)
        if not allow_activation_ties and not isinstance(inputs, str) and inputs[0]:
            inputs = "quantized input activations (rounded differently at ties, see below)"
        for result in (weight, inputs):
            if isinstance(result, str):
                problems.append(f"{name}: {result}")
        if isinstance(weight, str) or isinstance(inputs, str):
            continue
        weight_args, codes, scale = weight if weight is not None else (None, None, None)
        input_args, input_scale, input_zero = inputs
        layers.append(
            CompressedLayer(
                name, weight_args, input_args or None, codes, scale, input_scale, input_zero
            )
        )
    if problems:
        lines = "\n  - ".join(_grouped(problems))
        raise ValueError(
            f"{len(problems)} layer(s) have no exact compressed-tensors form:\n  - {lines}\n"
            f"Exact in transformers: {EXACT_SCHEMES}. Written on request: {WITH_TIES}. Export "
            "these runs with --format packed (every distiq scheme, exact) or quantize those "
            "layers with an exact scheme."
        )
    if not layers:
        raise ValueError(
            "the model has no quantized layer: a float model needs no compressed-tensors "
            "checkpoint (save_pretrained writes it)"
        )
    return layers


def _grouped(problems: list[str]) -> list[str]:
    """``"name: reason"`` lines merged per reason: ``"reason: a, b, c and 11 more"``."""
    by_reason: dict[str, list[str]] = {}
    for line in problems:
        name, _, reason = line.partition(": ")
        by_reason.setdefault(reason, []).append(name)
    out = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        out.append(f"{reason}: {', '.join(names[:3])}{more}")
    return out
