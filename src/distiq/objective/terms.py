"""Computation of each objective term from one call's inputs (unweighted values).

:class:`Batch` holds what the training loop passed to the objective and derives the token masks:
token-level terms (``task``, ``kd``, ``pd``) count answer tokens only by default — positions whose
*target* is an answer token (``labels != ignore_index``, or ``answer_mask``), shifted by one for
causal language models (the logits at position ``t`` predict token ``t + 1``) — so the prompt and
padding never count. ``tokens: all`` counts every non-padding position (``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distiq.distill import (
    attention_alignment,
    cross_entropy,
    divergence,
    feature_cosine,
    feature_mse,
    modality_weights,
    prediction_difference,
    qk_entropy_loss,
    reduce_masked,
    sigmoid_as_categorical,
    split_heads,
    teacher_confidence,
    topk_kl_divergence,
)
from distiq.objective.config import (
    AttentionTerm,
    FeatureTerm,
    KDTerm,
    PDTerm,
    RegressionTerm,
    TaskTerm,
    Tokens,
)


@dataclass
class Batch:
    """One call's inputs (see :meth:`QuantDistillObjective.forward` for their shapes)."""

    step: int
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    teacher_topk: tuple[Tensor, Tensor] | None = None
    labels: Tensor | None = None
    answer_mask: Tensor | None = None
    attention_mask: Tensor | None = None
    task_loss: Tensor | None = None
    visual_mask: Tensor | None = None
    shift_labels: bool = True
    ignore_index: int = -100

    def require_student_logits(self, term: str) -> Tensor:
        if self.student_logits is None:
            raise ValueError(f"the {term!r} term needs student_logits (..., V)")
        return self.student_logits

    def _positions(self) -> tuple[int, ...]:
        return tuple(self.require_student_logits("token-level").shape[:-1])

    def _shift(self, per_token: Tensor, fill: Any) -> Tensor:
        """``out[..., t] = per_token[..., t + 1]``; the last position gets ``fill``."""
        if not self.shift_labels:
            return per_token
        out = torch.full_like(per_token, fill)
        out[..., :-1] = per_token[..., 1:]
        return out

    def _check_positions(self, tensor: Tensor, what: str) -> None:
        if tuple(tensor.shape) != self._positions():
            raise ValueError(
                f"{what} has shape {tuple(tensor.shape)} but the student logits have positions "
                f"{self._positions()} (logits are (..., V)); they must agree"
            )

    def targets(self) -> Tensor | None:
        """Labels aligned with the logits' positions (shifted for causal LMs), or None."""
        if self.labels is None:
            return None
        self._check_positions(self.labels, "labels")
        return self._shift(self.labels, self.ignore_index)

    def token_mask(self, tokens: Tokens, term: str) -> Tensor | None:
        """Bool ``(...)`` mask of the positions a token-level term counts (None: all)."""
        if tokens == "all":
            if self.attention_mask is None:
                return None
            self._check_positions(self.attention_mask, "attention_mask")
            return self.attention_mask.bool()
        if self.labels is not None:
            targets = self.targets()
            assert targets is not None
            return targets != self.ignore_index
        if self.answer_mask is not None:
            self._check_positions(self.answer_mask, "answer_mask")
            return self._shift(self.answer_mask.bool(), False)
        raise ValueError(
            f"the {term!r} term counts answer tokens (tokens: answer) but neither labels nor "
            f"answer_mask was given; pass one of them, or set {term}.tokens: all"
        )


def _compact(mask: Tensor | None, *tensors: Tensor | None) -> list[Tensor | None]:
    """Keep only the valid positions: ``(..., X) -> (N, X)`` for each tensor (None stays None).

    A token-mean over valid positions is unchanged, and the per-class work (softmax over the
    vocabulary) is done for answer tokens only — in a VQA batch a small part of the sequence.
    """
    if mask is None:
        return list(tensors)
    return [None if t is None else t[mask] for t in tensors]


def task_value(term: TaskTerm, batch: Batch) -> Tensor:
    """The caller's ``task_loss``, or cross-entropy of the student logits on the labels."""
    if batch.task_loss is not None:
        if batch.task_loss.dim() != 0:
            raise ValueError(
                f"task_loss must be a scalar tensor, got shape {tuple(batch.task_loss.shape)}"
            )
        return batch.task_loss
    targets = batch.targets()
    if targets is None:
        raise ValueError(
            "the 'task' term needs labels (the answer-token cross-entropy) or a precomputed "
            "task_loss (e.g. detection or segmentation losses from distiq.tasks)"
        )
    logits = batch.require_student_logits("task")
    logits, targets = _compact(targets != batch.ignore_index, logits, targets)
    assert logits is not None and targets is not None
    return cross_entropy(
        logits, targets, ignore_index=batch.ignore_index, label_smoothing=term.label_smoothing
    )


