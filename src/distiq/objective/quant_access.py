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


def weight_quantizers(
    model: nn.Module, patterns: Sequence[str] = ("**",)
) -> list[tuple[str, Tensor, Tensor, Tensor, int, int]]:
    """``(name, weight_2d, scale, zero_point, quant_min, quant_max)`` of every fake-quant module
    whose name matches ``patterns`` and whose weight is quantized on an integer grid.

    The weight is the module's own parameter viewed 2-D ``(out, in·k·k)`` (the view its
    ``WeightQuantizer`` quantizes). Learnable (LSQ / LSQ+) scales and zero-points are returned
    as the parameters themselves, so the regulariser's gradient reaches them; otherwise the
    qparams are recomputed from the detached weight, as the quantizer does at every call.
    nf4 / fp8 weights have no integer grid and are skipped.
    """
    from distiq.quant.functional import choose_qparams
    from distiq.quant.lsq import SCALE_MIN

    _, fake_quant_modules = _quant_api()
    out = []
    for name, module in fake_quant_modules(model):
        quantizer = getattr(module, "weight_quant", None)
        if quantizer is None or quantizer.spec.format != "int":
            continue
        if not any(glob_match(name, p) for p in patterns):
            continue
        spec = quantizer.spec
        weight = module.weight.reshape(module.weight.shape[0], -1)
        lsq = getattr(quantizer, "lsq", None)
        if lsq is not None:
            scale, zero = lsq.scale.clamp(min=SCALE_MIN), lsq.zero_point
        else:
            scale, zero = choose_qparams(weight.detach(), spec)
        out.append((name, weight, scale, zero, spec.quant_min, spec.quant_max))
    return out


def rounding_value(model: nn.Module, patterns: Sequence[str]) -> Tensor:
    """Mean over the selected fake-quant modules of :func:`distiq.distill.rounding_regularizer`
    (each the mean over its weight elements)."""
    quantizers = weight_quantizers(model, patterns)
    if not quantizers:
        raise ValueError(
            "the 'rounding' term found no fake-quantized module with an integer weight grid "
            f"matching {list(patterns)}; quantize the student first or remove the term"
        )
    values = [rounding_regularizer(w, s, z, qmin, qmax) for _, w, s, z, qmin, qmax in quantizers]
    return torch.stack(values).mean()
