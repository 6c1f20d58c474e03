"""Semantic segmentation adapters: the task's shared predictions, and SegFormer.

``SegmentationAdapter.predict`` upsamples the class logits (bilinear, as mmsegmentation and
transformers' ``post_process_semantic_segmentation`` do) to each image's original size and takes
the arg-max there, so metrics are computed on the data set's own label maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distiq.models.dense import DenseAdapter, DenseOutputs, register_dense


class SegmentationAdapter(DenseAdapter):
    """A semantic segmentation family: ``forward`` gives ``logits`` ``(B, C, h, w)``."""

    task = "segmentation"

    def upsampled_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, C, h, w)`` logits resized (bilinear) to ``size`` (H, W): ``(B, C, H, W)``."""
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(
        self, outputs: DenseOutputs, sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Per image an ``(H_i, W_i)`` int64 label map at its original size ``sizes[i]``."""
        return [
            self.upsampled_logits(outputs.logits[i : i + 1], tuple(size))[0].argmax(0)
            for i, size in enumerate(sizes)
        ]


@register_dense
class SegformerAdapter(SegmentationAdapter):
    """SegFormer (``SegformerForSemanticSegmentation``): a Mix Transformer encoder and an all-MLP
    decode head. Parts: ``backbone`` (the encoder stages), ``head`` (the decode head), and
    ``patch_embedding`` (the first overlapping patch embedding, a convolution on the image)."""

    family = "segformer"
    model_types = ("segformer",)
    model_class = "SegformerForSemanticSegmentation"
    processor_class = "SegformerImageProcessorPil"
    parts: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
        "backbone": (("segformer",), ("segformer.stages.0.patch_embeddings.proj",)),
        "head": (("decode_head",), ()),
        "patch_embedding": (("segformer.stages.0.patch_embeddings.proj",), ()),
    }
    default_targets = ("backbone", "head")
    unquantizable: ClassVar[dict[str, str]] = {
        "neck": "SegFormer has no neck: its decode head reads the encoder stages"
    }
    feature_modules = ("segformer.stages.*",)

    def _run(self, model: nn.Module, pixel_values: torch.Tensor, targets: Any) -> DenseOutputs:
        return DenseOutputs(logits=model(pixel_values=pixel_values).logits)

    @classmethod
    def build_processor(cls, size: tuple[int, int], **changes: Any) -> Any:
        return super().build_processor(size, **{"do_reduce_labels": False, **changes})

    @classmethod
    def tiny_config(cls, num_labels: int, image_size: int, **changes: Any) -> Any:
        from transformers import SegformerConfig

        fields = dict(
            num_channels=3,
            num_encoder_blocks=3,
            depths=[1, 1, 1],
            sr_ratios=[4, 2, 1],
            hidden_sizes=[16, 32, 64],
            patch_sizes=[3, 3, 3],
            strides=[2, 2, 2],
            num_attention_heads=[1, 2, 4],
            mlp_ratios=[2, 2, 2],
            decoder_hidden_size=32,
            num_labels=num_labels,
            semantic_loss_ignore_index=255,
        )
        return SegformerConfig(**{**fields, **changes})