def check_vocabularies(student_logits: Tensor, teacher_logits: Tensor, what: str) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"{what}: the student predicts {student_logits.shape[-1]} classes but the teacher "
            f"{teacher_logits.shape[-1]}; teacher and student must share one vocabulary / label "
            "set (same tokenizer, same added tokens). Resize the student's embeddings and head "
            "to the teacher's vocabulary, or distil a matching teacher"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{what}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (same batch and sequence)"
        )


def kd_value(term: KDTerm, batch: Batch, temperature: float) -> tuple[Tensor, Tensor | None]:
    """``D(p_T^τ ‖ p_S^τ)`` over the term's tokens (no τ²) and γ for confidence-aware KL."""
    student = batch.require_student_logits("kd")
    mask = batch.token_mask(term.tokens, "kd")
    if batch.teacher_topk is not None:
        if term.divergence != "forward_kl" or term.distribution != "softmax":
            raise ValueError(
                "a cached top-k teacher (teacher_topk) supports kd.divergence: forward_kl with "
                "distribution: softmax only; pass full teacher_logits for other divergences"
            )
        if term.temperature_schedule is not None:
            raise ValueError(
                "a cached top-k teacher holds log-probabilities at one temperature; remove "
                "kd.temperature_schedule or pass full teacher_logits"
            )
        student, log_p, indices = _compact(mask, student, *batch.teacher_topk)
        assert student is not None and log_p is not None and indices is not None
        return topk_kl_divergence(student, log_p, indices, temperature=temperature), None
    if batch.teacher_logits is None:
        raise ValueError("the 'kd' term needs teacher_logits (..., V) or a cached teacher_topk")
    check_vocabularies(student, batch.teacher_logits, "kd")
    labels = batch.targets() if batch.labels is not None else None
    student, teacher, labels = _compact(mask, student, batch.teacher_logits.detach(), labels)
    assert student is not None and teacher is not None
    confidence: Tensor | float | None = term.confidence
    if term.divergence == "confidence_aware_kl" and confidence is None:
        confidence = teacher_confidence(teacher, labels, ignore_index=batch.ignore_index)
    kwargs = {"temperature": temperature, "beta": term.beta, "confidence": confidence}
    if term.distribution == "sigmoid":
        per_class = divergence(
            term.divergence,
            sigmoid_as_categorical(student),
            sigmoid_as_categorical(teacher),
            reduction="none",
            **kwargs,
        )
        value = reduce_masked(per_class.sum(-1), None, "mean")
    else:
        value = divergence(term.divergence, student, teacher, **kwargs)
    gamma = confidence if isinstance(confidence, Tensor) else None
    return value, gamma


def pd_value(term: PDTerm, batch: Batch, fp_logits: Tensor) -> Tensor:
    """``D(p_S^fp ‖ p_Sq)`` over the term's tokens (no τ²)."""
    quant = batch.require_student_logits("pd")
    check_vocabularies(quant, fp_logits, "pd")
    fp_logits, quant = _compact(batch.token_mask(term.tokens, "pd"), fp_logits, quant)
    assert fp_logits is not None and quant is not None
    return prediction_difference(
        fp_logits,
        quant,
        divergence_name=term.divergence,
        temperature=term.temperature,
        beta=term.beta,
    )


def _regression_distance(loss: str, student: Tensor, teacher: Tensor) -> Tensor:
    """Mean elementwise ``l1`` / ``mse`` / ``smooth_l1`` (β = 1) distance; equal shapes."""
    import torch.nn.functional as F

    if loss == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if loss == "smooth_l1":
        return F.smooth_l1_loss(student.float(), teacher.float())
    return F.l1_loss(student.float(), teacher.float())


def _cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def regression_value(
    term: RegressionTerm, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]
) -> Tensor:
    """``Σ_r d(s_r, t_r)`` over the regressions both sides give (``(N, D)`` each, the positions
    to compare already selected; teacher values detached here), plus ``giou_weight · mean(1 −
    GIoU)`` for ``boxes`` ((cx, cy, w, h), ``(N, 4)``). Zero when a regression has no rows."""
    from distiq.tasks.boxes import elementwise_giou

    if not student or set(student) != set(teacher):
        raise ValueError(
            "the 'reg' term compares the regressions of student and teacher (boxes of matched "
            f"queries, depth maps); got student {sorted(student)} and teacher {sorted(teacher)}"
        )
    total: Tensor | None = None
    for name in sorted(student):
        s, t = student[name], teacher[name].detach()
        if s.shape != t.shape:
            raise ValueError(
                f"reg: student {name} {tuple(s.shape)} and teacher {name} {tuple(t.shape)} differ"
            )
        if s.numel() == 0:
            value = s.sum() * 0.0
        else:
            value = _regression_distance(term.loss, s, t)
            if name == "boxes" and term.giou_weight:
                giou = elementwise_giou(_cxcywh_to_xyxy(s.float()), _cxcywh_to_xyxy(t.float()))
                value = value + term.giou_weight * (1 - giou).mean()
        total = value if total is None else total + value
    assert total is not None
    return total


