"""Semantic segmentation: pixel cross-entropy + Dice, mIoU / per-class IoU / pixel accuracy.

Label maps are integer class indices ``(..., H, W)`` in ``[0, C)``; pixels equal to
``ignore_index`` (255 by default) are left out of every loss and metric. The segmentation head
returns logits ``(B, C, H, W)`` at the label map's resolution; ``batch["mask"]`` is ``(B, H, W)``.

Metric conventions (as mmsegmentation's): the confusion matrix is summed over the whole data set
before any ratio is taken; a class's IoU is ``TP / (TP + FP + FN)``, undefined (NaN) when the
class appears in neither prediction nor ground truth; mIoU is the mean over the defined classes;
pixel accuracy is ``correct / valid pixels``; mean accuracy is the mean per-class recall over
classes present in the ground truth.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distiq.tasks.base import DistillView, Task, TaskLoss, check_problems, logits_of, require

log = logging.getLogger(__name__)

__all__ = [
    "ConfusionMatrix",
    "SegmentationTask",
    "confusion_matrix",
    "dice_loss",
    "mean_iou",
    "metrics_from_confusion",
    "per_class_iou",
    "pixel_accuracy",
]


def _as_long_tensor(x: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer label map, got dtype {tensor.dtype}")
    return tensor.long()


def confusion_matrix(
    pred: Any, target: Any, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = ground-truth class, columns = predicted class.

    Args:
        pred, target: integer label maps of the same shape (tensors or arrays), e.g. ``(B, H, W)``.
    Pixels where ``target == ignore_index`` are skipped; any other value outside ``[0, C)`` in
    ``target``, or in ``pred`` at a counted pixel, is an error.
    """
    pred, target = _as_long_tensor(pred, "pred"), _as_long_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; resize the "
            "prediction to the label map's size first"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)][0]
        raise ValueError(
            f"target holds class {int(bad)}, outside [0, {num_classes}) and not the ignore index "
            f"{ignore_index}; map it to a class or to the ignore index"
        )
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"pred holds a class outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def metrics_from_confusion(matrix: torch.Tensor) -> dict[str, Any]:
    """``{"iou": (C,) float64 with NaN for undefined classes, "miou", "pixel_accuracy",
    "mean_accuracy"}`` from a ``(C, C)`` confusion matrix (rows = truth)."""
    matrix = matrix.to(torch.float64)
    true_positive = matrix.diagonal()
    truth, predicted = matrix.sum(1), matrix.sum(0)
    union = truth + predicted - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), math.nan)
    recall = torch.where(truth > 0, true_positive / truth.clamp(min=1), math.nan)
    total = matrix.sum()

    def nanmean(x: torch.Tensor) -> float:
        defined = x[~torch.isnan(x)]
        return float(defined.mean()) if defined.numel() else math.nan

    return {
        "iou": iou,
        "miou": nanmean(iou),
        "pixel_accuracy": float(true_positive.sum() / total) if total > 0 else math.nan,
        "mean_accuracy": nanmean(recall),
    }


def mean_iou(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU over the classes present in ``pred`` or ``target`` (ignored pixels left out).
    ``pred``, ``target``: integer label maps of equal shape. NaN when no pixel is valid."""
    return metrics_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))["miou"]


def per_class_iou(
    pred: Any, target: Any, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(C,)`` float64 IoU per class, NaN for a class absent from both ``pred`` and ``target``."""
    return metrics_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))["iou"]


def pixel_accuracy(pred: Any, target: Any, num_classes: int, ignore_index: int = 255) -> float:
    """Correct pixels / valid (not ignored) pixels."""
    matrix = confusion_matrix(pred, target, num_classes, ignore_index)
    return metrics_from_confusion(matrix)["pixel_accuracy"]


