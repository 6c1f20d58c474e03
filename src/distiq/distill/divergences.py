"""Logit divergences and cross-entropies, with temperature, masks and explicit reductions.

Shapes: logits are ``(..., V)`` with the classes (vocabulary) last; ``mask`` is ``(...)`` — one
flag per position (token, patch, pixel), true where the position counts. Every function computes
one value per position, then reduces it with :func:`distiq.distill.reduction.reduce_masked`
(default ``"mean"``: mean over valid positions; ``"sum"``, ``"batchmean"``, ``"none"``).

Temperature divides both sets of logits, ``p^τ = softmax(z / τ)``. The Hinton ``τ²`` factor that
keeps gradient magnitudes comparable across temperatures is **not** applied here: the objective
(:class:`distiq.objective.QuantDistillObjective`) applies it, once.

Arithmetic is done in float32 at least (half / bfloat16 logits are upcast; float64 stays float64).

Definitions (p = teacher distribution, q = student distribution, both at temperature τ):

- forward KL  ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` (Hinton et al. 2015; mean-seeking);
- reverse KL  ``KL(q ‖ p)`` (MiniLLM; mode-seeking);
- generalised Jensen–Shannon with mixing weight β ∈ (0, 1) (Huszár 2015; GKD, Agarwal et al. 2024):
  ``JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m)``, ``m = β p + (1 − β) q``. β = 0.5 is the usual
  symmetric JS (bounded by log 2). As β → 0, ``JSD_β / β → KL(p ‖ q)`` (forward KL); as β → 1,
  ``JSD_β / (1 − β) → KL(q ‖ p)`` (reverse KL): the limits recover the two KLs up to the
  vanishing factor, which is the sense in which JSD_β interpolates between them;
- total variation ``TV = ½ Σ_v |p_v − q_v|`` (∈ [0, 1]);
- confidence-aware KL (BitDistiller, Du et al. 2024): ``γ KL(q ‖ p) + (1 − γ) KL(p ‖ q)``,
  where γ is the teacher's confidence — the mean probability the teacher gives to the
  ground-truth tokens (or to its own top-1 class when no labels are given). A confident teacher
  leans on mode-seeking reverse KL, an unsure one on mean-seeking forward KL.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distiq.distill.reduction import Reduction, check_reduction, reduce_masked

Direction = Literal["forward", "reverse"]


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)`` over the last axis, in float32 at least."""
    _check_temperature(temperature)
    z = _float(logits)
    if temperature != 1.0:
        z = z / temperature
    return F.log_softmax(z, dim=-1)


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        hint = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (
                f": the vocabularies differ ({student_logits.shape[-1]} student classes vs "
                f"{teacher_logits.shape[-1]} teacher classes); student and teacher must share "
                "one tokenizer / label set"
            )
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., V){hint}"
        )


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-position ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)`` over the last axis.

    Args:
        log_p, log_q: ``(..., V)`` log-probabilities. Classes with ``p_v = 0`` contribute 0 even
            where ``log q_v = −inf`` (e.g. classes masked out in both).

    Returns:
        ``(...)`` non-negative values.
    """
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, terms.new_zeros(())).sum(-1)


def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    direction: Direction = "forward",
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """KL divergence between teacher and student distributions at a temperature.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``, same shape (usually computed without gradient).
        temperature: τ > 0; both logits are divided by τ. No τ² factor here.
        direction: ``"forward"`` = ``KL(p_T ‖ p_S)`` (Hinton); ``"reverse"`` = ``KL(p_S ‖ p_T)``.
        mask: ``(...)`` valid positions (e.g. answer tokens), or None for all.
        reduction: ``"mean"`` over valid positions (default), ``"sum"``, ``"batchmean"``
            (sum / first dimension, as ``F.kl_div``), or ``"none"`` (``(...)``).
    """
    check_reduction(reduction)
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    _check_pair(student_logits, teacher_logits)
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits, temperature)
    if direction == "forward":
        values = kl_from_log_probs(log_p, log_q)
    else:
        values = kl_from_log_probs(log_q, log_p)
    return reduce_masked(values, mask, reduction)


def js_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Generalised Jensen–Shannon divergence ``β KL(p_T ‖ m) + (1 − β) KL(p_S ‖ m)``.

    ``m = β p_T + (1 − β) p_S`` (mixture computed in log space). ``beta`` must lie in (0, 1);
    ``JSD_β / β → KL(p_T ‖ p_S)`` as β → 0 and ``JSD_β / (1 − β) → KL(p_S ‖ p_T)`` as β → 1.
    Shapes and reductions as :func:`kl_divergence`; per-position values lie in ``[0, H(β)]``
    (``log 2`` for β = 0.5).
    """
    check_reduction(reduction)
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must lie strictly between 0 and 1, got {beta}; for beta -> 0 or 1 use "
            "kl_divergence(direction='forward' / 'reverse'), which JSD_beta/beta approaches"
        )
    _check_pair(student_logits, teacher_logits)
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    values = beta * kl_from_log_probs(log_p, log_m) + (1.0 - beta) * kl_from_log_probs(log_q, log_m)
    return reduce_masked(values, mask, reduction)


