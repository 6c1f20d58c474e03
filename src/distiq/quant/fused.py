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

On CPU, in-cache arithmetic (mul, round, clamp, amin, amax) is far cheaper than
``aminmax(dim)``, comparisons producing bool or ``nonzero``, and a fresh large tensor costs
page faults. Hence: per-row min and max as two reductions, clipping found from the row extremes
and arithmetic (``_clipped``), and ``Ŵ`` written into a ``ReusableBuffer`` kept by the module.
Chunks are large (``CHUNK_ELEMENTS``): with 2 threads on a busy machine every op is a parallel
region that can wait a scheduler time slice for its second thread, so a few big ops beat many
cache-sized ones (``benchmarks/fake_quant_overhead.py`` measures the whole).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from distiq.quant.functional import (
    QParams,
    _check_finite,
    _qparams_from_range,
    choose_qparams,
    group_view,
)
from distiq.quant.lsq import SCALE_MIN, effective_scale
from distiq.quant.spec import PerChannel, PerGroup, QuantSpec

CHUNK_ELEMENTS = 1 << 22  # 16 MiB: a few large ops (each one parallel region; see above)


def supports_fused(weight: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether the fused path handles this weight / spec (``int``, 2-D float32; learnable specs
    through ``fake_quant_linear_lsq``); other cases use ``functional.fake_quantize``."""
    return spec.format == "int" and weight.dtype == torch.float32 and weight.ndim == 2


def _row_range(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min and max over the last axis (two reductions: faster than ``aminmax(dim)``)."""
    return rows.amin(dim=-1), rows.amax(dim=-1)


@functools.cache
def _count_and_column(length: int, device: torch.device) -> torch.Tensor:
    """``(length, 2)`` float32: a column of ones and the column indices."""
    columns = torch.arange(length, dtype=torch.float32, device=device)
    return torch.stack([torch.ones_like(columns), columns], dim=1)


def _clipped(
    codes: torch.Tensor, row_low: torch.Tensor, row_high: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor | None:
    """Flat indices (into ``codes``, ``(R, L)``) of the codes outside ``[qmin, qmax]``, or None.

    ``row_low`` / ``row_high`` ``(R,)`` are each row's smallest / largest code, so only rows that
    clip are searched. Elementwise comparisons and ``nonzero`` are much slower than arithmetic
    on CPU, so a row's clipped columns are found with arithmetic: ``d = clamp(code − qmax, 0, 1)``
    is 1 exactly at the clipped codes (codes are integers) and ``d @ [1, col]`` gives each row's
    count and column sum; rows with one clipped code (the usual case: the row's extreme) read
    its column off directly, the rare others fall back to ``nonzero``.
    """
    found = []
    length = codes.shape[1]
    for flagged, shift, sign in (
        (row_high > qmax, qmax, 1.0),
        (row_low < qmin, qmin, -1.0),
    ):
        rows = flagged.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        picked = codes.index_select(0, rows)  # (k, L) copies of the clipping rows only
        picked.sub_(shift).mul_(sign).clamp_(0.0, 1.0)  # 1 where clipped, else 0
        stats = picked @ _count_and_column(length, codes.device)  # (k, 2)
        count = stats[:, 0].round().long()
        single = count == 1
        found.append(rows[single] * length + stats[single, 1].round().long())
        for i in (~single & (count > 0)).nonzero().squeeze(1).tolist():
            found.append(int(rows[i]) * length + picked[i].nonzero().squeeze(1))
    return torch.cat(found) if found else None


class ReusableBuffer:
    """The fake-quantized weight's storage, reused from one training step to the next on CPU.

    A fresh weight-sized tensor per step costs as much as a matmul on CPU (the allocator returns
    big blocks to the OS, so every step page-faults them back in). The buffer is reused only when
    the graph that saved it is gone or has run its backward; otherwise a new tensor is taken.
    (After ``backward(retain_graph=True)`` a second backward through the *old* graph, once a new
    forward has overwritten the buffer, fails loudly with torch's "modified by an inplace
    operation" error, never silently.) CUDA tensors are always fresh (the caching allocator makes
    that cheap)."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.owner: weakref.ref | None = None

    def __deepcopy__(self, memo) -> ReusableBuffer:
        return ReusableBuffer()

    def __getstate__(self) -> dict:  # pickling a model (torch.save) carries no buffer
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def acquire(self, like: torch.Tensor, owner) -> torch.Tensor:
        if like.device.type != "cpu":
            return torch.empty_like(like)
        previous = self.owner() if self.owner is not None else None
        if previous is not None and not getattr(previous, "released", False):
            return torch.empty_like(like)  # the previous graph may still need its copy
        t = self.tensor
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            self.tensor = t = torch.empty_like(like)
        self.owner = weakref.ref(owner)
        return t


def fake_quantize_weight(
    weight: torch.Tensor,
    spec: QuantSpec,
    qparams: QParams | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QParams, torch.Tensor]:
    """Fake-quantize a 2-D float32 weight chunk by chunk.

    Args:
        weight: ``(out, in)`` float32.
        spec: an ``int`` spec (``supports_fused``).
        qparams: use these instead of the spec's observer (shaped as ``choose_qparams`` gives).
        out: write ``Ŵ`` here (``weight``'s shape and dtype) instead of a new tensor.

    Returns:
        ``(Ŵ, qparams, clipped)``: ``Ŵ`` of ``weight``'s shape, equal to
        ``fake_quantize(weight, *qparams, spec)`` bit for bit; the qparams (equal to
        ``choose_qparams(weight, spec)`` when not given); ``clipped``, int64 flat indices into
        ``weight`` of the codes that fell outside ``[quant_min, quant_max]`` before clamping.

    Raises:
        ValueError: the weight holds NaN/Inf.
    """
    assert supports_fused(weight, spec) and not spec.learnable, "caller checks supports_fused"
    weight = weight.detach()
    g = spec.granularity
    per_row_minmax = qparams is None and (
        spec.observer == "minmax"
        and (isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis % 2 == 0))
    )
    view = group_view(weight, spec)  # (out, in) or (out, G, g)
    if qparams is None and not per_row_minmax:
        qparams = choose_qparams(weight, spec)
    result = torch.empty_like(view) if out is None else out.view(view.shape)
    scales, zeros, clipped = [], [], []
    qmin, qmax = spec.quant_min, spec.quant_max
    with_zero = not (spec.symmetric and spec.is_signed)
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    row_numel = weight.shape[1]
    for start in range(0, view.shape[0], rows):
        w = view[start : start + rows]
        o = result[start : start + rows]
        if per_row_minmax:
            low, high = _row_range(w)  # NaN / Inf show up here
            if not bool(torch.isfinite(low.sum() + high.sum())):
                _check_finite(weight, "weight")  # raises (if really NaN/Inf), counting them
            s, z = _qparams_from_range(low, high, spec)
            s, z = s[..., None], z[..., None]
            scales.append(s)
            zeros.append(z)
            inv = 1.0 / s
            # round(x·inv) is monotone in x: the codes' extremes are those of the row extremes
            code_low = torch.round(low[..., None] * inv) + z
            code_high = torch.round(high[..., None] * inv) + z
        else:
            s, z = qparams
            if s.shape[0] != 1:
                s, z = s[start : start + rows], z[start : start + rows]
            inv = 1.0 / s
        torch.mul(w, inv, out=o)
        o.round_()
        if with_zero:
            o.add_(z)
        if not per_row_minmax:
            code_low, code_high = _row_range(o)
            if not bool(torch.isfinite(code_low.sum() + code_high.sum())):
                _check_finite(weight, "weight")
        flat = o.reshape(-1, o.shape[-1])  # one row per qparam row (channel or group)
        hits = _clipped(flat, code_low.reshape(-1), code_high.reshape(-1), qmin, qmax)
        if hits is not None:
            clipped.append(hits + start * row_numel)
            o.clamp_(qmin, qmax)
        if with_zero:
            o.sub_(z)
        o.mul_(s)
    if qparams is None:
        qparams = QParams(torch.cat(scales), torch.cat(zeros))
    clip_index = (
        torch.cat(clipped) if clipped else torch.empty(0, dtype=torch.long, device=weight.device)
    )
    return result.reshape(weight.shape), qparams, clip_index


class _FakeQuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, spec, buffer):
        with torch.no_grad():
            out = buffer.acquire(weight, ctx) if buffer is not None else None
            weight_q, _, clipped = fake_quantize_weight(weight, spec, out=out)
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
        ctx.released = True  # the weight buffer may be reused by the next forward
        return grad_x, grad_w, grad_b, None, None


class _FakeQuantLinearLsqFunction(torch.autograd.Function):
    """``F.linear(x, Ŵ, b)`` with LSQ / LSQ+ weight qparams (the maths of ``distiq.quant.lsq``):
    ``Ŵ`` as ``fake_quantize(W, s', round(z))`` with ``s' = effective_scale(s)`` (floored and
    rounded to ``spec.scale_dtype``, straight-through); ``∂s = g·Σ ∂Ŵ·(round(W/s) − W/s)``
    inside the grid and ``g·Σ ∂Ŵ·(clamp(q) − z)`` where clipped, ``∂z = −g·Σ ∂Ŵ·s`` where clipped,
    ``∂W = ∂Ŵ`` inside the grid; ``∂Ŵ = ∂yᵀ x``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, zero_point, spec, factor, buffer):
        plain = spec.replace(learnable=False)
        with torch.no_grad():
            s = effective_scale(scale, spec)  # floored, rounded to spec.scale_dtype
            z = torch.round(zero_point)
            out = buffer.acquire(weight, ctx) if buffer is not None else None
            weight_q, _, clipped = fake_quantize_weight(weight, plain, QParams(s, z), out=out)
        ctx.save_for_backward(x, weight_q, clipped, weight, scale, s, z)
        ctx.spec, ctx.factor, ctx.has_bias = plain, factor, bias is not None
        return F.linear(x, weight_q, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_q, clipped, weight, scale, s, z = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = grad_scale = grad_zero = None
        if needs[0]:
            grad_x = grad_out.matmul(weight_q.to(grad_out.dtype))
        grad_wq = grad_2d.t().matmul(x.reshape(-1, x.shape[-1]).to(grad_out.dtype))
        grad_wq = grad_wq.to(weight_q.dtype)
        if needs[3] or needs[4]:
            # Ŵ is not needed any more: its storage is the scratch space (a retained graph
            # backpropagated again then fails loudly on the version check, never silently)
            scratch = weight_q
            grad_scale, grad_zero = _lsq_qparam_grads(weight, grad_wq, s, z, clipped, spec, scratch)
            grad_scale = grad_scale * ctx.factor * (scale >= SCALE_MIN)  # clamp's gradient
            grad_zero = grad_zero * ctx.factor if needs[4] else None
            grad_scale = grad_scale if needs[3] else None
        if needs[1]:
            grad_w = grad_wq
            if clipped.numel():
                grad_w.view(-1).index_fill_(0, clipped, 0.0)
        if ctx.has_bias and needs[2]:
            grad_b = grad_2d.sum(0)
        ctx.released = True
        return grad_x, grad_w, grad_b, grad_scale, grad_zero, None, None, None


def _lsq_qparam_grads(weight, grad_wq, s, z, clipped, spec, scratch):
    """Unscaled LSQ gradients of ``s`` and ``z`` (shapes of ``s``); ``scratch``: a tensor of
    ``weight``'s shape that may be overwritten."""
    view_w = group_view(weight, spec)
    view_g = group_view(grad_wq, spec)
    d = scratch.view(view_w.shape)
    torch.mul(view_w, 1.0 / s, out=d)  # v = w/s (the forward's product)
    flat = d.view(-1)
    rounded = torch.empty(min(flat.numel(), 1 << 20), dtype=d.dtype, device=d.device)
    for start in range(0, flat.numel(), rounded.numel()):  # v − round(v), small temporaries
        part = flat[start : start + rounded.numel()]
        part.sub_(torch.round(part, out=rounded[: part.numel()]))
    d.neg_().mul_(view_g)  # ∂Ŵ·(round(v) − v), as if nothing clipped
    grad_scale = d.sum_to_size(s.shape).clone()
    grad_zero = torch.zeros_like(z)
    if clipped.numel():  # clipped codes: replace (round(v) − v) by (clamp(q) − z); ∂z = −s
        position = torch.unravel_index(clipped, view_w.shape)
        qparam_index = tuple(
            p if size > 1 else torch.zeros_like(p) for p, size in zip(position, s.shape)
        )
        s_e, z_e = s[qparam_index], z[qparam_index]
        v = view_w[position] * (1.0 / s_e)
        q = torch.clamp(torch.round(v) + z_e, spec.quant_min, spec.quant_max)
        g = view_g[position]
        grad_scale.index_put_(qparam_index, g * ((q - z_e) - (torch.round(v) - v)), accumulate=True)
        grad_zero.index_put_(qparam_index, -g * s_e, accumulate=True)
    return grad_scale, grad_zero


def fake_quant_linear_lsq(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    factor: float,
    buffer: ReusableBuffer | None = None,
) -> torch.Tensor:
    """``F.linear(x, lsq_fake_quantize(weight, scale, zero_point), bias)``, fused: the same
    values as ``distiq.quant.lsq`` and its gradients (``factor``: the LSQ gradient scale).

    Args:
        x: ``(..., in)``; weight: ``(out, in)`` float32; bias: ``(out,)`` or None.
        scale, zero_point: the learnable qparams, ``QParams`` shapes of the weight.
    """
    return _FakeQuantLinearLsqFunction.apply(
        x, weight, bias, scale, zero_point, spec, factor, buffer
    )


def fake_quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: QuantSpec,
    buffer: ReusableBuffer | None = None,
) -> torch.Tensor:
    """``F.linear(x, fake_quantize(weight), bias)`` with straight-through gradients.

    Args:
        x: ``(..., in)``; weight: ``(out, in)`` float32; bias: ``(out,)`` or None.
        buffer: where to keep ``Ŵ`` between steps (``ReusableBuffer``), or None.

    Returns:
        ``(..., out)``.
    """
    return _FakeQuantLinearFunction.apply(x, weight, bias, spec, buffer)
