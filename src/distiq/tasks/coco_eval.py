"""COCO box mAP through pycocotools, with ground truth and detections built in memory.

pycocotools is imported lazily (in ``compute``), and its console output is captured and sent to
``logging`` at DEBUG level.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from distiq.tasks.boxes import ground_truth_of

log = logging.getLogger(__name__)

__all__ = ["COCO_STAT_NAMES", "COCOMeanAP", "coco_box_map"]

# The order of ``COCOeval.stats`` for boxes (maxDets 1, 10, 100; areas small < 32², medium, large).
COCO_STAT_NAMES = (
    "map",
    "ap50",
    "ap75",
    "ap_small",
    "ap_medium",
    "ap_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def coco_box_map(
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
) -> dict[str, float]:
    """COCO bbox evaluation of a list of images.

    Args:
        ground_truth: per image ``(boxes (N, 4) xyxy, labels (N,))``.
        detections: per image ``(boxes (K, 4) xyxy, scores (K,), labels (K,))``.
        num_classes: classes are ``0 .. num_classes - 1`` (COCO category id = class + 1).
    Returns:
        the twelve ``COCOeval.stats`` under ``COCO_STAT_NAMES`` (fractions in [0, 1]); a value that
        pycocotools reports as undefined (-1: no ground truth in that area range) is NaN.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(detections):
        raise ValueError(
            f"{len(ground_truth)} ground-truth images but {len(detections)} detection sets"
        )
    images = [{"id": i + 1} for i in range(len(ground_truth))]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for image_id, ((gt_boxes, gt_labels), (dt_boxes, dt_scores, dt_labels)) in enumerate(
        zip(ground_truth, detections), start=1
    ):
        for box, label in zip(_xyxy_to_xywh(gt_boxes).tolist(), gt_labels.tolist()):
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,  # ids must be > 0: pycocotools uses 0 for "unmatched"
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(
            _xyxy_to_xywh(dt_boxes).tolist(), dt_scores.tolist(), dt_labels.tolist()
        ):
            dt_anns.append(
                {
                    "id": len(dt_anns) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": box,
                    "score": float(score),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": categories}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools:\n%s", captured.getvalue())
    return {
        name: (math.nan if value < 0 else float(value))
        for name, value in zip(COCO_STAT_NAMES, evaluator.stats)
    }


def _numpy(x: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(shape)


class COCOMeanAP:
    """Accumulates detections and ground truth over a data set; ``compute()`` runs COCOeval.

    ``update(predictions, batch)``: ``predictions`` a list of B dicts ``{"boxes": (K, 4) xyxy,
    "scores": (K,), "labels": (K,)}`` (what ``DetectionTask.predict`` returns);
    ``batch["boxes"]`` / ``batch["labels"]`` as described in ``distiq.tasks.detection``.
    ``compute()`` returns ``map`` (AP over IoU .50:.95), ``ap50``, ``ap75`` and the other COCO
    stats (see ``COCO_STAT_NAMES``), fractions in [0, 1]. pycocotools keeps at most 100
    detections per image (its default); extra ones are ignored by the evaluation.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ground_truth: list[tuple[np.ndarray, np.ndarray]] = []
        self.detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, predictions: Sequence[Mapping[str, Any]], batch: Mapping[str, Any]) -> None:
        gt = ground_truth_of(batch, len(predictions), self.num_classes)
        for i, (prediction, (boxes, labels)) in enumerate(zip(predictions, gt)):
            missing = {"boxes", "scores", "labels"} - set(prediction)
            if missing:
                raise KeyError(f"prediction {i} lacks {sorted(missing)}; use DetectionTask.predict")
            count = len(prediction["scores"])
            dt_labels = _numpy(prediction["labels"], np.int64, (count,))
            if count and (dt_labels.min() < 0 or dt_labels.max() >= self.num_classes):
                raise ValueError(f"prediction {i}: a label is outside [0, {self.num_classes})")
            self.detections.append(
                (
                    _numpy(prediction["boxes"], np.float64, (count, 4)),
                    _numpy(prediction["scores"], np.float64, (count,)),
                    dt_labels,
                )
            )
            self.ground_truth.append(
                (_numpy(boxes, np.float64, (-1, 4)), _numpy(labels, np.int64, (-1,)))
            )

    def merge(self, other: COCOMeanAP) -> None:
        self.ground_truth += other.ground_truth
        self.detections += other.detections

    def reset(self) -> None:
        self.ground_truth, self.detections = [], []

    def compute(self) -> dict[str, float]:
        if not self.ground_truth:
            raise ValueError("no images were added: call update() before compute()")
        if not any(len(labels) for _, labels in self.ground_truth):
            log.warning("COCO mAP is undefined: the evaluated images have no ground-truth boxes")
        return coco_box_map(self.ground_truth, self.detections, self.num_classes)
