"""Where the objective touches ``distiq.quant``: the full-precision forward of a fake-quantized
student (``pd``) and its weight quantizers (``rounding``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distiq.distill import glob_match, rounding_regularizer

log = logging.getLogger(__name__)


def _quant_api():
    """``(fake_quant_disabled, fake_quant_modules)`` from ``distiq.quant``."""
    try:
        from distiq.quant import fake_quant_disabled, fake_quant_modules
    except ImportError:
        from distiq.quant.modules import fake_quant_disabled, fake_quant_modules
    return fake_quant_disabled, fake_quant_modules


def fp_forward(student: nn.Module, inputs: Mapping[str, Any] | Sequence[Any]) -> Any:
    """The student's outputs with every fake-quant module in full precision, without gradient.

    Raises:
        ValueError: the student has no fake-quant module (``pd`` would be identically 0).
    """
    fake_quant_disabled, fake_quant_modules = _quant_api()
    if not fake_quant_modules(student):
        raise ValueError(
            "the 'pd' term compares the student's full-precision and quantized predictions, but "
            "the student has no fake-quantized module; quantize it first (quantize_(..., "
            "step='prepare')) or remove the pd term"
        )
    with torch.no_grad(), fake_quant_disabled(student):
        if isinstance(inputs, Mapping):
            return student(**inputs)
        return student(*inputs)


def int_weight_modules(
    model: nn.Module, patterns: Sequence[str] = ("**",)
) -> list[tuple[str, nn.Module]]:
    """Fake-quant modules selected by ``patterns`` (a pattern selects the module it names and
    everything under it) whose weight is quantized on an integer grid (nf4 / fp8 weights have
    none and are skipped)."""
    _, fake_quant_modules = _quant_api()
    out = []
    for name, module in fake_quant_modules(model):
        quantizer = getattr(module, "weight_quant", None)
        if quantizer is None or quantizer.spec.format != "int":
            continue
        if any(_selects(name, p) for p in patterns):
            out.append((name, module))
    return out


def _selects(name: str, pattern: str) -> bool:
    """``pattern`` names the module or one of its ancestors (a subtree, as ``quantize_``'s
    patterns select: ``model.language_model`` covers every layer under it)."""
    parts = name.split(".")
    return any(glob_match(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def weight_qparams(module: nn.Module) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """``(weight_2d, scale, zero_point, quant_min, quant_max)`` of a fake-quant module.

    The weight is the module's own parameter viewed 2-D ``(out, in·k·k)`` (the view its
    ``WeightQuantizer`` quantizes). Learnable (LSQ / LSQ+) scales and zero-points are the
    parameters themselves (floored as the quantizer floors them), so gradients reach them;
    otherwise the qparams are recomputed from the detached weight, as the quantizer does at
    every call.
    """
    from distiq.quant.functional import choose_qparams
    from distiq.quant.lsq import effective_scale

    quantizer = module.weight_quant
    spec = quantizer.spec
    weight = module.weight.reshape(module.weight.shape[0], -1)
    lsq = getattr(quantizer, "lsq", None)
    if lsq is not None:
        scale, zero = effective_scale(lsq.scale, spec), lsq.zero_point
    else:
        scale, zero = choose_qparams(weight.detach(), spec)
    return weight, scale, zero, spec.quant_min, spec.quant_max


def rounding_value(modules: Sequence[tuple[str, nn.Module]], patterns: Sequence[str]) -> Tensor:
    """Mean over ``modules`` (from :func:`int_weight_modules`) of
    :func:`distiq.distill.rounding_regularizer` (each the mean over its weight elements)."""
    if not modules:
        raise ValueError(
            "the 'rounding' term found no fake-quantized module with an integer weight grid "
            f"matching {list(patterns)}; quantize the student first or remove the term"
        )
    values = []
    for _, module in modules:
        weight, scale, zero, qmin, qmax = weight_qparams(module)
        values.append(rounding_regularizer(weight, scale, zero, qmin, qmax, check_scale=False))
    return torch.stack(values).mean()
