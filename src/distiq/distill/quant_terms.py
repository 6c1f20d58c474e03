"""Quantization-aware terms: prediction difference, Q/K entropy, rounding / range regulariser.

All three are pure functions of tensors; the objective finds the tensors in a model.

- :func:`prediction_difference` (PD-Quant's idea, Liu et al. 2023): a divergence between the
  student's own full-precision prediction and its quantized prediction on the same input. The
  full-precision side is the target and is detached by default.
- :func:`qk_entropy_loss` (EdgeQAT, Shen et al. 2024): ``−Σ_h [log(1 + Var(Q_h)) + log(1 +
  Var(K_h))]``. Quantization collapses the spread of queries and keys (lower entropy, assuming
  Gaussian values, entropy grows with log-variance); maximising the variance counters that.
  As in EdgeQAT's reference code the variance of each token's per-head vector is taken over the
  head dimension (``correction=0``); ``log(1 + Var)`` is averaged over valid tokens and summed
  over heads. The term is ≤ 0 and unbounded below: give it a small weight.
- :func:`rounding_regularizer`: the weight-domain quantization error ``(w − ŵ)²`` with the integer
  codes ``n = clamp(round(w / s) + round(z), q_min, q_max)`` held constant, ``ŵ = s (n − round(z))``
  (``distiq.quant``'s grid: ``ŵ`` is exactly ``fake_quantize(w)``; ``round(z)`` passes its
  gradient straight through, as LSQ+ does). Inside
  the range it is ``s² (w/s − round(w/s))²``: its gradient pulls each weight to
  the nearest grid point. Outside the range it is the clipping error: its gradient pulls the
  weight (and, through ``s`` and ``z``, the range) so the range covers the weight. Gradients
  reach ``scale`` and ``zero_point`` too when they are learnable (LSQ / LSQ+).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from distiq.distill.divergences import (
    confidence_aware_kl,
    js_divergence,
    kl_divergence,
    tv_distance,
)
from distiq.distill.reduction import Reduction, check_reduction, reduce_masked

Divergence = Literal["forward_kl", "reverse_kl", "js", "tv", "confidence_aware_kl"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "js", "tv", "confidence_aware_kl")


def divergence(
    name: Divergence,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    confidence: float | Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Dispatch to a divergence by its config name (``forward_kl``, ``reverse_kl``, ``js``,
    ``tv``, ``confidence_aware_kl``). ``beta`` is used by ``js``, ``confidence`` and ``labels`` by
    ``confidence_aware_kl``. Shapes as :func:`distiq.distill.kl_divergence`."""
    common = {"temperature": temperature, "mask": mask, "reduction": reduction}
    if name == "forward_kl":
        return kl_divergence(student_logits, teacher_logits, direction="forward", **common)
    if name == "reverse_kl":
        return kl_divergence(student_logits, teacher_logits, direction="reverse", **common)
    if name == "js":
        return js_divergence(student_logits, teacher_logits, beta=beta, **common)
    if name == "tv":
        return tv_distance(student_logits, teacher_logits, **common)
    if name == "confidence_aware_kl":
        return confidence_aware_kl(
            student_logits, teacher_logits, confidence=confidence, labels=labels, **common
        )
    raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")


