"""Monocular depth adapters: the task's shared predictions, Depth Anything and DPT.

Both families predict ``predicted_depth`` ``(B, h, w)``; :meth:`DepthAdapter.predict` resizes it
(bilinear) to each image's original size, where the metrics are computed. A Depth Anything
config with ``depth_estimation_type="metric"`` predicts ``sigmoid(·) · max_depth`` (metres); the
``relative`` kind a non-negative (ReLU) relative depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distiq.models.dense import DenseAdapter, DenseOutputs, register_dense


class DepthAdapter(DenseAdapter):
    """A monocular depth family: ``forward`` gives ``depth`` ``(B, h, w)``."""

    task = "depth"

    def _run(self, model: nn.Module, pixel_values: torch.Tensor, targets: Any) -> DenseOutputs:
        return DenseOutputs(depth=model(pixel_values=pixel_values).predicted_depth)

    @property
    def num_labels(self) -> int:
        return 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("depth",)

    @staticmethod
    def resized(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, h, w)`` depth resized (bilinear) to ``size`` (H, W): ``(B, H, W)``."""
        if tuple(depth.shape[-2:]) == tuple(size):
            return depth
        return F.interpolate(
            depth[:, None].float(), size=size, mode="bilinear", align_corners=False
        )[:, 0]

    @torch.no_grad()
    def predict(
        self, outputs: DenseOutputs, sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Per image an ``(H_i, W_i)`` float depth map at its original size ``sizes[i]``."""
        return [
            self.resized(outputs.depth[i : i + 1], tuple(size))[0] for i, size in enumerate(sizes)
        ]


def _dinov2(image_size: int, **changes: Any) -> Any:
    from transformers import Dinov2Config

    fields = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        apply_layernorm=True,
    )
    return Dinov2Config(**{**fields, **changes})


@register_dense
class DepthAnythingAdapter(DepthAdapter):
    """Depth Anything (``DepthAnythingForDepthEstimation``): a DINOv2 backbone, a DPT neck
    (reassemble + fusion) and a depth head. Parts: ``backbone`` (the ViT blocks), ``neck``,
    ``head``, ``patch_embedding`` (the ViT's patch projection)."""

    family = "depth_anything"
    model_types = ("depth_anything",)
    model_class = "DepthAnythingForDepthEstimation"
    processor_class = "DPTImageProcessorPil"
    parts: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
        "backbone": (("backbone",), ("backbone.embeddings",)),
        "neck": (("neck",), ()),
        "head": (("head",), ()),
        "patch_embedding": (("backbone.embeddings.patch_embeddings.projection",), ()),
    }
    feature_modules = ("neck.fusion_stage.layers.*",)

    @classmethod
    def build_processor(cls, size: tuple[int, int], **changes: Any) -> Any:
        fields = {"keep_aspect_ratio": False, "ensure_multiple_of": 1, "do_pad": False}
        return super().build_processor(size, **{**fields, **changes})

    @classmethod
    def tiny_config(cls, num_labels: int, image_size: int, **changes: Any) -> Any:
        from transformers import DepthAnythingConfig

        backbone = _dinov2(image_size, **changes.pop("backbone_config", {}))
        fields = dict(
            backbone_config=backbone,
            reassemble_hidden_size=32,
            neck_hidden_sizes=[16, 32, 32, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            patch_size=backbone.patch_size,
            reassemble_factors=[4, 2, 1, 0.5],
            depth_estimation_type="metric",
            max_depth=10,
        )
        return DepthAnythingConfig(**{**fields, **changes})


@register_dense
class DPTAdapter(DepthAdapter):
    """DPT (``DPTForDepthEstimation``): a ViT backbone, a reassemble + fusion neck and a depth
    head. Parts: ``backbone`` (the ViT blocks), ``neck``, ``head``, ``patch_embedding``."""

    family = "dpt"
    model_types = ("dpt",)
    model_class = "DPTForDepthEstimation"
    processor_class = "DPTImageProcessorPil"
    parts: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
        "backbone": (("dpt",), ("dpt.embeddings",)),
        "neck": (("neck",), ()),
        "head": (("head",), ()),
        "patch_embedding": (("dpt.embeddings.patch_embeddings.projection",), ()),
    }
    feature_modules = ("neck.fusion_stage.layers.*",)

    @classmethod
    def build_processor(cls, size: tuple[int, int], **changes: Any) -> Any:
        fields = {"keep_aspect_ratio": False, "ensure_multiple_of": 1, "do_pad": False}
        return super().build_processor(size, **{**fields, **changes})

    @classmethod
    def tiny_config(cls, num_labels: int, image_size: int, **changes: Any) -> Any:
        from transformers import DPTConfig

        fields = dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=image_size,
            patch_size=8,
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[16, 32, 32, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            reassemble_factors=[4, 2, 1, 0.5],
        )
        return DPTConfig(**{**fields, **changes})
