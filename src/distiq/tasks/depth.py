"""Monocular depth: the scale-invariant log loss and the standard depth metrics.

Depth maps are float ``(..., H, W)`` in metres; a ground-truth pixel counts when its depth lies in
``(min_depth, max_depth]`` (0 marks "no measurement" in KITTI and ScanNet depth PNGs), and
predictions are clipped to ``[min_depth, max_depth]`` before scoring, as the KITTI / NYU
evaluations of Eigen et al. (2014) and their successors (monodepth2, BTS, Depth Anything) do.

Metrics (``DepthMetrics``), each computed per image over its valid pixels and then averaged over
images (monodepth2's ``compute_errors`` convention):

- ``abs_rel`` = mean |p − g| / g; ``sq_rel`` = mean (p − g)² / g;
- ``rmse`` = sqrt(mean (p − g)²); ``rmse_log`` = sqrt(mean (log p − log g)²);
- ``delta1`` / ``delta2`` / ``delta3`` = fraction of pixels with max(p / g, g / p) < 1.25^k;
- ``silog`` = sqrt(mean d² − (mean d)²) · 100 with d = log p − log g.

Loss: ``silog_loss`` = sqrt(mean d² − λ (mean d)²) over the batch's valid pixels (λ = 0.85, the
variance focus of BTS / AdaBins; λ = 1 is fully scale-invariant, λ = 0 the log RMSE).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distiq.tasks.base import DistillView, Task, TaskLoss, check_problems, require

__all__ = ["DEPTH_METRICS", "DepthMetrics", "DepthTask", "depth_errors", "silog_loss"]

DEPTH_METRICS = (
    "abs_rel",
    "sq_rel",
    "rmse",
    "rmse_log",
    "delta1",
    "delta2",
    "delta3",
    "silog",
)


def valid_depth(target: torch.Tensor, min_depth: float, max_depth: float | None) -> torch.Tensor:
    """Bool mask of the ground-truth pixels that count: finite, ``> min_depth`` and
    ``<= max_depth`` (no upper bound when ``max_depth`` is None)."""
    valid = torch.isfinite(target) & (target > min_depth)
    if max_depth is not None:
        valid &= target <= max_depth
    return valid


def silog_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    variance_focus: float = 0.85,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Scale-invariant log loss ``sqrt(mean d² − λ (mean d)²)``, ``d = log p − log g`` over the
    ``mask`` pixels of the whole batch. ``pred``, ``target``, ``mask``: ``(B, H, W)``;
    predictions are clamped to ``>= eps`` before the log. Zero (with a graph) when no pixel is
    valid."""
    if pred.shape != target.shape or mask.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must have one shape; resize the prediction to the target first"
        )
    if not bool(mask.any()):
        return pred.sum() * 0.0
    d = torch.log(pred.float()[mask].clamp(min=eps)) - torch.log(target.float()[mask])
    value = (d**2).mean() - variance_focus * d.mean() ** 2
    return torch.sqrt(value.clamp(min=1e-12))


def depth_errors(
    pred: torch.Tensor, target: torch.Tensor, *, min_depth: float, max_depth: float | None
) -> dict[str, float] | None:
    """The metrics of one image (see the module docstring); ``pred``, ``target``: ``(H, W)``.
    None when the image has no valid pixel."""
    valid = valid_depth(target, min_depth, max_depth)
    if not bool(valid.any()):
        return None
    g = target[valid].double()
    p = pred[valid].double().clamp(min=min_depth)
    if max_depth is not None:
        p = p.clamp(max=max_depth)
    ratio = torch.maximum(p / g, g / p)
    log_diff = torch.log(p) - torch.log(g)
    return {
        "abs_rel": float(((p - g).abs() / g).mean()),
        "sq_rel": float(((p - g) ** 2 / g).mean()),
        "rmse": float(torch.sqrt(((p - g) ** 2).mean())),
        "rmse_log": float(torch.sqrt((log_diff**2).mean())),
        "delta1": float((ratio < 1.25).double().mean()),
        "delta2": float((ratio < 1.25**2).double().mean()),
        "delta3": float((ratio < 1.25**3).double().mean()),
        "silog": float(torch.sqrt(((log_diff**2).mean() - log_diff.mean() ** 2).clamp(min=0)))
        * 100,
    }


