"""Detection and segmentation heads on a ViT's patch features.

Both take patch features ``(B, P, D)`` with ``P = Hp * Wp`` in row-major order (patch ``(i, j)``
at index ``i * Wp + j``, the order of a ViT's flattened patch grid, class token removed) and
are cheap next to the encoder: they exist to give the vision tower dense supervision and to
let one compressed encoder serve VQA, detection and segmentation.

``DetectionHead`` (FCOS-style, anchor-free, one level: the patch grid, stride = patch size)
returns the contract's dict::

    cls_logits (B, P, C)   class logits per point (sigmoid / focal loss, no background class)
    box_ltrb   (B, P, 4)   distances >= 0 in pixels from the point to the box's left, top,
                           right and bottom sides
    points     (P, 2)      (x, y) pixel coordinates of the patch centres
    stride     int         pixels per patch

Pixels are those of the model's input (``pixel_values``), i.e. after the image processor's
resize.

``SegmentationHead`` returns logits ``(B, C, H, W)`` at the input resolution: a 1x1
projection, ``num_upsample`` x (2x bilinear upsample, 3x3 conv, GroupNorm, GELU), a 1x1
classifier, and a final bilinear resize to ``(H, W)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patch_grid(patch_features: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, P, D) row-major patch features -> (B, D, Hp, Wp)."""
    if patch_features.dim() != 3:
        raise ValueError(
            f"patch features must be (B, P, D), got shape {tuple(patch_features.shape)}"
        )
    batch, count, dim = patch_features.shape
    height, width = grid_size
    if height * width != count:
        raise ValueError(f"{count} patch features do not fill a {height}x{width} grid")
    return patch_features.transpose(1, 2).reshape(batch, dim, height, width)


def patch_centres(grid_size: tuple[int, int], stride: int, device=None) -> torch.Tensor:
    """(Hp*Wp, 2) (x, y) pixel centres of the patches, row-major."""
    height, width = grid_size
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class DetectionHead(nn.Module):
    """FCOS-style anchor-free detection head on one feature level (the patch grid).

    Args:
        in_dim: D, the patch feature width.
        num_classes: C.
        hidden_dim: width of the shared conv tower.
        num_convs: 3x3 conv + GroupNorm + GELU blocks in the tower.
        prior_prob: initial foreground probability (the classifier bias is set so that
            sigmoid(bias) = prior_prob, as in RetinaNet / FCOS).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 64,
        num_convs: int = 1,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.settings = {
            "in_dim": in_dim,
            "num_classes": num_classes,
            "hidden_dim": hidden_dim,
            "num_convs": num_convs,
            "prior_prob": prior_prob,
        }
        self.norm = nn.LayerNorm(in_dim)
        layers: list[nn.Module] = [nn.Conv2d(in_dim, hidden_dim, 1)]
        for _ in range(num_convs):
            layers += [
                nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
                _group_norm(hidden_dim),
                nn.GELU(),
            ]
        self.tower = nn.Sequential(*layers)
        self.cls_logits = nn.Conv2d(hidden_dim, num_classes, 1)
        self.box_ltrb = nn.Conv2d(hidden_dim, 4, 1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.normal_(self.box_ltrb.weight, std=0.01)
        nn.init.zeros_(self.box_ltrb.bias)

    def forward(
        self, patch_features: torch.Tensor, grid_size: tuple[int, int], stride: int
    ) -> dict[str, torch.Tensor | int]:
        """patch_features (B, P, D), grid_size (Hp, Wp), stride in pixels -> contract dict."""
        x = patch_grid(self.norm(patch_features), grid_size)  # (B, D, Hp, Wp)
        x = self.tower(x)
        cls_logits = self.cls_logits(x).flatten(2).transpose(1, 2)  # (B, P, C)
        # softplus keeps distances positive with a gradient everywhere; at init ~0.69 stride.
        box_ltrb = F.softplus(self.box_ltrb(x)).flatten(2).transpose(1, 2) * stride  # (B, P, 4)
        return {
            "cls_logits": cls_logits,
            "box_ltrb": box_ltrb,
            "points": patch_centres(grid_size, stride, device=patch_features.device),
            "stride": int(stride),
        }


class SegmentationHead(nn.Module):
    """Light segmentation decoder: patch features -> per-pixel class logits.

    Args:
        in_dim: D, the patch feature width.
        num_classes: C (the ignore label 255 is the loss's business, not a class).
        hidden_dim: decoder width.
        num_upsample: 2x upsampling steps (each a 3x3 conv block) before the final resize.
    """

    def __init__(
        self, in_dim: int, num_classes: int, *, hidden_dim: int = 32, num_upsample: int = 1
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.settings = {
            "in_dim": in_dim,
            "num_classes": num_classes,
            "hidden_dim": hidden_dim,
            "num_upsample": num_upsample,
        }
        self.norm = nn.LayerNorm(in_dim)
        self.project = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), _group_norm(hidden_dim), nn.GELU()
            )
            for _ in range(num_upsample)
        )
        self.classifier = nn.Conv2d(hidden_dim, num_classes, 1)

    def forward(
        self, patch_features: torch.Tensor, grid_size: tuple[int, int], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """patch_features (B, P, D), grid_size (Hp, Wp), image_size (H, W) -> (B, C, H, W)."""
        x = self.project(patch_grid(self.norm(patch_features), grid_size))  # (B, hidden, Hp, Wp)
        for block in self.blocks:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(x)
        logits = self.classifier(x)
        return F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)
