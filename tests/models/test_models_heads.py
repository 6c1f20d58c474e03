"""Detection and segmentation heads on patch features (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from distiq.models import DetectionHead, SegmentationHead
from distiq.models.heads import patch_centres, patch_grid


def test_patch_grid_is_row_major():
    features = torch.randn(2, 3 * 5, 7)  # (B, Hp*Wp, D)
    grid = patch_grid(features, (3, 5))  # (B, D, Hp, Wp)
    for i in range(3):
        for j in range(5):
            assert torch.equal(grid[:, :, i, j], features[:, i * 5 + j])
    with pytest.raises(ValueError, match="do not fill a 4x4 grid"):
        patch_grid(features, (4, 4))
    with pytest.raises(ValueError, match=r"\(B, P, D\)"):
        patch_grid(features[0], (3, 5))


def test_points_are_patch_centres_in_pixels():
    points = patch_centres((2, 3), stride=16)
    expected = [[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]]
    assert points.tolist() == expected


def test_detection_head_contract_and_init():
    head = DetectionHead(in_dim=24, num_classes=6, hidden_dim=16)
    out = head(torch.randn(2, 12, 24), (3, 4), stride=8)
    assert set(out) == {"cls_logits", "box_ltrb", "points", "stride"}
    assert out["cls_logits"].shape == (2, 12, 6)
    assert out["box_ltrb"].shape == (2, 12, 4) and (out["box_ltrb"] >= 0).all()
    assert out["points"].shape == (12, 2) and out["stride"] == 8
    # focal-loss prior: sigmoid(logits) starts near 0.01 everywhere
    probs = out["cls_logits"].sigmoid()
    assert abs(probs.mean().item() - 0.01) < 0.005
    # distances scale with the stride (pixels, not patches)
    torch.manual_seed(0)
    x = torch.randn(1, 12, 24)
    a = head(x, (3, 4), stride=8)["box_ltrb"]
    b = head(x, (3, 4), stride=16)["box_ltrb"]
    torch.testing.assert_close(b, 2 * a)
    with pytest.raises(ValueError, match="num_classes"):
        DetectionHead(8, 0)


def test_detection_head_learns_a_box():
    """Fit one box from one feature map: regression and classification are trainable."""
    torch.manual_seed(0)
    head = DetectionHead(in_dim=8, num_classes=2, hidden_dim=16)
    features = torch.randn(1, 16, 8)
    target = torch.tensor([10.0, 6.0, 3.0, 12.0])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        out = head(features, (4, 4), stride=8)
        loss = (
            out["box_ltrb"][0, 5] - target
        ).abs().mean() + torch.nn.functional.binary_cross_entropy_with_logits(
            out["cls_logits"][0, 5], torch.tensor([1.0, 0.0])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = head(features, (4, 4), stride=8)
    torch.testing.assert_close(out["box_ltrb"][0, 5], target, atol=0.5, rtol=0)
    assert out["cls_logits"][0, 5, 0] > 0 > out["cls_logits"][0, 5, 1]


@pytest.mark.parametrize("num_upsample", [0, 1, 2])
def test_segmentation_head_returns_image_resolution(num_upsample):
    head = SegmentationHead(in_dim=16, num_classes=3, hidden_dim=8, num_upsample=num_upsample)
    logits = head(torch.randn(2, 4 * 6, 16), (4, 6), image_size=(32, 48))
    assert logits.shape == (2, 3, 32, 48)
    logits.mean().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_segmentation_of_a_constant_map_is_constant():
    """Equal features at every patch give equal logits at every pixel (no position leaks)."""
    head = SegmentationHead(in_dim=4, num_classes=2, hidden_dim=8, num_upsample=1).eval()
    features = torch.ones(1, 9, 4)
    logits = head(features, (3, 3), image_size=(24, 24))
    # borders see zero padding in the 3x3 conv; the centre region is constant
    centre = logits[..., 8:16, 8:16]
    assert torch.allclose(centre, centre[..., :1, :1].expand_as(centre), atol=1e-6)
    assert not math.isnan(logits.sum().item())
