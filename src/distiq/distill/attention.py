"""Attention-map alignment between student and teacher.

Shapes: attention maps are ``(B, H, Tq, Tk)`` — batch, heads, query tokens, key tokens — either
probabilities (rows sum to 1, as Hugging Face models return with ``output_attentions=True``) or
pre-softmax scores ("logits", masked keys at ``-inf`` or a large negative number). ``mask`` is
``(B, Tq)``: the query rows that count. Keys need no mask: a masked key has probability 0 for the
teacher and contributes nothing.

When the head counts differ, both maps are averaged over heads first (the mean of attention
distributions is a distribution); otherwise heads are compared one to one.

Per query row, averaged over heads:

- ``loss="kl"``: ``KL(A_T ‖ A_S) = Σ_k A_T (log A_T − log A_S)`` — zero iff the rows are equal and
  positive otherwise, so *minimising* it makes the student attend like the teacher (MiniLM's
  attention transfer). Student probabilities are floored at the smallest normal float before
  the log.
- ``loss="mse"``: ``Σ_k (A_S − A_T)² / Tk``, the mean squared difference of the probabilities.

The rows are then reduced over valid queries (:func:`distiq.distill.reduction.reduce_masked`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from distiq.distill.divergences import kl_from_log_probs
from distiq.distill.reduction import Reduction, check_reduction, reduce_masked

AttentionLoss = Literal["kl", "mse"]
AttentionInputs = Literal["probs", "logits"]


def _as_probs_and_logs(attn: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
    a = attn if attn.dtype in (torch.float32, torch.float64) else attn.float()
    if inputs == "logits":
        log_a = torch.log_softmax(a, dim=-1)
        return log_a.exp(), log_a
    if inputs == "probs":
        return a, torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))
    raise ValueError(f"inputs must be 'probs' or 'logits', got {inputs!r}")


def attention_alignment(
    student_attn: Tensor,
    teacher_attn: Tensor,
    *,
    loss: AttentionLoss = "kl",
    inputs: AttentionInputs = "probs",
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Distance between student and teacher attention maps; minimising aligns them.

    Args:
        student_attn: ``(B, H_s, Tq, Tk)``.
        teacher_attn: ``(B, H_t, Tq, Tk)`` (usually detached).
        loss: ``"kl"`` (``KL(teacher ‖ student)`` per row) or ``"mse"``.
        inputs: ``"probs"`` (post-softmax) or ``"logits"`` (pre-softmax scores) — both maps.
        mask: ``(B, Tq)`` valid query rows, or None.
        reduction: over the ``(B, Tq)`` rows: ``"mean"``, ``"sum"``, ``"batchmean"``, ``"none"``.
    """
    check_reduction(reduction)
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError(
            "attention maps must be (batch, heads, queries, keys); got "
            f"{tuple(student_attn.shape)} and {tuple(teacher_attn.shape)}"
        )
    s_b, s_h, s_q, s_k = student_attn.shape
    t_b, t_h, t_q, t_k = teacher_attn.shape
    if (s_b, s_q, s_k) != (t_b, t_q, t_k):
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention "
            f"{tuple(teacher_attn.shape)} must agree in batch, queries and keys"
        )
    if loss not in ("kl", "mse"):
        raise ValueError(f"loss must be 'kl' or 'mse', got {loss!r}")
    p_s, log_s = _as_probs_and_logs(student_attn, inputs)
    p_t, log_t = _as_probs_and_logs(teacher_attn.to(p_s.dtype), inputs)
    if s_h != t_h:  # compare head-averaged maps
        p_s = p_s.mean(1, keepdim=True)
        p_t = p_t.mean(1, keepdim=True)
        log_s = torch.log(p_s.clamp_min(torch.finfo(p_s.dtype).tiny))
        log_t = torch.log(p_t.clamp_min(torch.finfo(p_t.dtype).tiny))
    if loss == "kl":
        per_head = kl_from_log_probs(log_t, log_s)  # (B, H, Tq)
    else:
        per_head = (p_s - p_t).pow(2).mean(-1)
    rows = per_head.mean(1)  # (B, Tq)
    return reduce_masked(rows, mask, reduction)
