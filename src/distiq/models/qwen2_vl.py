"""Qwen2-VL and Qwen2.5-VL: a ViT over 2x2-merged patches (``model.visual``, whose ``merger``
is the projector) and a Qwen2 decoder with multimodal RoPE.

Inputs are built here because ``Qwen2VLProcessor`` needs torchvision. The image processor
resizes each image to a multiple of ``patch_size * merge_size`` and returns flattened patches
``pixel_values`` (sum of patches, C * temporal_patch * patch^2) and ``image_grid_thw``
(images, 3); an image takes ``t*h*w / merge_size^2`` ``<|image_pad|>`` tokens between
``<|vision_start|>`` and ``<|vision_end|>``. The model needs ``mm_token_type_ids``
(1 on image tokens) to compute its 3-D positions. Default prompt (no chat template): the
Qwen chat format ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}
<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from distiq.models.adapter import VLMAdapter
from distiq.models.loading import register_adapter

if TYPE_CHECKING:
    from PIL import Image


@register_adapter
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    vision_module = "model.visual"
    projector_module = "model.visual.merger"
    language_module = "model.language_model"
    vision_exclude = ("model.visual.merger",)
    vision_embeddings = "patch_embed"
    patch_embedding_module = None
    unquantizable: ClassVar[dict[str, str]] = {
        "patch_embedding": "its patch projection (visual.patch_embed.proj) is a Conv3d, and "
        "distiq quantizes nn.Linear and nn.Conv2d layers"
    }
    vision_attention_probs = False  # its vision attention returns only the output
    image_placeholder = "<|image_pad|>"
    default_prompt = (
        "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    answer_separator = ""

    @property
    def merge_size(self) -> int:
        return int(
            getattr(self.image_processor, "merge_size", None)
            or self.config.vision_config.spatial_merge_size
        )

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        out = self.image_processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"]  # (images, 3): temporal, height, width patches
        counts = (grid.prod(dim=-1) // self.merge_size**2).tolist()
        expansions = [self.image_placeholder * int(n) for n in counts]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, expansions

    def extra_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (batch["input_ids"] == self.image_token_id).int()}
