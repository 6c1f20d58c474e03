"""Top-k (sparse) KL for cached teacher outputs: the teacher runs once, stores k entries per token.

A cache stores, per position, the teacher's ``k`` largest log-probabilities at the distillation
temperature and their class indices (:func:`teacher_topk`). The mass the teacher puts outside
its top-k is **not dropped**: it becomes one extra "rest" bucket. :func:`topk_kl_divergence`
is the exact KL between the two distributions coarsened to ``k + 1`` buckets (the teacher's top-k
classes, each on its own, and everything else together):

    KL_k = Σ_{i ∈ topk} p_i (log p_i − log q_i)  +  r_p (log r_p − log r_q),
    r_p = 1 − Σ_{i ∈ topk} p_i,   r_q = 1 − Σ_{i ∈ topk} q_i.

Properties: ``0 ≤ KL_k ≤ KL(p ‖ q)`` (coarsening never increases a KL); equality when ``k = V``,
or when the student spreads its rest mass in the same proportions as the teacher; the student
is pushed to give the rest bucket the teacher's total tail mass, not to zero it (the usual
"renormalise over the top-k" shortcut instead teaches the student to put no mass outside them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distiq.distill.divergences import log_probs
from distiq.distill.reduction import Reduction, check_reduction, reduce_masked


def teacher_topk(
    teacher_logits: Tensor, k: int, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """What to cache for :func:`topk_kl_divergence`.

    Args:
        teacher_logits: ``(..., V)``.
        k: entries kept per position, ``1 ≤ k ≤ V``.
        temperature: the distillation temperature (the cache is only valid for this τ).

    Returns:
        ``(log_probs, indices)``, both ``(..., k)``: the top-k values of
        ``log_softmax(teacher_logits / τ)`` (float32, descending) and their int64 class indices.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must lie in [1, {teacher_logits.shape[-1]}] (the vocabulary), got {k}")
    with torch.no_grad():
        values, indices = log_probs(teacher_logits, temperature).topk(k, dim=-1)
    return values, indices


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both sides of ``−log 2`` (Mächler 2012);
    ``x`` is kept below zero by the smallest normal float, so value and gradient stay finite."""
    x = x.clamp_max(-torch.finfo(x.dtype).tiny)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl_divergence(
    student_logits: Tensor,
    teacher_topk_log_probs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL against a cached sparse teacher, with the teacher's tail as one "rest" bucket.

    Args:
        student_logits: ``(..., V)``.
        teacher_topk_log_probs: ``(..., k)`` teacher log-probabilities **at the same τ** (from
            :func:`teacher_topk`); values are log-probabilities of the full-vocabulary teacher
            distribution, not renormalised over the k entries.
        teacher_topk_indices: ``(..., k)`` int64 class indices in ``[0, V)``, distinct per row.
        temperature: τ dividing the student logits (must equal the cache's τ).
        mask, reduction: as :func:`distiq.distill.kl_divergence`.

    Returns:
        The reduced coarsened KL (see the module doc); no τ² factor.

    Numerics: the student's rest mass is floored at the smallest normal float so that a student
    that puts (numerically) all its mass on the teacher's top-k gives a large finite loss.
    """
    check_reduction(reduction)
    if teacher_topk_log_probs.shape != teacher_topk_indices.shape:
        raise ValueError(
            f"cached log-probabilities {tuple(teacher_topk_log_probs.shape)} and indices "
            f"{tuple(teacher_topk_indices.shape)} must have the same shape (..., k)"
        )
    if teacher_topk_indices.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"cached teacher positions {tuple(teacher_topk_indices.shape[:-1])} do not match the "
            f"student logits' positions {tuple(student_logits.shape[:-1])}"
        )
    vocab = student_logits.shape[-1]
    if teacher_topk_indices.numel() and (
        int(teacher_topk_indices.min()) < 0 or int(teacher_topk_indices.max()) >= vocab
    ):
        raise ValueError(
            f"cached teacher indices must lie in [0, {vocab}) (the student's vocabulary); was the "
            "cache written with another tokenizer?"
        )
    log_q_all = log_probs(student_logits, temperature)  # (..., V)
    log_q = log_q_all.gather(-1, teacher_topk_indices.long())  # (..., k)
    log_p = teacher_topk_log_probs.to(log_q.dtype)
    p = log_p.exp()
    head_terms = p * (log_p - log_q)
    head = torch.where(p > 0, head_terms, head_terms.new_zeros(())).sum(-1)

    rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)  # (...)
    # where the teacher has no rest (k = V), the student's rest enters neither the value nor,
    # through a where on a safe input, the gradient
    head_lse = torch.logsumexp(log_q, dim=-1)
    head_lse = torch.where(rest_p > 0, head_lse, torch.full_like(head_lse, -1.0))
    log_rest_q = _log1mexp(head_lse)
    log_rest_q = log_rest_q.clamp_min(math.log(torch.finfo(log_q.dtype).tiny))
    rest_terms = rest_p * (torch.log(rest_p.clamp_min(torch.finfo(log_q.dtype).tiny)) - log_rest_q)
    rest = torch.where(rest_p > 0, rest_terms, rest_terms.new_zeros(()))
    return reduce_masked(head + rest, mask, reduction)
