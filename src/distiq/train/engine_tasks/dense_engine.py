"""The forward path of dense vision models, and what distillation compares between two of them.

:class:`DenseEngine` wraps a model and its :class:`distiq.models.DenseAdapter` so that the
training loop, calibration and PTQ run it on :class:`~.dense_data.DenseSplit` batches.

Query matching (DETR-style detection). A student's queries have no fixed correspondence with
the teacher's: RT-DETR picks its queries from the encoder's top-scoring proposals, and even
DETR's learned query embeddings drift apart during training. :func:`match_queries` therefore
pairs them image by image with the Hungarian algorithm (scipy's ``linear_sum_assignment``) on
the cost DETR's own matcher uses, with the teacher's predictions as the targets:
``L1(boxes) + (1 − GIoU(boxes)) + class cost``, the class cost being the L1 distance between the
two queries' class-probability vectors. Every teacher query is matched (min(Q_s, Q_t) pairs),
background queries included, so the student learns the teacher's "no object" too; the same
matching pairs the student's full-precision and quantized queries for the ``pd`` term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distiq.models.dense import DenseOutputs, cxcywh_to_xyxy


class DenseEngine(nn.Module):
    """A dense model (``model``, with ``adapter``) run on dense batches.

    ``forward(batch, heads=False, targets=False)`` returns :class:`distiq.models.DenseOutputs`;
    with ``targets`` the model also gets the batch's training targets (detection: its own
    Hungarian-matched loss). ``heads`` is the VLM forward paths' flag, accepted so that
    calibration runs every path alike; a dense model has no optional heads. The wrapped model
    is ``inner``: quantize, hook and save ``inner``.
    """

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        super().__init__()
        self.inner = model
        self.adapter = adapter

    def forward(
        self, batch: Mapping[str, Any], heads: bool = False, targets: bool = False
    ) -> DenseOutputs:
        model_targets = batch.get("targets") if targets else None
        return self.adapter.forward(self.inner, batch["pixel_values"], targets=model_targets)

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch as keyword arguments of the Hugging Face model (what PTQ calibrates on)."""
        return self.adapter.model_inputs(batch["pixel_values"])


def query_cost(
    student_probs: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_boxes: torch.Tensor,
) -> torch.Tensor:
    """``(Q_s, Q_t)`` matching cost of one image: L1 between boxes ((cx, cy, w, h)) + 1 − GIoU
    + L1 between class-probability vectors. Probabilities ``(Q, C)``, boxes ``(Q, 4)``."""
    from distiq.tasks.boxes import elementwise_giou

    box_l1 = torch.cdist(student_boxes.float(), teacher_boxes.float(), p=1)
    student_xyxy = cxcywh_to_xyxy(student_boxes.float())[:, None]
    teacher_xyxy = cxcywh_to_xyxy(teacher_boxes.float())[None, :]
    giou = elementwise_giou(
        student_xyxy.expand(-1, teacher_boxes.shape[0], -1),
        teacher_xyxy.expand(student_boxes.shape[0], -1, -1),
    )
    class_l1 = torch.cdist(student_probs.float(), teacher_probs.float(), p=1)
    return box_l1 + (1 - giou) + class_l1


@torch.no_grad()
def match_queries(
    student_probs: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_boxes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian pairs of student and teacher queries, image by image (module docstring).

    Args:
        student_probs / teacher_probs: ``(B, Q_s, C)`` / ``(B, Q_t, C)`` class probabilities.
        student_boxes / teacher_boxes: ``(B, Q_s, 4)`` / ``(B, Q_t, 4)`` (cx, cy, w, h).
    Returns:
        ``(student_pairs, teacher_pairs)``, each ``(N, 2)`` int64 rows ``(image, query)``,
        N = B · min(Q_s, Q_t); row k of one is matched with row k of the other.
    """
    from scipy.optimize import linear_sum_assignment

    student_pairs, teacher_pairs = [], []
    for b in range(student_probs.shape[0]):
        cost = query_cost(student_probs[b], student_boxes[b], teacher_probs[b], teacher_boxes[b])
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        index = torch.full((len(rows),), b, dtype=torch.long)
        student_pairs.append(torch.stack([index, torch.as_tensor(rows, dtype=torch.long)], 1))
        teacher_pairs.append(torch.stack([index, torch.as_tensor(cols, dtype=torch.long)], 1))
    return torch.cat(student_pairs), torch.cat(teacher_pairs)


def pick(tensor: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Rows ``tensor[b, q]`` for each ``(b, q)`` of ``pairs`` ``(N, 2)``: ``(N, ...)``."""
    pairs = pairs.to(tensor.device)
    return tensor[pairs[:, 0], pairs[:, 1]]


def binary_logits(logits: torch.Tensor) -> torch.Tensor:
    """Independent sigmoid scores ``(..., C)`` as C two-way distributions ``(..., C, 2)`` =
    ``[0, z]``: a softmax of ``[0, z]`` is ``[1 − σ(z), σ(z)]``, so the objective's softmax
    divergences (with their temperature) compare the Bernoulli ``σ(z / τ)``."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def pixel_logits(logits: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(B, C, h, w)`` logits as one class distribution per pixel ``(B·h·w, C)``, resized
    (bilinear) to ``size`` first when given."""
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def feature_tokens(
    features: Sequence[torch.Tensor], like: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Captured stage outputs as channel-last tokens ``(B, N, C)``: feature maps ``(B, C, h, w)``
    are resized (bilinear) to the matching entry of ``like`` (the teacher's maps, when the
    student's are another size) and flattened; ``(B, N, D)`` tokens pass through."""
    out = []
    for k, feature in enumerate(features):
        if feature.dim() == 4:
            if like is not None and like[k].dim() == 4 and like[k].shape[-2:] != feature.shape[-2:]:
                feature = F.interpolate(
                    feature, size=like[k].shape[-2:], mode="bilinear", align_corners=False
                )
            feature = feature.flatten(2).transpose(1, 2)
        out.append(feature)
    return out