def tv_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Total variation distance ``½ Σ_v |p_T,v − p_S,v|`` per position (in [0, 1]).

    Shapes and reductions as :func:`kl_divergence`.
    """
    check_reduction(reduction)
    _check_pair(student_logits, teacher_logits)
    q = log_probs(student_logits, temperature).exp()
    p = log_probs(teacher_logits, temperature).exp()
    values = 0.5 * (p - q).abs().sum(-1)
    return reduce_masked(values, mask, reduction)


def teacher_confidence(
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """BitDistiller's γ: the teacher's mean probability of the target over valid positions.

    Args:
        teacher_logits: ``(..., V)``.
        labels: ``(...)`` class indices aligned with the logits' positions (the token each
            position should predict), or None to use the teacher's own top-1 probability.
            Positions equal to ``ignore_index`` are skipped.
        mask: ``(...)`` extra valid-position mask.

    Returns:
        A detached scalar in [0, 1] (0 when no position is valid). Call it over a calibration set
        and average to get BitDistiller's data-set-level γ.
    """
    with torch.no_grad():
        probs = log_probs(teacher_logits).exp()
        if labels is None:
            target_p = probs.max(dim=-1).values
            valid = mask
        else:
            if labels.shape != teacher_logits.shape[:-1]:
                raise ValueError(
                    f"labels {tuple(labels.shape)} must have the logits' positions' shape "
                    f"{tuple(teacher_logits.shape[:-1])}"
                )
            keep = labels != ignore_index
            safe = torch.where(keep, labels, labels.new_zeros(()))
            target_p = probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            valid = keep if mask is None else keep & mask.bool()
        return reduce_masked(target_p, valid, "mean")


def confidence_aware_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    confidence: float | Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Confidence-aware KL (BitDistiller): ``γ KL(p_S ‖ p_T) + (1 − γ) KL(p_T ‖ p_S)``.

    Args:
        student_logits, teacher_logits: ``(..., V)``.
        confidence: γ in [0, 1] — a float or a tensor broadcastable to the positions ``(...)``.
            None estimates it from this batch with :func:`teacher_confidence` (probability of
            ``labels`` under the teacher at τ = 1, or the teacher's top-1 probability), detached.
        labels: ``(...)`` targets for that estimate (aligned with the logits' positions).
        temperature, mask, reduction: as :func:`kl_divergence`.
    """
    check_reduction(reduction)
    _check_pair(student_logits, teacher_logits)
    if confidence is None:
        confidence = teacher_confidence(
            teacher_logits, labels, mask=mask, ignore_index=ignore_index
        )
    elif isinstance(confidence, float | int) and not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must lie in [0, 1], got {confidence}")
    log_q = log_probs(student_logits, temperature)
    log_p = log_probs(teacher_logits, temperature)
    forward = kl_from_log_probs(log_p, log_q)
    reverse = kl_from_log_probs(log_q, log_p)
    values = confidence * reverse + (1.0 - confidence) * forward
    return reduce_masked(values, mask, reduction)


def soft_cross_entropy(
    student_logits: Tensor,
    target_probs: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy with soft labels: ``−Σ_v t_v log p_S,v`` per position.

    Args:
        student_logits: ``(..., V)``.
        target_probs: ``(..., V)`` target distributions (rows sum to 1), e.g. teacher
            probabilities or smoothed labels. ``H(t, p_S) = KL(t ‖ p_S) + H(t)``: same gradient
            as forward KL, offset by the target's entropy.
        temperature, mask, reduction: as :func:`kl_divergence` (τ divides the student logits).
    """
    check_reduction(reduction)
    if student_logits.shape != target_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and target probabilities "
            f"{tuple(target_probs.shape)} must have the same shape (..., V)"
        )
    log_q = log_probs(student_logits, temperature)
    t = _float(target_probs).to(log_q.dtype)
    terms = t * log_q
    values = -torch.where(t > 0, terms, terms.new_zeros(())).sum(-1)
    return reduce_masked(values, mask, reduction)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy with hard labels (supervised fine-tuning), positions = labels' shape.

    Args:
        logits: ``(..., V)``.
        labels: ``(...)`` integer class indices; ``ignore_index`` marks positions to skip
            (prompt, padding). No shifting is done here: ``labels[i]`` is the target of
            ``logits[i]`` (for causal LMs shift before calling, or let the objective do it).
        label_smoothing: as ``torch.nn.functional.cross_entropy``.
        mask: ``(...)`` extra valid-position mask, combined with ``labels != ignore_index``.
        reduction: ``"mean"`` over valid positions equals ``F.cross_entropy(...,
            ignore_index=...)``'s mean; ``"sum"``, ``"batchmean"``, ``"none"``.
    """
    check_reduction(reduction)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' positions' shape "
            f"{tuple(logits.shape[:-1])} (logits are (..., V))"
        )
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    flat = F.cross_entropy(
        _float(logits).reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return reduce_masked(flat.reshape(labels.shape), valid, reduction)


def sigmoid_as_categorical(logits: Tensor) -> Tensor:
    """``(..., C)`` independent sigmoid logits -> ``(..., C, 2)`` two-class logits ``[x, 0]``.

    ``softmax([x, 0]) = [σ(x), 1 − σ(x)]``, so any divergence above applied to the result and
    summed over ``C`` is the divergence between products of Bernoullis (e.g. detection heads
    with sigmoid / focal class scores).
    """
    return torch.stack([logits, torch.zeros_like(logits)], dim=-1)
