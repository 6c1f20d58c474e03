"""Pure quantization functions: ``choose_qparams``, ``quantize``, ``dequantize``, ``fake_quantize``.

Integer grid (``format="int"``), for a tensor ``x`` with scale ``s`` and zero-point ``z``:

    q   = clamp(round(x · (1/s)) + z, quant_min, quant_max)        (round half to even)
    x̂   = (q − z) · s

This is exactly the arithmetic of ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` (they multiply by ``1/s`` and round before adding
``z``), so an int8 spec fake-quantizes bit for bit like them and exports to ONNX QDQ exactly.

Shapes of ``QParams`` (``scale`` and ``zero_point`` have the same shape; zero-points are float
tensors holding integers, so that LSQ+ can learn them):
- ``PerTensor``: ``(1,) * x.ndim``;
- ``PerChannel(axis)``: ``x.shape[axis]`` on ``axis``, 1 elsewhere;
- ``PerToken``: ``x.shape[:-1] + (1,)``;
- ``PerGroup(g)``: ``x.shape[:-1] + (x.shape[-1] // g, 1)`` — it broadcasts against
  ``x.unflatten(-1, (x.shape[-1] // g, g))``; the functions here do that view themselves.

Gradients (straight-through estimator, one autograd function ``_FakeQuantizeAffine``):
``fake_quantize`` passes the gradient to ``x`` unchanged where the code is inside the grid and
zeroes it where it was clipped — bit for bit torch's fake-quantize mask (a composite of
``round_ste`` ops would give ``s·(1/s)`` instead of 1). nf4 / fp8 pass the gradient straight
through, and their forward is exactly ``dequantize(quantize(x))``. If
``scale`` / ``zero_point`` require grad, they get the LSQ / LSQ+ gradients
(∂x̂/∂s = round(x/s) − x/s inside the grid, q_max − z or q_min − z outside; ∂x̂/∂z = 0 inside,
−s outside); the LSQ gradient scale is applied by the caller (``distiq.quant.lsq``).

16-bit scales (``spec.scale_dtype`` ``float16`` / ``bfloat16``, ``int`` specs): ``round_scale``
rounds every scale the forward uses to the nearest value of that dtype (kept inside its finite
range, at least its smallest subnormal), held in the scale's own dtype. Observers round *before*
the asymmetric zero-point ``z = clamp(q_min − round(x_min / s), q_min, q_max)`` is computed, so
``z`` belongs to the rounded ``s``; learned scales are rounded with a straight-through gradient
(``∂round_scale(s)/∂s = 1``), so the LSQ gradients above are evaluated at the rounded scale.
``float32`` (the default) returns the scale unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from distiq.quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

FP8_E4M3_MAX = 448.0
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``QuantSpec.scale_dtype`` names and the torch dtypes they stand for (also the dtypes in which
``distiq.export.save_packed`` may store scales)."""


class QParams(NamedTuple):
    """Scale and zero-point, shaped for broadcasting (see the module docstring)."""

    scale: torch.Tensor
    zero_point: torch.Tensor


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{what} has {n_bad} NaN/Inf value(s) of {x.numel()}; quantization needs finite "
            "values: fix the model or data that produced them (e.g. a diverged training run)"
        )


