"""Depth metrics against the reference formulas (monodepth2's ``compute_errors``, the
evaluation of Eigen et al.), and the scale-invariant log loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distiq.tasks import build_task
from distiq.tasks.depth import DepthMetrics, depth_errors, silog_loss


def _reference(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """monodepth2 (layers.py, compute_errors), plus SILog as KITTI's devkit reports it."""
    thresh = np.maximum(gt / pred, pred / gt)
    a1, a2, a3 = ((thresh < 1.25**k).mean() for k in (1, 2, 3))
    rmse = np.sqrt(((gt - pred) ** 2).mean())
    rmse_log = np.sqrt(((np.log(gt) - np.log(pred)) ** 2).mean())
    abs_rel = np.mean(np.abs(gt - pred) / gt)
    sq_rel = np.mean(((gt - pred) ** 2) / gt)
    d = np.log(pred) - np.log(gt)
    silog = np.sqrt(np.mean(d**2) - np.mean(d) ** 2) * 100
    return dict(abs_rel=abs_rel, sq_rel=sq_rel, rmse=rmse, rmse_log=rmse_log, delta1=a1,
                delta2=a2, delta3=a3, silog=silog)  # fmt: skip


def test_one_image_matches_the_reference_on_valid_clipped_pixels():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 12.0, (24, 30))
    gt[:3] = 0.0  # no measurement
    gt[5, :4] = 15.0  # beyond max_depth
    pred = gt * rng.uniform(0.7, 1.4, gt.shape)
    pred[10, :5] = 30.0  # clipped to max_depth
    pred[11, :5] = 1e-6  # clipped to min_depth
    ours = depth_errors(torch.tensor(pred), torch.tensor(gt), min_depth=1e-3, max_depth=10.0)
    valid = (gt > 1e-3) & (gt <= 10.0)
    expected = _reference(gt[valid], np.clip(pred[valid], 1e-3, 10.0))
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-9), name
    assert (
        depth_errors(torch.zeros(3, 3), torch.zeros(3, 3), min_depth=1e-3, max_depth=None) is None
    )


def test_metrics_average_images_not_pixels():
    big_gt, big_pred = torch.full((10, 10), 2.0), torch.full((10, 10), 2.0)  # perfect
    small_gt, small_pred = torch.full((2, 2), 2.0), torch.full((2, 2), 4.0)  # all wrong
    metric = DepthMetrics(max_depth=None)
    metric.update([big_pred, small_pred], {"depth": [big_gt, small_gt], "image_id": [7, 8]})
    out = metric.compute()
    assert out["delta1"] == pytest.approx(0.5) and out["abs_rel"] == pytest.approx(0.5)
    assert out["num_images"] == 2 and [r["image_id"] for r in metric.per_image] == [7, 8]
    other = DepthMetrics()
    other.merge(metric)
    assert other.compute() == out
    with pytest.raises(ValueError, match="resize the prediction"):
        metric.update([torch.ones(3, 3)], {"depth": [torch.ones(2, 2)]})


def test_silog_is_scale_invariant_at_full_variance_focus():
    torch.manual_seed(0)
    gt = torch.rand(2, 8, 8) * 5 + 1
    pred = gt * torch.exp(0.1 * torch.randn(2, 8, 8))
    mask = torch.ones_like(gt, dtype=torch.bool)
    base = silog_loss(pred, gt, mask, variance_focus=1.0)
    assert silog_loss(pred * 3.0, gt, mask, variance_focus=1.0) == pytest.approx(
        float(base), rel=1e-4
    )
    d = torch.log(pred) - torch.log(gt)
    expected = math.sqrt(float((d**2).mean() - 0.85 * d.mean() ** 2))
    assert float(silog_loss(pred, gt, mask)) == pytest.approx(expected, rel=1e-5)
    pred.requires_grad_(True)
    empty = silog_loss(pred, gt, torch.zeros_like(mask))
    empty.backward()
    assert float(empty) == 0.0 and pred.grad is not None


def test_depth_task_interface():
    task = build_task("depth", max_depth=10.0)
    assert task.primary_metric == "delta1"
    depth = torch.tensor([[[0.0, 2.0], [4.0, 20.0]]])
    pred = torch.tensor([[[1.0, 2.0], [4.0, 8.0]]], requires_grad=True)
    loss = task.loss({"depth": pred}, {"depth": depth})
    assert loss.stats["valid_pixels"] == 2.0 and float(loss.total) == pytest.approx(0.0, abs=1e-5)
    view = task.distill_view({"depth": pred}, {"depth": depth})
    values = view["regressions"]["log_depth"]
    assert values["values"].shape == (1, 2, 2, 1)
    assert values["mask"].tolist() == [[[False, True], [True, False]]]
    with pytest.raises(ValueError, match="max_depth"):
        build_task("depth", min_depth=2.0, max_depth=1.0)
