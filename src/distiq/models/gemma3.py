"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, pooled linear projector, Gemma 3
decoder.

Layout (``Gemma3Processor``'s): the image placeholder ``<start_of_image>`` in the prompt becomes
``"\\n\\n<start_of_image>" + "<image_soft_token>" x mm_tokens_per_image + "<end_of_image>\\n\\n"``.
``token_type_ids`` are 1 on the image tokens, which the model attends to bidirectionally (in
training and in generation). Default prompt (no chat template): Gemma's chat format
``"<start_of_turn>user\\n{image}{question}<end_of_turn>\\n<start_of_turn>model\\n"``; the
tokenizer adds ``<bos>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from distiq.models.adapter import VLMAdapter
from distiq.models.loading import register_adapter

if TYPE_CHECKING:
    from PIL import Image

BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"


@register_adapter
class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    architectures = ("Gemma3ForConditionalGeneration",)
    vision_module = "model.vision_tower"
    projector_module = "model.multi_modal_projector"
    language_module = "model.language_model"
    unquantizable: ClassVar[dict[str, str]] = {
        "projector": "its projector multiplies by a weight matrix directly "
        "(mm_input_projection_weight), not through an nn.Linear layer"
    }
    image_placeholder = BOI_TOKEN
    default_prompt = "<start_of_turn>user\n{image}{question}<end_of_turn>\n<start_of_turn>model\n"
    answer_separator = ""

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = IMAGE_TOKEN * int(self.config.mm_tokens_per_image)
        expansion = f"\n\n{BOI_TOKEN}{tokens}{EOI_TOKEN}\n\n"
        return {"pixel_values": pixel_values}, [expansion] * len(images)

    def extra_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (batch["input_ids"] == self.image_token_id).long()}