def group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` viewed so that ``QParams`` of ``spec`` broadcast against it (groups unflattened)."""
    if isinstance(spec.granularity, PerGroup):
        size = spec.granularity.size
        if x.shape[-1] % size:
            raise ValueError(
                f"group size {size} does not divide the last dimension {x.shape[-1]} of a tensor "
                f"of shape {tuple(x.shape)}; choose a group size that divides it (e.g. "
                f"{_divisor_hint(x.shape[-1], size)}) or use per_channel"
            )
        return x.unflatten(-1, (x.shape[-1] // size, size))
    return x


def _divisor_hint(n: int, size: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - size))


def _rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Return ``x`` as ``(rows, cols)`` (statistics per row) and the broadcast shape of qparams."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return x.reshape(1, -1), (1,) * x.ndim
    if isinstance(g, PerChannel):
        axis = g.axis % x.ndim if x.ndim else 0
        if not -x.ndim <= g.axis < x.ndim:
            raise ValueError(f"per_channel axis {g.axis} is out of range for a {x.ndim}-d tensor")
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), tuple(shape)
    if isinstance(g, PerToken):
        return x.reshape(-1, x.shape[-1]), (*x.shape[:-1], 1)
    if isinstance(g, PerGroup):
        grouped = group_view(x, spec)
        return grouped.reshape(-1, g.size), (*grouped.shape[:-1], 1)
    raise TypeError(f"unsupported granularity {g!r}")


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``scale`` rounded to the nearest ``scale_dtype`` value, in ``scale``'s dtype and shape.

    Args:
        scale: positive scales, any shape, float32 (or float64).
        scale_dtype: ``float32`` (returns ``scale`` itself), ``float16`` or ``bfloat16``.

    Returns:
        ``scale.clamp(max=finfo.max).to(scale_dtype).to(scale.dtype)``, floored at the dtype's
        smallest positive subnormal, so every value is exactly representable in ``scale_dtype``
        (``round_scale(s, "float16").half().float() == round_scale(s, "float16")``). When
        ``scale`` requires grad the result is straight-through: its gradient is passed to
        ``scale`` unchanged (the forward value is the rounded one exactly, not
        ``s + (r - s)``, which can round in float32).
    """
    if scale_dtype == "float32":
        return scale
    target = SCALE_DTYPES[scale_dtype]
    info = torch.finfo(target)
    with torch.no_grad():
        detached = scale.detach()
        rounded = detached.clamp(max=info.max).to(target).to(detached.dtype)
        rounded = rounded.clamp(min=info.smallest_normal * info.eps)  # smallest subnormal
    if scale.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(scale, rounded)  # defined below
    return rounded


def _qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero-point from per-row ranges (``xmin <= 0 <= xmax`` enforced)."""
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    qmin, qmax = spec.quant_min, spec.quant_max
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        absmax = torch.maximum(-xmin, xmax)
        scale = round_scale(torch.clamp(absmax / ((qmax - qmin) / 2), min=eps), spec.scale_dtype)
        zero = torch.full_like(scale, 0.0 if spec.is_signed else float((qmax + qmin + 1) // 2))
    else:
        scale = round_scale(torch.clamp((xmax - xmin) / (qmax - qmin), min=eps), spec.scale_dtype)
        zero = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax)  # from the rounded scale
    return scale, zero


def _int_fake_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, spec.quant_min, spec.quant_max)
    return (q - zero) * scale


def _mse_search(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's clipping search: shrink the range by ``p = 1 - i/grid`` and keep, per row, the
    ``p`` whose quantization error ``Σ |x - q(x)|^norm`` is smallest."""
    xmin = rows.min(dim=1).values.clamp(max=0.0)
    xmax = rows.max(dim=1).values.clamp(min=0.0)
    best_err = torch.full_like(xmin, float("inf"))
    best_scale, best_zero = _qparams_from_range(xmin, xmax, spec)
    for i in range(int(spec.mse_max_shrink * spec.mse_grid) + 1):
        p = 1.0 - i / spec.mse_grid
        scale, zero = _qparams_from_range(p * xmin, p * xmax, spec)
        err = (_int_fake_rows(rows, scale[:, None], zero[:, None], spec) - rows).abs()
        err = err.pow(spec.mse_norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _percentile_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(100 - p)``-th and ``p``-th percentiles (nearest rank, by ``kthvalue``)."""
    n = rows.shape[1]
    k_hi = max(1, min(n, round(spec.percentile / 100 * n)))
    if spec.symmetric:
        hi = rows.abs().kthvalue(k_hi, dim=1).values
        return -hi, hi
    k_lo = max(1, min(n, n + 1 - k_hi))
    return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


def choose_qparams(x: torch.Tensor, spec: QuantSpec, *, check_finite: bool = True) -> QParams:
    """Choose scale and zero-point for ``x`` under ``spec`` with the spec's observer.

    Args:
        x: the tensor to quantize, any shape (a weight ``(out, in)``, activations ``(..., D)``).
        spec: how to quantize it.
        check_finite: raise ``ValueError`` when ``x`` holds NaN/Inf.

    Returns:
        ``QParams(scale, zero_point)``, float32, shaped as the module docstring says. For
        ``nf4`` the scale is the blockwise absmax and the zero-point is 0; for ``fp8_e4m3`` the
        scale maps the absmax to 448 and the zero-point is 0.
    """
    if check_finite:
        _check_finite(x, "tensor to quantize")
    with torch.no_grad():
        rows, shape = _rows(x.detach().float(), spec)
        if spec.format == "nf4" or spec.format == "fp8_e4m3":
            absmax = rows.abs().amax(dim=1)
            if spec.observer == "percentile":
                absmax = _percentile_range(rows, spec.replace(symmetric=True))[1]
            top = 1.0 if spec.format == "nf4" else FP8_E4M3_MAX
            scale = torch.clamp(absmax / top, min=torch.finfo(torch.float32).tiny)
            zero = torch.zeros_like(scale)
        elif spec.observer == "mse":
            scale, zero = _mse_search(rows, spec)
        elif spec.observer == "percentile":
            scale, zero = _qparams_from_range(*_percentile_range(rows, spec), spec)
        else:
            scale, zero = _qparams_from_range(rows.min(dim=1).values, rows.max(dim=1).values, spec)
    return QParams(scale.reshape(shape), zero.reshape(shape))


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Codes of ``x``: int32 in ``[quant_min, quant_max]`` (``int``), int32 indices 0-15 into
    ``NF4_CODEBOOK`` (``nf4``), or ``torch.float8_e4m3fn`` values (``fp8_e4m3``).
    Same shape as ``x``."""
    xv = group_view(x, spec)
    if spec.format == "nf4":
        from distiq.quant.nf4 import nf4_codes

        return nf4_codes(xv * (1.0 / scale)).reshape(x.shape)  # bitsandbytes' arithmetic
    if spec.format == "fp8_e4m3":
        return (
            (xv * (1.0 / scale))
            .clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
            .to(torch.float8_e4m3fn)
            .reshape(x.shape)
        )
    q = torch.clamp(torch.round(xv * (1.0 / scale)) + zero_point, spec.quant_min, spec.quant_max)
    return q.to(torch.int32).reshape(x.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize``: ``(q - z) · s`` (``int``), ``codebook[q] · s`` (``nf4``),
    ``float(q) · s`` (``fp8_e4m3``). Returns ``dtype``, shape of ``codes``."""
    cv = group_view(codes, spec)
    if spec.format == "nf4":
        from distiq.quant.nf4 import NF4_CODEBOOK

        values = NF4_CODEBOOK.to(scale.device)[cv.long()] * scale
    elif spec.format == "fp8_e4m3":
        values = cv.to(torch.float32) * scale
    else:
        values = (cv.to(torch.float32) - zero_point) * scale
    return values.reshape(codes.shape).to(dtype)


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _StraightThrough(torch.autograd.Function):
    """Forward: ``x_hat`` exactly (not ``x + (x_hat - x)``, which rounds); backward: the
    gradient goes to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x, x_hat):
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad.sum_to_size(shape) if grad.shape != shape else grad


class _FakeQuantizeAffine(torch.autograd.Function):
    """Integer fake quantization with the straight-through / LSQ gradients.

    Forward (the arithmetic of ``torch.fake_quantize_per_*_affine``):
        r = round(x · (1/s)),  q = r + round(z),  x̂ = (clamp(q, qmin, qmax) − round(z)) · s
    Backward, with ``inside = qmin <= q <= qmax``:
        ∂x = ∂x̂ · inside                                  (exactly torch's mask)
        ∂s = Σ ∂x̂ · (inside ? r − x·(1/s) : clamp(q) − round(z))   (LSQ)
        ∂z = Σ ∂x̂ · (inside ? 0 : −s)                      (LSQ+; through round, straight-through)
    summed over the broadcast dimensions of ``s`` / ``z``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):
        out, inside, z = _fake_quantize_in_place(x, scale, zero_point, quant_min, quant_max, True)
        ctx.quant_range = (quant_min, quant_max)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            ctx.save_for_backward(inside, x, scale, z)
        else:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside = ctx.saved_tensors[0]
        grad_x = grad_scale = grad_zero = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * inside
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, x, scale, z = ctx.saved_tensors
            quant_min, quant_max = ctx.quant_range
            scaled = x * (1.0 / scale)
            rounded = torch.round(scaled)
            if ctx.needs_input_grad[1]:
                clipped = (rounded + z).clamp_(quant_min, quant_max).sub_(z)
                ds = torch.where(inside, rounded.sub_(scaled), clipped)
                grad_scale = _sum_to(ds.mul_(grad), scale.shape)
            if ctx.needs_input_grad[2]:
                dz = torch.where(inside, torch.zeros_like(scaled), -scale.expand_as(scaled))
                grad_zero = _sum_to(grad * dz, z.shape)
        return grad_x, grad_scale, grad_zero, None, None


def _fake_quantize_in_place(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(x̂, inside, z)``: the forward of :class:`_FakeQuantizeAffine` (its operations in their
    order, so the same bits) computed in one float buffer; ``inside`` (the clipping mask) only
    with ``mask``, else None; ``z`` the zero-point as used (rounded when it is learned)."""
    z = torch.round(zero_point) if zero_point.requires_grad else zero_point
    q = x * (1.0 / scale)
    q.round_().add_(z)
    inside = (q >= quant_min).logical_and_(q <= quant_max) if mask else None
    return q.clamp_(quant_min, quant_max).sub_(z).mul_(scale), inside, z


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (straight-through)."""
    return _RoundSTE.apply(x)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize then dequantize ``x`` (same shape and dtype as ``x``), with straight-through
    gradients (see the module docstring). Int8 specs equal ``torch.fake_quantize_per_*_affine``
    exactly."""
    xv = group_view(x, spec)
    if spec.format == "int" and not (
        torch.is_grad_enabled()
        and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)
    ):
        out, _, _ = _fake_quantize_in_place(
            xv, scale, zero_point, spec.quant_min, spec.quant_max, mask=False
        )
    elif spec.format == "int":
        out = _FakeQuantizeAffine.apply(xv, scale, zero_point, spec.quant_min, spec.quant_max)
    else:  # nf4 / fp8: quantize → dequantize, plain straight-through gradient
        codes = quantize(x.detach(), scale.detach(), zero_point, spec)
        values = dequantize(codes, scale.detach(), zero_point, spec, dtype=x.dtype)
        return _StraightThrough.apply(x, values)
    return out.reshape(x.shape).to(x.dtype)