def prediction_difference(
    fp_logits: Tensor,
    quant_logits: Tensor,
    *,
    divergence_name: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    detach_fp: bool = True,
) -> Tensor:
    """Divergence ``D(p_S^fp ‖ p_Sq)`` between the full-precision and the quantized prediction.

    Args:
        fp_logits: ``(..., V)`` logits of the student with fake quantization disabled (e.g.
            under ``distiq.quant.fake_quant_disabled(model)``), same weights, same input.
        quant_logits: ``(..., V)`` logits of the fake-quantized student (the trained path).
        divergence_name: which divergence; the fp path plays the teacher's role.
        detach_fp: treat the fp prediction as a fixed target (PD-Quant); False lets gradients
            flow through both paths.
        temperature, beta, mask, reduction: as the divergences.
    """
    target = fp_logits.detach() if detach_fp else fp_logits
    return divergence(
        divergence_name,
        quant_logits,
        target,
        temperature=temperature,
        beta=beta,
        mask=mask,
        reduction=reduction,
    )


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """``(B, T, H·Dh) -> (B, H, T, Dh)`` (the layout of q_proj / k_proj outputs)."""
    if x.dim() != 3 or x.shape[-1] % head_dim:
        raise ValueError(
            f"expected (batch, tokens, heads*head_dim) with a width divisible by head_dim="
            f"{head_dim}, got {tuple(x.shape)}"
        )
    b, t, width = x.shape
    return x.view(b, t, width // head_dim, head_dim).transpose(1, 2)


def _head_log_var(x: Tensor, mask: Tensor | None) -> Tensor:
    """Σ_h mean over valid (batch, token) of ``log(1 + Var_d x[b, h, t, :])``."""
    if x.dim() != 4:
        raise ValueError(
            f"queries/keys must be (batch, heads, tokens, head_dim), got {tuple(x.shape)}"
        )
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    log_var = torch.log1p(x.var(dim=-1, correction=0))  # (B, H, T)
    if mask is None:
        return log_var.mean(dim=(0, 2)).sum()
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"mask must be (batch, tokens) = {(x.shape[0], x.shape[2])}, got {tuple(mask.shape)}"
        )
    valid = mask.bool().unsqueeze(1)  # (B, 1, T)
    kept = torch.where(valid, log_var, log_var.new_zeros(()))
    return (kept.sum(dim=(0, 2)) / valid.sum().clamp_min(1).to(x.dtype)).sum()


