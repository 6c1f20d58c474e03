"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA with "any-resolution" tiling.

The image processor resizes each image to the best-fitting resolution of
``image_grid_pinpoints``, cuts it into tiles of the vision tower's size and adds the whole image
resized as a base tile: ``pixel_values`` (images, tiles, 3, H, W) and ``image_sizes``
(images, 2) of the original (height, width). The number of ``<image>`` tokens of an image is
what ``LlavaNextProcessor`` computes: the base tile's patches (plus a class token for CLIP
towers), then the tiles' patches with the padding of the best resolution removed, plus one
"newline" token per row of patches; minus one with ``vision_feature_select_strategy ==
"default"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distiq.models.llava import LlavaAdapter
from distiq.models.loading import register_adapter

if TYPE_CHECKING:
    from PIL import Image


def unpadded_features(
    height: int, width: int, patches: tuple[int, int], scale: tuple[int, int]
) -> tuple[int, int]:
    """``(features, newline features)`` of the tiles of an image of ``height`` x ``width``
    pixels: ``patches`` (rows, columns) per tile, ``scale`` tiles (down, across) in the best
    resolution; the rows or columns that only hold padding are not counted."""
    current_height = patches[0] * scale[0]
    current_width = patches[1] * scale[1]
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        current_height -= ((current_height - new_height) // 2) * 2
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= ((current_width - new_width) // 2) * 2
    return current_height * current_width, current_height


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    architectures = ("LlavaNextForConditionalGeneration",)
    projector_parameters = ("model.image_newline",)

    def image_token_count(self, original: tuple[int, int], tile: tuple[int, int]) -> int:
        """``<image>`` tokens of an image of ``original`` (height, width) pixels whose tiles
        are ``tile`` (height, width) pixels."""
        from transformers.image_processing_utils import select_best_resolution

        pinpoints = self.image_processor.image_grid_pinpoints
        best_height, best_width = select_best_resolution(list(original), pinpoints)
        patches = (tile[0] // self.patch_size, tile[1] // self.patch_size)
        scale = (best_height // tile[0], best_width // tile[1])
        features, newlines = unpadded_features(original[0], original[1], patches, scale)
        base = patches[0] * patches[1] + self.num_prefix_tokens
        count = features + newlines + base
        if self.config.vision_feature_select_strategy == "default":
            count -= 1
        return count

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, torch.Tensor], list[str]]:
        out = self.image_processor(images=images, return_tensors="pt")
        pixel_values, sizes = out["pixel_values"], out["image_sizes"]
        tile = tuple(pixel_values.shape[-2:])
        counts = [self.image_token_count(tuple(int(v) for v in size), tile) for size in sizes]
        expansions = [self.image_placeholder * count for count in counts]
        return {"pixel_values": pixel_values, "image_sizes": sizes}, expansions
