"""Idefics3 and SmolVLM: SigLIP-style tower, pixel-shuffle connector, Llama-style LM.

Inputs are built here rather than by ``SmolVLMProcessor`` (which needs the ``num2words``
package); the image-token layout is the processors' own:

- no splitting (``rows == cols == 0``): ``<fake_token_around_image><global-img>`` +
  ``<image>`` x ``image_seq_len`` + ``<fake_token_around_image>``;
- split into ``rows x cols`` tiles: per tile ``<fake_token_around_image><row_r_col_c>`` +
  ``<image>`` x ``image_seq_len``, a newline after each row, then ``\\n`` and the global image
  as above.

``image_seq_len = (image_size / patch_size)^2 / scale_factor^2``. Default prompt (no chat
template): ``"User:<image>{question}<end_of_utterance>\\nAssistant:"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distiq.models.adapter import VLMAdapter
from distiq.models.loading import register_adapter

if TYPE_CHECKING:
    from PIL import Image

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


@register_adapter
class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    vision_module = "model.vision_model"
    projector_module = "model.connector"
    language_module = "model.text_model"
    default_prompt = "User:{image}{question}<end_of_utterance>\nAssistant:"

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile: (image_size / patch_size)^2 / scale_factor^2."""
        # What the connector produces per tile; a processor's image_seq_len must equal it.
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return int(patches / self.config.scale_factor**2)

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        out = self.image_processor(
            images=[[image] for image in images], return_row_col_info=True, return_tensors="pt"
        )
        seq = self.image_placeholder * self.image_seq_len
        global_image = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{seq}{FAKE_IMAGE_TOKEN}"
        expansions = []
        for rows, cols in zip(out["rows"], out["cols"]):
            rows, cols = int(rows[0]), int(cols[0])
            if rows == 0 and cols == 0:
                expansions.append(global_image)
                continue
            text = ""
            for r in range(rows):
                for c in range(cols):
                    text += f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{seq}"
                text += "\n"
            expansions.append(f"{text}\n{global_image}")
        kwargs = {"pixel_values": out["pixel_values"]}
        if "pixel_attention_mask" in out:
            kwargs["pixel_attention_mask"] = out["pixel_attention_mask"]
        return kwargs, expansions