def qk_entropy_loss(queries: Tensor, keys: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """EdgeQAT's entropy term ``−Σ_h [log(1 + Var(Q_h)) + log(1 + Var(K_h))]`` for one layer.

    Args:
        queries: ``(B, H, T, Dh)`` (quantized) queries; use :func:`split_heads` on q_proj output.
        keys: ``(B, H_kv, T, Dh)`` keys (grouped-query attention: ``H_kv`` may differ).
        mask: ``(B, T)`` valid tokens (not padding), or None.

    Returns:
        A scalar ≤ 0: per head, the mean over valid tokens of ``log(1 + Var_d)`` (variance over
        the head dimension), summed over heads, for queries plus keys, negated.
    """
    return -(_head_log_var(queries, mask) + _head_log_var(keys, mask))


def _aligned_qparams(
    weight: Tensor, scale: Tensor | float, zero_point: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weight_view, scale, zero_point)`` that broadcast together.

    Per-group parameters come as ``(..., in // g, 1)`` (``distiq.quant``'s layout) or
    ``(..., in // g)``; the weight ``(..., in)`` is then viewed as ``(..., in // g, g)``.
    """
    s = scale if isinstance(scale, Tensor) else torch.tensor(float(scale), device=weight.device)
    z = (
        zero_point
        if isinstance(zero_point, Tensor)
        else torch.tensor(float(zero_point), device=weight.device)
    )
    lead, width = weight.shape[:-1], weight.shape[-1] if weight.dim() else 1
    groups = None
    if s.dim() == weight.dim() + 1 and s.shape[-1] == 1 and s.shape[:-2] == lead:
        groups = s.shape[-2]
    elif (
        weight.dim() >= 1
        and s.dim() == weight.dim()
        and s.shape[:-1] == lead
        and s.shape[-1] not in (1, width)
    ):
        groups = s.shape[-1]
        s = s.unsqueeze(-1)
        if z.dim() == weight.dim() and z.shape[-1] == groups:
            z = z.unsqueeze(-1)
    if groups is not None:
        if width % groups:
            raise ValueError(
                f"per-group scale with {groups} groups does not divide the weight's last "
                f"dimension {width}"
            )
        weight = weight.unflatten(-1, (groups, width // groups))
    for what, p in (("scale", s), ("zero_point", z)):
        if not _broadcasts(p.shape, weight.shape):
            raise ValueError(
                f"{what} of shape {tuple(p.shape)} does not broadcast against the weight "
                f"{tuple(weight.shape)} (per tensor, per channel (out, 1), or per group "
                "(out, in // group_size[, 1]) are accepted)"
            )
    return weight, s.to(weight.dtype), z.to(weight.dtype)


def _broadcasts(param: torch.Size, target: torch.Size) -> bool:
    """Whether ``param`` broadcasts to ``target`` without changing it (a fast pure-Python
    check; ``torch.broadcast_shapes`` is slow enough to matter once per module and step)."""
    if len(param) > len(target):
        return False
    return all(p in (1, t) for p, t in zip(reversed(param), reversed(target)))


def rounding_regularizer(
    weight: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float,
    quant_min: int,
    quant_max: int,
    *,
    reduction: Reduction = "mean",
    check_scale: bool = True,
) -> Tensor:
    """Weight-domain quantization error with the codes held constant (pulls weights to the grid).

    Args:
        weight: ``(out, in)`` (or any shape) full-precision weight.
        scale: step size ``s > 0``; a float or a tensor broadcastable to ``weight`` (per tensor
            ``()``, per channel ``(out, 1)``) or per group ``(out, in // group_size, 1)`` (the
            layout of ``distiq.quant.choose_qparams``) or ``(out, in // group_size)``.
        zero_point: ``z`` in code units, same layout as ``scale`` (may be fractional / learnable).
        quant_min, quant_max: the integer grid ``[q_min, q_max]`` (e.g. −8, 7 for signed 4-bit).
        reduction: over weight elements: ``"mean"`` (default), ``"sum"``, ``"batchmean"``
            (sum / ``weight.shape[0]``), ``"none"`` (weight-shaped).
        check_scale: raise when a scale is not positive (one device sync); callers that clamp
            their scales themselves (the objective, with ``distiq.quant``'s LSQ floor) skip it.

    Returns:
        ``reduce((w − s · (clamp(round(w / s) + round(z), q_min, q_max) − round(z)))²)``,
        differentiable in ``weight``, ``scale`` and ``zero_point``: the codes are constants (no
        straight-through estimator for them, on purpose), ``round(z)`` is straight-through.
    """
    check_reduction(reduction)
    if quant_min >= quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be below quant_max ({quant_max})")
    w, s, z = _aligned_qparams(weight, scale, zero_point)
    if check_scale and isinstance(scale, Tensor) and bool((scale <= 0).any()):
        raise ValueError("scale must be positive everywhere")
    if reduction in ("mean", "sum"):
        total = _RoundingError.apply(w, s, z, quant_min, quant_max)
        return total / w.numel() if reduction == "mean" else total
    if z.requires_grad:
        z = z + (torch.round(z) - z).detach()  # round(z) forward, identity gradient (LSQ+)
    else:
        z = torch.round(z)
    with torch.no_grad():
        codes = torch.clamp(torch.round(w * torch.reciprocal(s)) + z, quant_min, quant_max)
    error = (w - s * (codes - z)).square()
    return reduce_masked(error.reshape(weight.shape), None, reduction)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the inverse of broadcasting)."""
    if grad.shape == shape:
        return grad
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [
        lead + i for i, size in enumerate(shape) if size == 1 and grad.shape[lead + i] != 1
    ]
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


class _RoundingError(torch.autograd.Function):
    """``Σ (w − s (n − round z))²`` with ``n = clamp(round(w / s) + round z, q_min, q_max)``
    held constant, and its analytic gradients (fewer passes over the weight than autograd):

        ∂/∂w = 2 d,   ∂/∂s = −2 d (n − round z),   ∂/∂z = 2 d s   (d = w − ŵ; round z is
        straight-through, as in LSQ+), each summed over the elements sharing the parameter.
    """

    @staticmethod
    def forward(ctx, w, s, z, quant_min, quant_max):
        z_int = torch.round(z)
        offset = w * torch.reciprocal(s)  # in-place steps below: one buffer for the codes
        offset.round_().add_(z_int).clamp_(quant_min, quant_max).sub_(z_int)  # n − round(z)
        error = torch.addcmul(w, s, offset, value=-1.0)  # d = w − s (n − round z)
        ctx.save_for_backward(error, offset, s)
        ctx.z_shape = z.shape
        return error.flatten().dot(error.flatten())

    @staticmethod
    def backward(ctx, grad):
        error, offset, s = ctx.saved_tensors
        twice = error * (2.0 * grad)
        grad_w = twice if ctx.needs_input_grad[0] else None
        grad_s = _sum_to(twice * offset, s.shape).neg() if ctx.needs_input_grad[1] else None
        grad_z = _sum_to(twice * s, ctx.z_shape) if ctx.needs_input_grad[2] else None
        return grad_w, grad_s, grad_z, None, None