def regression_pd_value(fp: Mapping[str, Tensor], quant: Mapping[str, Tensor]) -> Tensor:
    """``pd`` for outputs without a class distribution (depth): the mean L1 between the
    student's full-precision and quantized regressions, averaged over the regressions."""
    if not quant or set(fp) != set(quant):
        raise ValueError(
            f"pd: full-precision regressions {sorted(fp)} and quantized ones {sorted(quant)} differ"
        )
    values = [_regression_distance("l1", quant[n], fp[n].detach()) for n in sorted(quant)]
    return torch.stack(values).mean()


def _pair_weights(weights: Sequence[float] | None, n_pairs: int, term: str) -> list[float]:
    if weights is None:
        return [1.0 / n_pairs] * n_pairs
    if len(weights) != n_pairs:
        raise ValueError(
            f"{term}.layer_weights has {len(weights)} entries but {n_pairs} layer pairs are "
            "compared; give one weight per pair"
        )
    return list(weights)


def _matching(mask: Tensor | None, positions: tuple[int, ...]) -> Tensor | None:
    return mask if mask is not None and tuple(mask.shape) == positions else None


def feature_value(
    term: FeatureTerm,
    batch: Batch,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
    project: Any,
) -> Tensor:
    """``Σ_l w_l d(φ_l(h_l^S), h_l^T)`` (default ``w_l = 1 / #pairs``).

    ``project(k, features, teacher_width)`` returns the student features of pair ``k`` at the
    teacher's width. A pair's token mask is ``attention_mask`` and its modality weights come from
    ``visual_mask`` when their shape equals the features' token shape (e.g. language-model hidden
    states ``(B, T, D)``); otherwise (e.g. a vision tower's ``(B, P, D)``) every token counts
    with weight 1 and the pair's ``layer_weights`` entry is the way to weight it.
    """
    weights = _pair_weights(term.layer_weights, len(pairs), "feat")
    total: Tensor | None = None
    for k, ((i, j), w) in enumerate(zip(pairs, weights)):
        s, t = student_feats[i], teacher_feats[j].detach()
        if s.shape[-1] != t.shape[-1]:
            s = project(k, s, t.shape[-1])
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(
                f"feat pair {k} (student layer {i}, teacher layer {j}): features "
                f"{tuple(s.shape)} vs {tuple(t.shape)} disagree in their token dimensions; "
                "capture layers that see the same tokens, or fix feat.layer_map"
            )
        positions = tuple(s.shape[:-1])
        mask = _matching(batch.attention_mask, positions)
        token_w = None
        visual = _matching(batch.visual_mask, positions)
        if visual is not None and term.visual_weight != term.text_weight:
            token_w = modality_weights(
                visual, visual_weight=term.visual_weight, text_weight=term.text_weight
            )
        if term.distance == "mse":
            d = feature_mse(s, t, normalize=term.normalize, mask=mask, weights=token_w)
        else:
            d = feature_cosine(s, t, mask=mask, weights=token_w)
        total = w * d if total is None else total + w * d
    assert total is not None
    return total


def attention_value(
    term: AttentionTerm,
    batch: Batch,
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    pairs: Sequence[tuple[int, int]],
) -> Tensor:
    """``Σ_l w_l · align(A_l^S, A_l^T)`` over query rows (padding rows masked)."""
    weights = _pair_weights(term.layer_weights, len(pairs), "attn")
    total: Tensor | None = None
    for (i, j), w in zip(pairs, weights):
        s, t = student_maps[i], teacher_maps[j].detach()
        mask = _matching(batch.attention_mask, (s.shape[0], s.shape[2])) if s.dim() == 4 else None
        d = attention_alignment(s, t, loss=term.loss, inputs=term.inputs, mask=mask)
        total = w * d if total is None else total + w * d
    assert total is not None
    return total


def qk_entropy_value(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    head_dims: Sequence[int],
    attention_mask: Tensor | None,
) -> Tensor:
    """Mean over layers of EdgeQAT's entropy term; q/k are q_proj / k_proj outputs
    ``(B, T, H·Dh)`` (split into heads here) or already ``(B, H, T, Dh)``."""
    if len(queries) != len(keys):
        raise ValueError(
            f"qk_entropy captured {len(queries)} query and {len(keys)} key modules; the patterns "
            "must select one key module per query module"
        )
    total: Tensor | None = None
    for q, k, head_dim in zip(queries, keys, head_dims):
        q4 = split_heads(q, head_dim) if q.dim() == 3 else q
        k4 = split_heads(k, head_dim) if k.dim() == 3 else k
        mask = _matching(attention_mask, (q4.shape[0], q4.shape[2]))
        v = qk_entropy_loss(q4, k4, mask=mask)
        total = v if total is None else total + v
    assert total is not None
    return total / len(queries)


def default_logits(outputs: Any) -> Tensor:
    """Logits from a model's outputs: a tensor, ``.logits``, ``["logits"]`` or ``[0]``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, tuple | list) and outputs:
        logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"cannot find logits in the model's output ({type(outputs).__name__}); pass "
            "logits_fn=... to QuantDistillObjective"
        )
    return logits
