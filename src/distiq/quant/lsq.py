"""Learned step size quantization: LSQ (learnable scale) and LSQ+ (learnable scale and offset).

Esser et al., "Learned Step Size Quantization" (ICLR 2020) and Bhalgat et al., "LSQ+" (CVPR-W
2020). The forward value is the ordinary fake quantization of ``distiq.quant.functional``:

    x̂ = (clamp(round(x / s) + z, Q_n, Q_p) − z) · s          z = round(zero_point)

and the gradients are those of the straight-through estimator (``functional`` module docstring):

    ∂x̂/∂s = round(x/s) − x/s  inside the grid,   Q_p − z or Q_n − z where clipped
    ∂x̂/∂z = 0                 inside the grid,   −s                   where clipped

multiplied, for ``s`` and ``z`` only, by the LSQ gradient scale ``g = 1 / sqrt(N · Q_p)``, where
``N`` is the number of elements that share one scale (weights: elements per channel / group /
tensor; activations: features per example per scale, i.e. the batch dimension excluded, as in the
paper) and ``Q_p`` the largest code (``spec.quant_max``). The scaling is applied by an identity
autograd function, so the forward value is bit-identical to ``fake_quantize`` with the same
(scale, round(zero_point)).

With a 16-bit ``spec.scale_dtype`` the forward uses ``effective_scale(s)``: ``s`` floored at
``SCALE_MIN`` and rounded to that dtype (``functional.round_scale``) with a straight-through
gradient, so the trained scales are exactly what a 16-bit-scale runtime stores, and the
gradients above are evaluated at the rounded scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distiq.quant.functional import QParams, choose_qparams, fake_quantize, round_scale
from distiq.quant.spec import QuantSpec

SCALE_MIN = torch.finfo(torch.float32).eps


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged (bit for bit) whose gradient is multiplied by ``factor``."""
    return _GradScale.apply(x, factor)


def effective_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale the forward uses for a learned ``scale`` (any shape, same shape out):
    ``round_scale(scale.clamp(min=SCALE_MIN), spec.scale_dtype)``. Differentiable: clamp's
    gradient (zero below ``SCALE_MIN``), then straight through the rounding."""
    return round_scale(scale.clamp(min=SCALE_MIN), spec.scale_dtype)


def lsq_grad_scale(num_elements: int, quant_max: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N · Q_p)`` (``N`` elements per scale, ``Q_p`` largest code)."""
    if num_elements < 1 or quant_max < 1:
        raise ValueError(
            f"LSQ gradient scale needs num_elements >= 1 and quant_max >= 1, got "
            f"{num_elements} and {quant_max}"
        )
    return 1.0 / math.sqrt(num_elements * quant_max)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    *,
    num_elements: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with LSQ / LSQ+ gradients for ``scale`` / ``zero_point``.

    Args:
        x: any shape; ``scale`` / ``zero_point`` broadcast against it as ``QParams`` do.
        scale: positive scales (a leaf parameter to learn); values below float32 eps are clamped,
            and rounded to ``spec.scale_dtype`` (``effective_scale``).
        zero_point: float zero-points; learned (LSQ+) when it requires grad, rounded in forward.
        spec: an ``int`` spec.
        num_elements: elements per scale ``N`` for the gradient scale; default
            ``x.numel() // scale.numel()`` (right for weights; activations pass features per
            example).

    Returns:
        ``x̂``, shape and dtype of ``x``.
    """
    if spec.format != "int":
        raise ValueError(f"LSQ needs format 'int', not {spec.format!r}")
    n = num_elements if num_elements is not None else max(1, x.numel() // scale.numel())
    factor = lsq_grad_scale(n, spec.quant_max)
    s = grad_scale(effective_scale(scale, spec), factor)
    z = grad_scale(zero_point, factor) if zero_point.requires_grad else zero_point
    return fake_quantize(x, s, z, spec)


class LsqQuantizer(nn.Module):
    """Learnable scale (and, for asymmetric specs, zero-point: LSQ+) for one tensor.

    ``scale`` and ``zero_point`` have the ``QParams`` shape of the tensor they quantize. They are
    initialised from the spec's observer on ``init`` (LSQ's paper uses ``2·mean|x|/sqrt(Q_p)``;
    starting from the observer's range keeps the first steps identical to a calibrated static
    quantizer, which is what QAT from a PTQ start wants).
    """

    def __init__(self, spec: QuantSpec, init: torch.Tensor) -> None:
        super().__init__()
        if not spec.learnable or spec.format != "int":
            raise ValueError("LsqQuantizer needs an int spec with learnable=True")
        self.spec = spec
        qparams = choose_qparams(init, spec.replace(learnable=False))
        self.scale = nn.Parameter(qparams.scale.clone())
        if spec.symmetric:
            self.register_buffer("zero_point", qparams.zero_point.clone())
        else:
            self.zero_point = nn.Parameter(qparams.zero_point.clone())

    def qparams(self) -> QParams:
        """The (detached) scale and rounded zero-point the forward uses."""
        return QParams(
            effective_scale(self.scale.detach(), self.spec), torch.round(self.zero_point.detach())
        )

    def forward(self, x: torch.Tensor, num_elements: int | None = None) -> torch.Tensor:
        return lsq_fake_quantize(
            x, self.scale, self.zero_point, self.spec, num_elements=num_elements
        )
