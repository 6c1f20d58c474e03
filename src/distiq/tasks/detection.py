"""Anchor-free (FCOS-style) object detection: target assignment, losses, decoding, task.

Head outputs (contract with ``distiq.models``), a dict:

- ``"cls_logits"``: ``(B, P, C)`` per-point class logits (sigmoid, no background class);
- ``"box_ltrb"``: ``(B, P, 4)`` non-negative distances in pixels from the point to the box's left,
  top, right and bottom sides;
- ``"points"``: ``(P, 2)`` the points' ``(x, y)`` pixel coordinates; ``"stride"``: int pixels;
- optionally ``"image_size"``: ``(H, W)``, used to clip decoded boxes.

Ground truth (batch): ``batch["boxes"]`` a list of B ``(N_i, 4)`` xyxy pixel tensors and
``batch["labels"]`` a list of B ``(N_i,)`` class indices in ``[0, C)`` — or padded tensors
``(B, N, 4)`` / ``(B, N)`` where a negative label marks padding.

Assignment (FCOS, one feature level): a point is a candidate for a box when it lies strictly
inside it — and, with centre sampling, also inside the box's centre region ``centre ± radius ·
stride`` (clipped to the box); among candidate boxes the one with the smallest area wins (ties:
the lower index). Points without a box are background.

Losses: sigmoid focal loss (α = 0.25, γ = 2) summed over all points and classes and divided by
the number of positive points (at least 1); L1 on the positives' ltrb distances in units of the
stride, averaged over positives × 4 sides; GIoU loss ``1 − GIoU`` of the positives' decoded boxes,
averaged over positives. The normaliser is per process (no all-reduce across data-parallel
workers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distiq.tasks.base import DistillView, Task, TaskLoss, check_problems
from distiq.tasks.boxes import batched_nms, elementwise_giou, ground_truth_of
from distiq.tasks.coco_eval import COCOMeanAP

__all__ = [
    "DetectionTask",
    "assign_points",
    "decode_detections",
    "detection_losses",
    "ltrb_to_boxes",
    "sigmoid_focal_loss",
]


def ltrb_to_boxes(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Boxes from points and side distances: ``(P, 2)``, ``(..., P, 4)`` -> ``(..., P, 4)`` xyxy."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) on independent sigmoid outputs.

    ``FL = −α_t (1 − p_t)^γ log p_t`` with ``p_t = p`` for targets 1 and ``1 − p`` for targets 0,
    ``α_t = α`` for targets 1 and ``1 − α`` for targets 0 (no α weighting when ``alpha`` is None).
    Shapes: ``logits`` and ``targets`` (float in [0, 1]) alike; ``reduction`` ``"sum"``,
    ``"mean"`` (over elements) or ``"none"``.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    targets = targets.to(logits.dtype)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def assign_points(
    points: torch.Tensor,
    gt_boxes: torch.Tensor,
    *,
    stride: float,
    center_sampling: bool = True,
    center_radius: float = 1.5,
) -> torch.Tensor:
    """FCOS assignment of points to ground-truth boxes (see the module docstring).

    Args:
        points: ``(P, 2)`` (x, y) pixels; gt_boxes: ``(N, 4)`` xyxy pixels.
    Returns:
        ``(P,)`` int64: index of the assigned box, ``-1`` for background.
    """
    num_points = points.shape[0]
    if gt_boxes.numel() == 0:
        return torch.full((num_points,), -1, dtype=torch.long, device=points.device)
    x = points[:, 0, None]  # (P, 1)
    y = points[:, 1, None]
    x1, y1, x2, y2 = gt_boxes.unbind(-1)  # each (N,)
    if center_sampling:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        radius = center_radius * stride
        x1, y1 = torch.maximum(x1, cx - radius), torch.maximum(y1, cy - radius)
        x2, y2 = torch.minimum(x2, cx + radius), torch.minimum(y2, cy + radius)
    sides = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1)  # (P, N, 4)
    candidate = sides.min(dim=-1).values > 0  # (P, N)
    area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])  # (N,)
    masked_area = torch.where(candidate, area[None, :], torch.inf)
    best_area, best = masked_area.min(dim=1)  # argmin returns the first minimum
    return torch.where(torch.isfinite(best_area), best, -1)


def _check_outputs(outputs: Mapping[str, Any], num_classes: int) -> tuple[torch.Tensor, ...]:
    missing = [key for key in ("cls_logits", "box_ltrb", "points", "stride") if key not in outputs]
    if missing:
        raise KeyError(
            f"detection head outputs lack {', '.join(missing)}; got {', '.join(map(str, outputs))}"
        )
    cls_logits, box_ltrb, points = outputs["cls_logits"], outputs["box_ltrb"], outputs["points"]
    batch_size, num_points = cls_logits.shape[:2]
    if cls_logits.shape != (batch_size, num_points, num_classes):
        raise ValueError(
            f"cls_logits must be (B, P, {num_classes}), got {tuple(cls_logits.shape)}; "
            "num_classes of the task and the head differ"
        )
    if box_ltrb.shape != (batch_size, num_points, 4) or points.shape != (num_points, 2):
        raise ValueError(
            f"expected box_ltrb (B, P, 4) and points (P, 2) with B={batch_size}, P={num_points}; "
            f"got {tuple(box_ltrb.shape)} and {tuple(points.shape)}"
        )
    return cls_logits, box_ltrb, points


def detection_losses(
    outputs: Mapping[str, Any],
    gt: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    center_sampling: bool = True,
    center_radius: float = 1.5,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unweighted FCOS losses ``{"focal", "l1", "giou"}`` (scalars) and the ``(B, P)`` bool mask of
    positive points. See the module docstring for the assignment and the reductions."""
    cls_logits, box_ltrb, points = _check_outputs(outputs, num_classes)
    stride = float(outputs["stride"])
    points = points.to(box_ltrb.dtype)
    cls_targets = torch.zeros_like(cls_logits)
    box_targets = torch.zeros_like(box_ltrb)  # target boxes (xyxy) of positive points
    positive = torch.zeros(cls_logits.shape[:2], dtype=torch.bool, device=cls_logits.device)
    for i, (boxes, labels) in enumerate(gt):
        boxes, labels = boxes.to(box_ltrb), labels.to(cls_logits.device)
        matched = assign_points(
            points,
            boxes,
            stride=stride,
            center_sampling=center_sampling,
            center_radius=center_radius,
        )
        pos = torch.nonzero(matched >= 0).squeeze(1)  # (Npos_i,) point indices
        positive[i, pos] = True
        cls_targets[i, pos, labels[matched[pos]]] = 1.0
        box_targets[i, pos] = boxes[matched[pos]]
    num_pos = positive.sum()
    focal = sigmoid_focal_loss(cls_logits, cls_targets, alpha=alpha, gamma=gamma, reduction="sum")
    focal = focal / num_pos.clamp(min=1)
    if int(num_pos) == 0:
        zero = box_ltrb.sum() * 0.0  # keeps the graph, so backward works on empty images
        return {"focal": focal, "l1": zero, "giou": zero}, positive
    pred_ltrb = box_ltrb[positive]  # (Npos, 4)
    target_boxes = box_targets[positive]
    pos_points = points.expand(len(gt), -1, -1)[positive]  # (Npos, 2)
    target_ltrb = torch.cat(
        [pos_points - target_boxes[:, :2], target_boxes[:, 2:] - pos_points], -1
    )
    l1 = (pred_ltrb - target_ltrb).abs().mean() / stride
    giou = (1 - elementwise_giou(ltrb_to_boxes(pos_points, pred_ltrb), target_boxes)).mean()
    return {"focal": focal, "l1": l1, "giou": giou}, positive


