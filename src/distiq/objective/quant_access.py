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
    try:
        from distiq.quant import fake_quant_disabled, fake_quant_modules
    except ImportError as exc:  # pragma: no cover - only while distiq.quant is incomplete
        raise RuntimeError(
            "distiq.quant does not provide fake_quant_disabled / fake_quant_modules; the 'pd' and "
            "'rounding' terms need them"
        ) from exc
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


def _first_attr(obj: object, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def weight_quantizers(
    model: nn.Module, patterns: Sequence[str] = ("**",)
) -> list[tuple[str, Tensor, Tensor, Tensor, int, int]]:
    """``(name, weight, scale, zero_point, quant_min, quant_max)`` of every fake-quant module
    whose name matches ``patterns`` and whose weight is quantized on an integer grid.

    Stored (learnable) scales are returned as they are (gradients reach them); a module without
    stored weight qparams gets them from ``choose_qparams`` on its detached weight.
    """
    from distiq.quant import QuantSpec
    from distiq.quant.functional import choose_qparams

    _, fake_quant_modules = _quant_api()
    out = []
    for name, module in fake_quant_modules(model):
        if not any(glob_match(name, p) for p in patterns):
            continue
        spec = _first_attr(module, ("weight_spec",))
        weight = getattr(module, "weight", None)
        if not isinstance(spec, QuantSpec) or not isinstance(weight, Tensor):
            continue
        if spec.format != "int":
            continue
        scale = _first_attr(module, ("weight_scale",))
        zero = _first_attr(module, ("weight_zero_point",))
        if not isinstance(scale, Tensor):
            scale, zero = choose_qparams(weight.detach(), spec)
        if not isinstance(zero, Tensor):
            zero = torch.zeros_like(scale)
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
