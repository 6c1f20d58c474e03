"""PaliGemma: SigLIP tower, one linear projector, Gemma decoder with a prefix-LM mask.

Layout (``PaliGemmaProcessor``'s): ``<image>`` x ``image_seq_length``, ``<bos>``, the prompt,
``\\n``, then the answer and eos (the "suffix"). ``token_type_ids`` are 0 on the prefix (image
and prompt: attended bidirectionally) and 1 on the suffix (causal), which is also how the
model knows what to learn. Default prompt (PaliGemma's VQA task prefix):
``"<image><bos>answer en {question}\\n"``; the tokenizer adds no special tokens itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distiq.models.adapter import VLMAdapter
from distiq.models.loading import register_adapter

if TYPE_CHECKING:
    from PIL import Image


@register_adapter
class PaliGemmaAdapter(VLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    architectures = ("PaliGemmaForConditionalGeneration",)
    vision_module = "model.vision_tower"
    projector_module = "model.multi_modal_projector"
    language_module = "model.language_model"
    default_prompt = "{image}{bos}answer en {question}\n"
    answer_separator = ""
    add_special_tokens = False

    @property
    def image_seq_length(self) -> int:
        """Image tokens: one per SigLIP patch, (image_size / patch_size)^2."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        expansion = self.image_placeholder * self.image_seq_length
        return {"pixel_values": pixel_values}, [expansion] * len(images)

    def extra_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Suffix (answer + eos) is 1; right padding after it too, so the prefix block stays the
        # image and prompt only. Left padding (generation) is 0 and masked out anyway.
        answer = batch["answer_mask"]
        after_answer = answer.long().cumsum(dim=1) > 0
        return {"token_type_ids": after_answer.long()}
