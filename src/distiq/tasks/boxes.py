"""Box operations in torch (torchvision is not available here): IoU, GIoU, NMS, and reading a
detection batch's ground truth (``ground_truth_of``).

Boxes are ``(..., 4)`` ``(x1, y1, x2, y2)`` in pixels with ``x2 >= x1`` and ``y2 >= y1``; areas
have no "+1" (as in pycocotools and torchvision).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from distiq.tasks.base import require

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "elementwise_giou",
    "elementwise_iou",
    "ground_truth_of",
    "nms",
]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` -> ``(...)`` areas (negative widths count as 0)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(
        min=0
    )


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair: ``(N, 4)``, ``(M, 4)`` -> ``(N, M)``; 0 where the union is empty."""
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def elementwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of aligned pairs: ``(..., 4)``, ``(..., 4)`` -> ``(...)``."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / (union + eps)


def elementwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of aligned pairs, in [-1, 1].

    ``GIoU = IoU - (|C| - |A ∪ B|) / |C|`` with C the smallest box enclosing A and B.
    Shapes: ``(..., 4)``, ``(..., 4)`` -> ``(...)``. ``eps`` keeps degenerate (zero-area) boxes
    finite; differentiable.
    """
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = inter / (union + eps)
    enclose_wh = (
        torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
        - torch.minimum(boxes1[..., :2], boxes2[..., :2])
    ).clamp(min=0)
    enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
    return iou - (enclose - union) / (enclose + eps)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision semantics).

    Boxes are visited by decreasing score (ties: lower index first); a box is dropped when its IoU
    with an already kept box is *greater than* ``iou_threshold``.

    Args:
        boxes: ``(N, 4)`` xyxy; scores: ``(N,)``.
    Returns:
        ``(K,)`` int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"nms expects boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and "
            f"{tuple(scores.shape)}"
        )
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    overlaps = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    kept: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[i + 1 :] |= overlaps[i, i + 1 :]
    return order[torch.as_tensor(kept, dtype=torch.long, device=boxes.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each class separately: ``(N, 4)``, ``(N,)``, ``(N,)`` -> ``(K,)`` kept indices,
    by decreasing score over all classes."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    kept = []
    for label in torch.unique(labels):
        index = torch.nonzero(labels == label).squeeze(1)
        kept.append(index[nms(boxes[index], scores[index], iou_threshold)])
    keep = torch.cat(kept)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def ground_truth_of(
    batch: Mapping[str, Any], num_images: int, num_classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-image ``(boxes (N_i, 4) float, labels (N_i,) int64)`` from a detection batch (lists or
    padded tensors with negative labels as padding); checks shapes and class range."""
    boxes, labels = require(batch, "boxes", "detection"), require(batch, "labels", "detection")
    if len(boxes) != num_images or len(labels) != num_images:
        raise ValueError(
            f"batch has {len(boxes)} box sets and {len(labels)} label sets for {num_images} images"
        )
    out = []
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        image_boxes = torch.as_tensor(image_boxes, dtype=torch.float32).reshape(-1, 4)
        image_labels = torch.as_tensor(image_labels, dtype=torch.long).reshape(-1)
        if image_boxes.shape[0] != image_labels.shape[0]:
            raise ValueError(
                f"image {i}: {image_boxes.shape[0]} boxes but {image_labels.shape[0]} labels"
            )
        keep = image_labels >= 0  # negative labels pad a (B, N) tensor
        image_boxes, image_labels = image_boxes[keep], image_labels[keep]
        if bool((image_labels >= num_classes).any()):
            raise ValueError(
                f"image {i}: class index {int(image_labels.max())} is outside [0, {num_classes}); "
                "check num_classes of the detection task against the dataset's label map"
            )
        if bool((image_boxes[:, 2:] < image_boxes[:, :2]).any()):
            raise ValueError(f"image {i}: a box has x2 < x1 or y2 < y1; boxes must be xyxy pixels")
        out.append((image_boxes, image_labels))
    return out