class DepthMetrics:
    """Accumulator: ``update(predictions, batch)`` with ``predictions`` B depth maps and
    ``batch["depth"]`` B ground-truth maps of the same sizes (a list, or a ``(B, H, W)``
    tensor); ``compute()`` averages each metric over the images with valid pixels and adds
    ``num_images``. ``per_image`` keeps each image's metrics (for paired comparisons)."""

    def __init__(self, min_depth: float = 1e-3, max_depth: float | None = None) -> None:
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.per_image: list[dict[str, float]] = []

    def update(self, predictions: Sequence[torch.Tensor], batch: Mapping[str, Any]) -> None:
        targets = require(batch, "depth", "depth")
        ids = batch.get("image_id")
        for i, (pred, target) in enumerate(zip(predictions, targets)):
            if tuple(pred.shape) != tuple(target.shape):
                raise ValueError(
                    f"prediction {i} is {tuple(pred.shape)} but its depth map "
                    f"{tuple(target.shape)}; resize the prediction to the map's size first"
                )
            errors = depth_errors(
                pred.cpu(), target.cpu(), min_depth=self.min_depth, max_depth=self.max_depth
            )
            if errors is not None:
                if ids is not None:
                    errors["image_id"] = int(ids[i])
                self.per_image.append(errors)

    def merge(self, other: DepthMetrics) -> None:
        self.per_image += other.per_image

    def reset(self) -> None:
        self.per_image = []

    def compute(self) -> dict[str, float]:
        if not self.per_image:
            raise ValueError(
                "no image had a valid depth pixel: check min_depth / max_depth against the data"
            )
        out = {
            name: math.fsum(row[name] for row in self.per_image) / len(self.per_image)
            for name in DEPTH_METRICS
        }
        out["num_images"] = float(len(self.per_image))
        return out


@dataclasses.dataclass(frozen=True)
class DepthTask(Task):
    """Monocular depth. ``outputs``: ``{"depth": (B, H, W)}`` (or ``.depth``) at the target's
    size; ``batch["depth"]``: ``(B, H, W)`` metres, invalid pixels ``<= min_depth``.

    Loss terms: ``silog`` (times ``weight_silog``). Distillation view: ``regressions
    ["log_depth"]`` = log of the clamped depth ``(B, H, W, 1)``, masked to the valid pixels when
    a batch is given (a unit-free regression: an L1 on it is a relative depth error).
    Predictions: the depth maps. Metric: :class:`DepthMetrics`; ``primary_metric`` is
    ``delta1`` (higher is better, like the other tasks' metrics).
    """

    min_depth: float = 1e-3
    max_depth: float | None = None
    variance_focus: float = 0.85
    weight_silog: float = 1.0

    name = "depth"
    primary_metric = "delta1"

    def __post_init__(self) -> None:
        check_problems(self._validate(), "DepthTask")

    def _validate(self) -> list[str]:
        problems = []
        if self.min_depth < 0:
            problems.append(f"min_depth must be >= 0, got {self.min_depth}")
        if self.max_depth is not None and self.max_depth <= self.min_depth:
            problems.append(f"max_depth {self.max_depth} must exceed min_depth {self.min_depth}")
        if not 0.0 <= self.variance_focus <= 1.0:
            problems.append(f"variance_focus must lie in [0, 1], got {self.variance_focus}")
        if self.weight_silog < 0:
            problems.append("weight_silog must be >= 0")
        return problems

    @staticmethod
    def _depth(outputs: Any) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, Mapping) and "depth" in outputs:
            return outputs["depth"]
        value = getattr(outputs, "depth", None)
        if isinstance(value, torch.Tensor):
            return value
        raise TypeError(f"cannot find the depth map in {type(outputs).__name__} outputs")

    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> TaskLoss:
        pred = self._depth(outputs)
        target = require(batch, "depth", self.name).to(pred.device)
        mask = valid_depth(target, self.min_depth, self.max_depth)
        silog = silog_loss(pred, target, mask, variance_focus=self.variance_focus)
        terms = {"silog": self.weight_silog * silog}
        return TaskLoss(terms["silog"], terms, {"valid_pixels": float(mask.sum())})

    def distill_view(self, outputs: Any, batch: Mapping[str, Any] | None = None) -> DistillView:
        pred = self._depth(outputs)
        mask = None
        if batch is not None and "depth" in batch:
            mask = valid_depth(batch["depth"].to(pred.device), self.min_depth, self.max_depth)
        log_depth = torch.log(pred.float().clamp(min=max(self.min_depth, 1e-3)))[..., None]
        return {
            "distributions": {},
            "regressions": {"log_depth": {"values": log_depth, "mask": mask}},
        }

    def predict(self, outputs: Any) -> torch.Tensor:
        return self._depth(outputs)

    def metric(self) -> DepthMetrics:
        return DepthMetrics(self.min_depth, self.max_depth)
