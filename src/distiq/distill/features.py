"""Feature (hidden-state) distillation losses and the projection used when widths differ.

Shapes: features are ``(..., D)`` — e.g. ``(B, T, D)`` hidden states or ``(B, P, D)`` patch
features; ``mask`` and ``weights`` are ``(...)``, one entry per token. Every loss computes one
value per token, then reduces over tokens with
:func:`distiq.distill.reduction.reduce_masked` (default: mean over valid tokens; with
``weights``, the weighted mean ``Σ w·v / Σ w``, which is how visual and text tokens get
different weights without the number depending on how many of each there are).

Per-token values:

- :func:`feature_mse`: ``mean_d (s_d − t_d)²`` — the mean over the feature dimension, so a
  ``"mean"`` reduction without mask equals ``F.mse_loss(s, t)`` and does not grow with ``D``.
  Optional normalisation of both features first: ``"l2"`` (unit vectors; the value is then
  ``(2 − 2 cos) / D``) or ``"layer"`` (zero mean and unit variance over ``D``, LayerNorm without
  affine parameters — the usual choice when student and teacher scales differ).
- :func:`feature_cosine`: ``1 − cos(s, t)`` ∈ [0, 2].

The student's features must already have the teacher's width; :class:`FeatureProjection` is the
learned linear map ``φ: D_s → D_t`` to apply first when they differ.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distiq.distill.reduction import Reduction, check_reduction, reduce_masked

Normalize = Literal["none", "l2", "layer"]


def _check_features(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        hint = ""
        if student.shape[:-1] == teacher.shape[:-1]:
            hint = (
                f"; the widths differ ({student.shape[-1]} vs {teacher.shape[-1]}): project the "
                "student features with FeatureProjection first"
            )
        raise ValueError(
            f"student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} must have the same shape (..., D){hint}"
        )


def _normalize(x: Tensor, how: Normalize) -> Tensor:
    if how == "none":
        return x
    if how == "l2":
        return F.normalize(x, dim=-1)
    if how == "layer":
        return F.layer_norm(x, x.shape[-1:])
    raise ValueError(f"normalize must be 'none', 'l2' or 'layer', got {how!r}")


def feature_mse(
    student: Tensor,
    teacher: Tensor,
    *,
    normalize: Normalize = "none",
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Mean squared error between student and teacher features, per token then reduced.

    Args:
        student: ``(..., D)`` student features (already projected to the teacher's width).
        teacher: ``(..., D)`` teacher features (usually detached).
        normalize: ``"none"``, ``"l2"`` or ``"layer"`` normalisation of both over ``D``.
        mask: ``(...)`` valid tokens (e.g. not padding).
        weights: ``(...)`` relative token weights (e.g. visual vs text tokens).
        reduction: ``"mean"`` (weighted) mean over valid tokens, ``"sum"``, ``"batchmean"``,
            ``"none"``.
    """
    check_reduction(reduction)
    _check_features(student, teacher)
    s = _normalize(student.float() if student.dtype.itemsize < 4 else student, normalize)
    t = _normalize(teacher.to(s.dtype), normalize)
    values = (s - t).pow(2).mean(-1)
    return reduce_masked(values, mask, reduction, weights=weights)


def feature_cosine(
    student: Tensor,
    teacher: Tensor,
    *,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: Reduction = "mean",
    eps: float = 1e-8,
) -> Tensor:
    """Cosine distance ``1 − cos(s, t)`` per token over ``D``, then reduced.

    Args as :func:`feature_mse`; ``eps`` guards zero vectors (as ``F.cosine_similarity``).
    """
    check_reduction(reduction)
    _check_features(student, teacher)
    s = student.float() if student.dtype.itemsize < 4 else student
    values = 1.0 - F.cosine_similarity(s, teacher.to(s.dtype), dim=-1, eps=eps)
    return reduce_masked(values, mask, reduction, weights=weights)


class FeatureProjection(nn.Module):
    """Learned linear map ``φ: (..., D_s) -> (..., D_t)`` from student to teacher width.

    Initialised so that ``φ`` copies the first ``min(D_s, D_t)`` dimensions (identity-like) —
    training starts from "compare what is comparable" rather than from a random rotation.
    Its parameters must be trained with the student (add them to the optimizer).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, bias: bool = False) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"widths must be positive, got {student_dim} -> {teacher_dim}")
        self.linear = nn.Linear(student_dim, teacher_dim, bias=bias)
        with torch.no_grad():
            self.linear.weight.zero_()
            n = min(student_dim, teacher_dim)
            self.linear.weight[:n, :n] = torch.eye(n)
            if bias:
                self.linear.bias.zero_()

    @property
    def student_dim(self) -> int:
        return self.linear.in_features

    @property
    def teacher_dim(self) -> int:
        return self.linear.out_features

    def forward(self, features: Tensor) -> Tensor:
        """``(..., D_s) -> (..., D_t)``."""
        if features.shape[-1] != self.student_dim:
            raise ValueError(
                f"expected student features of width {self.student_dim}, got {features.shape[-1]}"
            )
        return self.linear(features.to(self.linear.weight.dtype))


def modality_weights(
    visual_mask: Tensor, *, visual_weight: float = 1.0, text_weight: float = 1.0
) -> Tensor:
    """Per-token weights from a ``(...)`` bool mask of visual tokens: ``visual_weight`` where
    true, ``text_weight`` elsewhere (float32, same shape)."""
    if visual_weight < 0 or text_weight < 0:
        raise ValueError("modality weights must be non-negative")
    visual = visual_mask.bool()
    return torch.where(
        visual,
        torch.tensor(visual_weight, dtype=torch.float32, device=visual.device),
        torch.tensor(text_weight, dtype=torch.float32, device=visual.device),
    )
