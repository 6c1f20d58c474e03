"""LLaVA (``LlavaForConditionalGeneration``): CLIP/SigLIP tower, MLP projector, decoder LM.

The built-in edge VLM is this architecture, so it goes through exactly this adapter.

Image tokens: one ``<image>`` per selected vision token: ``(H/patch) * (W/patch)`` patches,
plus the class token that a CLIP tower adds, minus one when
``vision_feature_select_strategy == "default"`` (which drops the class token) — what
``LlavaProcessor`` computes. Default prompt (no chat template): LLaVA-1.5's
``"USER: <image>\\n{question} ASSISTANT:"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distiq.models.adapter import VLMAdapter
from distiq.models.loading import register_adapter

if TYPE_CHECKING:
    from PIL import Image

# Vision towers that prepend a class token to the patch tokens.
_CLASS_TOKEN_TOWERS = ("clip_vision_model", "clip")


@register_adapter
class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)
    architectures = ("LlavaForConditionalGeneration",)
    vision_module = "model.vision_tower"
    projector_module = "model.multi_modal_projector"
    language_module = "model.language_model"
    default_prompt = "USER: {image}\n{question} ASSISTANT:"

    @property
    def patch_size(self) -> int:
        return int(
            getattr(self.processor, "patch_size", None) or self.config.vision_config.patch_size
        )

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens the vision tower puts before the patches (1 for CLIP's class token)."""
        # A processor assembled without a processor_config has default (unset) attributes.
        if getattr(self.processor, "patch_size", None) is not None:
            return int(getattr(self.processor, "num_additional_image_tokens", 0) or 0)
        return int(self.config.vision_config.model_type in _CLASS_TOKEN_TOWERS)

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        height, width = pixel_values.shape[-2:]
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_prefix_tokens
        if self.config.vision_feature_select_strategy == "default":
            count -= 1
        return {"pixel_values": pixel_values}, [self.image_placeholder * count] * len(images)