@torch.no_grad()
def decode_detections(
    outputs: Mapping[str, Any],
    *,
    score_threshold: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou: float = 0.6,
    max_detections: int = 100,
    image_size: tuple[int, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Head outputs -> per-image detections.

    Scores are ``sigmoid(cls_logits)``; every (point, class) pair above ``score_threshold`` is a
    candidate, the ``pre_nms_topk`` best are kept, NMS runs per class at ``nms_iou`` and the
    ``max_detections`` best survivors are returned. Boxes are clipped to ``image_size`` (H, W)
    when given (or when ``outputs["image_size"]`` is).

    Returns:
        B dicts ``{"boxes": (K, 4) xyxy float, "scores": (K,), "labels": (K,) int64}``, sorted by
        decreasing score.
    """
    num_classes = outputs["cls_logits"].shape[-1] if "cls_logits" in outputs else 0
    cls_logits, box_ltrb, points = _check_outputs(outputs, num_classes)
    points = points.to(box_ltrb.dtype)
    if image_size is None:
        image_size = outputs.get("image_size")
    results = []
    for scores, ltrb in zip(torch.sigmoid(cls_logits.float()), box_ltrb.float()):
        flat = scores.reshape(-1)  # (P * C,), index = point * C + class
        candidates = torch.nonzero(flat > score_threshold).squeeze(1)
        if candidates.numel() > pre_nms_topk:
            candidates = candidates[flat[candidates].topk(pre_nms_topk).indices]
        point_index, labels = candidates // num_classes, candidates % num_classes
        boxes = ltrb_to_boxes(points[point_index].float(), ltrb[point_index])
        if image_size is not None:
            height, width = image_size
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = batched_nms(boxes, flat[candidates], labels, nms_iou)[:max_detections]
        results.append(
            {"boxes": boxes[keep], "scores": flat[candidates][keep], "labels": labels[keep]}
        )
    return results


@dataclasses.dataclass(frozen=True)
class DetectionTask(Task):
    """Anchor-free detection (see the module docstring for formats and reductions).

    Loss terms: ``focal``, ``l1``, ``giou`` (each times its weight); stats: ``num_positive``.
    Distillation view: ``distributions["cls"]`` holds each point-class sigmoid as a two-way
    distribution, logits ``(B, P, C, 2)`` = ``[0, z]`` (softmax of ``[0, z]`` is ``[1 − σ(z), σ(z)]``,
    so a softmax divergence with temperature τ compares the Bernoulli ``σ(z/τ)``);
    ``regressions["box_ltrb"]`` is ``box_ltrb / stride`` ``(B, P, 4)``, masked to the positive
    points of the ground truth when a batch with boxes is given (else unmasked).
    Metric: COCO mAP / AP50 / AP75 through pycocotools (``COCOMeanAP``).
    """

    num_classes: int
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    center_sampling: bool = True
    center_radius: float = 1.5
    weight_focal: float = 1.0
    weight_l1: float = 1.0
    weight_giou: float = 1.0
    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_iou: float = 0.6
    max_detections: int = 100

    name = "detection"
    primary_metric = "map"

    def __post_init__(self) -> None:
        check_problems(self._validate(), "DetectionTask")

    def _validate(self) -> list[str]:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            problems.append(f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        if self.focal_gamma < 0 or self.center_radius <= 0:
            problems.append("focal_gamma must be >= 0 and center_radius > 0")
        if min(self.weight_focal, self.weight_l1, self.weight_giou) < 0:
            problems.append("loss weights must be >= 0")
        if not 0.0 <= self.score_threshold < 1.0 or not 0.0 < self.nms_iou <= 1.0:
            problems.append("score_threshold must be in [0, 1) and nms_iou in (0, 1]")
        if self.pre_nms_topk < 1 or self.max_detections < 1:
            problems.append("pre_nms_topk and max_detections must be >= 1")
        return problems

    def _losses(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]):
        gt = ground_truth_of(batch, outputs["cls_logits"].shape[0], self.num_classes)
        return detection_losses(
            outputs,
            gt,
            num_classes=self.num_classes,
            alpha=self.focal_alpha,
            gamma=self.focal_gamma,
            center_sampling=self.center_sampling,
            center_radius=self.center_radius,
        )

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> TaskLoss:
        parts, positive = self._losses(outputs, batch)
        weights = {"focal": self.weight_focal, "l1": self.weight_l1, "giou": self.weight_giou}
        terms = {name: weights[name] * value for name, value in parts.items()}
        total = terms["focal"] + terms["l1"] + terms["giou"]
        return TaskLoss(total, terms, {"num_positive": float(positive.sum())})

    def distill_view(
        self, outputs: Mapping[str, Any], batch: Mapping[str, Any] | None = None
    ) -> DistillView:
        cls_logits, box_ltrb, points = _check_outputs(outputs, self.num_classes)
        binary = torch.stack([torch.zeros_like(cls_logits), cls_logits], dim=-1)  # (B, P, C, 2)
        mask = None
        if batch is not None and "boxes" in batch:
            gt = ground_truth_of(batch, cls_logits.shape[0], self.num_classes)
            stride = float(outputs["stride"])
            mask = torch.stack(
                [
                    assign_points(
                        points.to(box_ltrb.dtype),
                        boxes.to(box_ltrb),
                        stride=stride,
                        center_sampling=self.center_sampling,
                        center_radius=self.center_radius,
                    )
                    >= 0
                    for boxes, _ in gt
                ]
            )
        return {
            "distributions": {"cls": {"logits": binary, "mask": None}},
            "regressions": {
                "box_ltrb": {"values": box_ltrb / float(outputs["stride"]), "mask": mask}
            },
        }

    def predict(self, outputs: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        return decode_detections(
            outputs,
            score_threshold=self.score_threshold,
            pre_nms_topk=self.pre_nms_topk,
            nms_iou=self.nms_iou,
            max_detections=self.max_detections,
        )

    def metric(self) -> COCOMeanAP:
        return COCOMeanAP(num_classes=self.num_classes)
