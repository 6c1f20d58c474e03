"""Fast fake quantization of float32 weights for training (``FakeQuantLinear``'s hot path).

A weight of a big layer is fake-quantized at every training step, so the elementwise passes
(``x·(1/s)``, round, clamp, ``·s``) and the allocations they make cost as much as the matmul they
feed on a CPU. ``fake_quantize_weight`` does the same arithmetic as
``distiq.quant.functional.fake_quantize`` (bit for bit: the same float32 operations in the same
order) in row chunks that stay in cache, writing into one output tensor, and returns the flat
indices of the clipped codes instead of a dense mask (the straight-through gradient is zero
exactly there; with a ``minmax`` observer only a few extreme values clip).

``fake_quant_linear`` wraps it with the matmul in one autograd function: forward
``y = x Ŵᵀ + b``; backward ``∂x = ∂y Ŵ``, ``∂W = (∂yᵀ x)`` with the clipped entries zeroed, and
``∂b = Σ ∂y``: the straight-through estimator of ``fake_quantize`` followed by ``F.linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distiq.quant.functional import (
    QParams,
    _check_finite,
    _qparams_from_range,
    choose_qparams,
    group_view,
)
from distiq.quant.spec import PerChannel, PerGroup, QuantSpec

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per chunk: fits a core's L2 on current CPUs


def supports_fused(weight: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether ``fake_quantize_weight`` handles this weight / spec (int, not learnable, 2-D
    float32); other cases use ``functional.fake_quantize``."""
    return (
        spec.format == "int"
        and not spec.learnable
        and weight.dtype == torch.float32
        and weight.ndim == 2
    )


def _chunk_qparams(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row minmax qparams of a chunk ``(r, ..., n)`` reduced over the last axis."""
    flat = rows.reshape(-1, rows.shape[-1])
    low, high = torch.aminmax(flat, dim=1)
    scale, zero = _qparams_from_range(low, high, spec)
    shape = (*rows.shape[:-1], 1)
    return scale.reshape(shape), zero.reshape(shape)


def fake_quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, qparams: QParams | None = None
) -> tuple[torch.Tensor, QParams, torch.Tensor]:
    """Fake-quantize a 2-D float32 weight chunk by chunk.

    Args:
        weight: ``(out, in)`` float32.
        spec: an ``int`` spec (``supports_fused``).
        qparams: use these instead of the spec's observer (shaped as ``choose_qparams`` gives).

    Returns:
        ``(Ŵ, qparams, clipped)``: ``Ŵ`` of ``weight``'s shape, equal to
        ``fake_quantize(weight, *qparams, spec)`` bit for bit; the qparams (equal to
        ``choose_qparams(weight, spec)`` when not given); ``clipped``, int64 flat indices into
        ``weight`` of the codes that fell outside ``[quant_min, quant_max]`` before clamping.
    """
    assert supports_fused(weight, spec), "caller checks supports_fused"
    weight = weight.detach()
    g = spec.granularity
    per_row_minmax = spec.observer == "minmax" and (
        isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis % 2 == 0)
    )
    view = group_view(weight, spec)  # (out, in) or (out, G, g)
    if qparams is None and not per_row_minmax:
        qparams = choose_qparams(weight, spec)
    out = torch.empty_like(view)
    scales, zeros = [], []
    clipped = []
    qmin, qmax = spec.quant_min, spec.quant_max
    with_zero = not (spec.symmetric and spec.is_signed)
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    row_numel = weight.shape[1]
    for start in range(0, view.shape[0], rows):
        w = view[start : start + rows]
        o = out[start : start + rows]
        if qparams is None:
            s, z = _chunk_qparams(w, spec)
            scales.append(s)
            zeros.append(z)
        else:
            s, z = qparams
            if s.shape[0] != 1:
                s, z = s[start : start + rows], z[start : start + rows]
        torch.mul(w, 1.0 / s, out=o)
        o.round_()
        if with_zero:
            o.add_(z)
        low, high = (float(v) for v in torch.aminmax(o))
        if not (math.isfinite(low) and math.isfinite(high)):
            _check_finite(weight, "weight")  # raises, counting the NaN/Inf values
        if low < qmin or high > qmax:
            hit = ((o < qmin) | (o > qmax)).reshape(-1).nonzero().squeeze(1)
            clipped.append(hit + start * row_numel)
        o.clamp_(qmin, qmax)
        if with_zero:
            o.sub_(z)
        o.mul_(s)
    if qparams is None:
        qparams = QParams(torch.cat(scales), torch.cat(zeros))
    clip_index = (
        torch.cat(clipped) if clipped else torch.empty(0, dtype=torch.long, device=weight.device)
    )
    return out.reshape(weight.shape), qparams, clip_index


class _FakeQuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        with torch.no_grad():
            weight_q, _, clipped = fake_quantize_weight(weight, spec)
        ctx.save_for_backward(x, weight_q, clipped)
        ctx.has_bias = bias is not None
        return F.linear(x, weight_q, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_q, clipped = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight_q.to(grad_out.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().matmul(x.reshape(-1, x.shape[-1]).to(grad_out.dtype))
            grad_w = grad_w.to(weight_q.dtype)
            if clipped.numel():
                grad_w.view(-1).index_fill_(0, clipped, 0.0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None


def fake_quant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """``F.linear(x, fake_quantize(weight), bias)`` with straight-through gradients.

    Args:
        x: ``(..., in)``; weight: ``(out, in)`` float32; bias: ``(out,)`` or None.

    Returns:
        ``(..., out)``.
    """
    return _FakeQuantLinearFunction.apply(x, weight, bias, spec)
