"""Stateless distillation losses on tensors, and hook-based feature capture.

Nothing here knows about models except :mod:`distiq.distill.capture`, which records module
outputs by name. Conventions shared by every loss:

- logits are ``(..., V)`` (classes last); features ``(..., D)``; attention ``(B, H, Tq, Tk)``;
- ``mask`` is ``(...)``, one flag per position, true where it counts;
- ``reduction``: ``"mean"`` over valid positions (default), ``"sum"``, ``"batchmean"``
  (sum / batch size, as ``F.kl_div``), ``"none"`` — see :mod:`distiq.distill.reduction`;
- temperature divides logits; the τ² factor belongs to the objective, never to a loss.

Logit divergences: :func:`kl_divergence` (forward = ``KL(teacher ‖ student)`` or reverse),
:func:`js_divergence` (generalised JSD with β), :func:`tv_distance`,
:func:`confidence_aware_kl` (BitDistiller), :func:`topk_kl_divergence` (cached sparse teacher
with a "rest" bucket); :func:`soft_cross_entropy`, :func:`cross_entropy` (``ignore_index``).
Features: :func:`feature_mse`, :func:`feature_cosine`, :class:`FeatureProjection`. Attention:
:func:`attention_alignment`. Quantization-aware: :func:`prediction_difference`,
:func:`qk_entropy_loss`, :func:`rounding_regularizer`. Capture: :class:`FeatureCapture`,
:func:`map_layers`.
"""

from distiq.distill.attention import attention_alignment
from distiq.distill.capture import FeatureCapture, glob_match, map_layers, match_modules
from distiq.distill.divergences import (
    confidence_aware_kl,
    cross_entropy,
    js_divergence,
    kl_divergence,
    kl_from_log_probs,
    log_probs,
    sigmoid_as_categorical,
    soft_cross_entropy,
    teacher_confidence,
    tv_distance,
)
from distiq.distill.features import (
    FeatureProjection,
    feature_cosine,
    feature_mse,
    modality_weights,
)
from distiq.distill.quant_terms import (
    DIVERGENCES,
    divergence,
    prediction_difference,
    qk_entropy_loss,
    rounding_regularizer,
    split_heads,
)
from distiq.distill.reduction import REDUCTIONS, reduce_masked
from distiq.distill.sparse import teacher_topk, topk_kl_divergence

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "FeatureCapture",
    "FeatureProjection",
    "attention_alignment",
    "confidence_aware_kl",
    "cross_entropy",
    "divergence",
    "feature_cosine",
    "feature_mse",
    "glob_match",
    "js_divergence",
    "kl_divergence",
    "kl_from_log_probs",
    "log_probs",
    "map_layers",
    "match_modules",
    "modality_weights",
    "prediction_difference",
    "qk_entropy_loss",
    "reduce_masked",
    "rounding_regularizer",
    "sigmoid_as_categorical",
    "soft_cross_entropy",
    "split_heads",
    "teacher_confidence",
    "teacher_topk",
    "topk_kl_divergence",
    "tv_distance",
]