class ConfusionMatrix:
    """Data-set accumulator: ``update(predictions (B, H, W) labels, batch)`` with
    ``batch["mask"]`` ``(B, H, W)``; ``compute()`` gives ``miou``, ``pixel_accuracy``,
    ``mean_accuracy`` and ``iou/<class name>`` (fractions in [0, 1]; NaN per-class values are
    left out). ``merge`` adds another accumulator's counts (e.g. from another process)."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] = ()
    ) -> None:
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) or tuple(str(c) for c in range(num_classes))
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, predictions: Any, batch: Mapping[str, Any]) -> None:
        target = require(batch, "mask", "segmentation")
        self.matrix += confusion_matrix(predictions, target, self.num_classes, self.ignore_index)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> dict[str, float]:
        if int(self.matrix.sum()) == 0:
            raise ValueError("no valid pixel was counted: call update() with non-ignored labels")
        metrics = metrics_from_confusion(self.matrix)
        out = {k: metrics[k] for k in ("miou", "pixel_accuracy", "mean_accuracy")}
        for name, value in zip(self.class_names, metrics["iou"].tolist()):
            if not math.isnan(value):
                out[f"iou/{name}"] = value
        return out


def _check_logits_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, C, H, W) and mask (B, H, W) of the same size, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}; upsample the logits to the mask size"
        )
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
    if bool(bad.any()):
        raise ValueError(
            f"mask holds class {int(target[bad][0])}, outside [0, {logits.shape[1]}) and not the "
            f"ignore index {ignore_index}"
        )


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = 255, smooth: float = 1.0
) -> torch.Tensor:
    """Soft multi-class Dice loss, ``1 − mean_c (2 Σ p_c g_c + s) / (Σ p_c + Σ g_c + s)``.

    ``p = softmax(logits, dim=1)``; sums run over the whole batch and all valid pixels
    (``target != ignore_index``); the mean is over all C classes (``smooth`` s keeps classes
    absent from the batch near zero loss). logits ``(B, C, H, W)``, target ``(B, H, W)``.
    """
    _check_logits_target(logits, target, ignore_index)
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)  # (B, 1, H, W)
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0] > 0, target, 0), num_classes).permute(0, 3, 1, 2)
    onehot = onehot.to(probs.dtype) * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)  # (C,)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()


@dataclasses.dataclass(frozen=True)
class SegmentationTask(Task):
    """Semantic segmentation. ``outputs``: logits ``(B, C, H, W)`` (tensor, ``["logits"]`` or
    ``.logits``); ``batch["mask"]``: ``(B, H, W)``.

    Loss terms: ``ce`` (mean over valid pixels; 0 when a batch has none) and ``dice``, each times
    its weight. Distillation view: ``distributions["pixel_classes"]`` = logits ``(B, H, W, C)``,
    unmasked (the teacher's distribution is meaningful on ignored pixels too) unless
    ``distill_mask_ignored``. Predictions: ``argmax`` label maps ``(B, H, W)``.
    """

    num_classes: int
    ignore_index: int = 255
    weight_ce: float = 1.0
    weight_dice: float = 1.0
    dice_smooth: float = 1.0
    class_names: tuple[str, ...] = ()
    distill_mask_ignored: bool = False

    name = "segmentation"
    primary_metric = "miou"

    def __post_init__(self) -> None:
        check_problems(self._validate(), "SegmentationTask")

    def _validate(self) -> list[str]:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if 0 <= self.ignore_index < self.num_classes:
            problems.append(f"ignore_index {self.ignore_index} is a class index; use e.g. 255")
        if min(self.weight_ce, self.weight_dice) < 0 or self.dice_smooth < 0:
            problems.append("weight_ce, weight_dice and dice_smooth must be >= 0")
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class_names for {self.num_classes} classes")
        return problems

    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> TaskLoss:
        logits = logits_of(outputs)
        target = require(batch, "mask", self.name).long()
        _check_logits_target(logits, target, self.ignore_index)
        valid = int((target != self.ignore_index).sum())
        if valid:
            ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        else:
            ce = logits.sum() * 0.0  # torch's mean over zero pixels is NaN
        dice = dice_loss(logits, target, ignore_index=self.ignore_index, smooth=self.dice_smooth)
        terms = {"ce": self.weight_ce * ce, "dice": self.weight_dice * dice}
        return TaskLoss(terms["ce"] + terms["dice"], terms, {"valid_pixels": float(valid)})

    def distill_view(self, outputs: Any, batch: Mapping[str, Any] | None = None) -> DistillView:
        logits = logits_of(outputs)
        mask = None
        if self.distill_mask_ignored and batch is not None and "mask" in batch:
            mask = batch["mask"] != self.ignore_index
        return {
            "distributions": {
                "pixel_classes": {"logits": logits.permute(0, 2, 3, 1), "mask": mask}
            },
            "regressions": {},
        }

    def predict(self, outputs: Any) -> torch.Tensor:
        return logits_of(outputs).argmax(dim=1)

    def metric(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.ignore_index, self.class_names)
