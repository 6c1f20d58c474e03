"""Inputs of an ONNX export's graphs for one (image, question), prepared the way the PyTorch
model's adapter prepares them.

``ExportInputs(path)`` loads the export's ``processor/`` folder (tokenizer, image processor and
the Hugging Face config) as the family's ``VLMAdapter`` (``distiq.models.load_adapter``), so the
prompt, the image-token expansion and the pixels are exactly those of ``adapter.build_inputs``.
It then shapes them for the vision graph of the family (``distiq.export.onnx_vision``) and
computes the decoder's ``position_ids``: ``0..L-1`` for LLaVA and Idefics3, and Qwen2-VL's 3-D
multimodal positions (``mrope_positions``, Hugging Face's ``get_rope_index`` for images).
Both ``OrtVLM`` (onnxruntime) and ``GenaiVLM`` (onnxruntime-genai) use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class PromptInputs:
    """One prompt, ready for the graphs.

    Attributes:
        input_ids: (1, L) int64 token ids, image tokens expanded.
        vision: the vision graph's inputs by name (``pixel_values``, ``image_grid_thw``).
        num_image_tokens: image tokens in ``input_ids`` (rows of ``image_features``).
        position_ids: (1, L) int64, or (3, 1, L) for multimodal RoPE.
        rope_delta: the position of the token at index ``i >= L`` is ``i + rope_delta``.
    """

    input_ids: np.ndarray
    vision: dict[str, np.ndarray]
    num_image_tokens: int
    position_ids: np.ndarray
    rope_delta: int = 0

    def next_positions(self, index: int) -> np.ndarray:
        """``position_ids`` of the single token at sequence index ``index`` (>= L)."""
        value = np.full((1, 1), index + self.rope_delta, dtype=np.int64)
        return np.broadcast_to(value, (3, 1, 1)).copy() if self.position_ids.ndim == 3 else value

    def positions_until(self, length: int) -> np.ndarray:
        """``position_ids`` of the whole sequence up to ``length`` tokens (prompt and new)."""
        prompt = self.position_ids.shape[-1]
        extra = np.arange(prompt, length, dtype=np.int64)[None] + self.rope_delta  # (1, n)
        if self.position_ids.ndim == 3:
            extra = np.broadcast_to(extra[None], (3, 1, extra.shape[-1]))
        return np.concatenate([self.position_ids, extra], axis=-1)


def mrope_positions(
    input_ids: np.ndarray, image_grid_thw: np.ndarray, image_token_id: int, merge: int
) -> tuple[np.ndarray, int]:
    """Qwen2-VL's 3-D positions ``(3, L)`` of one unpadded sequence, and the delta of the
    positions after it. Text tokens count up on all three axes; each run of image tokens takes
    the next image's grid ``(t, h / m, w / m)`` laid out from the current position (temporal,
    row, column), and the text after it continues at ``current + max(h, w) / m``.

    Args:
        input_ids: (L,) token ids.
        image_grid_thw: (images, 3) patch grids, in prompt order.
        image_token_id: the image placeholder token.
        merge: the vision tower's spatial merge size m.
    """
    length = input_ids.shape[0]
    positions = np.zeros((3, length), dtype=np.int64)
    current, start, image = 0, 0, 0
    while start < length:
        is_image = input_ids[start] == image_token_id
        end = start
        while end < length and (input_ids[end] == image_token_id) == is_image:
            end += 1
        if not is_image:
            positions[:, start:end] = np.arange(end - start) + current
            current += end - start
        else:
            if image >= len(image_grid_thw):
                raise ValueError("more image-token runs in the prompt than image grids")
            frames, height, width = (int(v) for v in image_grid_thw[image])
            rows, columns = height // merge, width // merge
            if frames * rows * columns != end - start:
                raise ValueError(
                    f"image {image} has {end - start} image tokens but its grid "
                    f"{frames}x{height}x{width} gives {frames * rows * columns}"
                )
            t, h, w = np.meshgrid(
                np.arange(frames), np.arange(rows), np.arange(columns), indexing="ij"
            )
            positions[:, start:end] = np.stack([t, h, w]).reshape(3, -1) + current
            current += max(height, width) // merge
            image += 1
        start = end
    return positions, int(positions.max(initial=-1)) + 1 - length


class ExportInputs:
    """Prepares ``PromptInputs`` for an export (see the module docstring).

    Args:
        path: a directory written by ``export_onnx``.
        manifest: its manifest (``read_onnx_manifest``).
    """

    def __init__(self, path: str | os.PathLike, manifest: dict) -> None:
        from distiq.export.onnx import PROCESSOR_DIR
        from distiq.models import load_adapter

        self.path = Path(path)
        self.facts = manifest["vlm"]
        self.adapter = load_adapter(
            self.path / PROCESSOR_DIR, prompt_template=self.facts.get("prompt_template_override")
        )
        self.tokenizer = self.adapter.tokenizer

    def prepare(self, image: Any, question: str, *, reserve: int = 0) -> PromptInputs:
        """The graphs' inputs for one question about one image (``reserve`` new tokens are
        kept free in the context, as ``adapter.build_inputs`` does)."""
        batch = self.adapter.build_inputs(
            [{"image": image, "question": question}], with_answers=False, reserve=reserve
        )
        ids = batch["input_ids"].numpy().astype(np.int64)  # (1, L)
        if not bool(batch["attention_mask"].all()):
            raise ValueError("one prompt should not be padded; this is a bug in distiq")
        family = self.facts["family"]
        pixels = batch["pixel_values"].float().numpy()
        if family == "idefics3":
            vision = {"pixel_values": self._tiles(pixels, batch.get("pixel_attention_mask"))}
        elif family == "qwen2_vl":
            grid = batch["image_grid_thw"].numpy().astype(np.int64)
            vision = {"pixel_values": np.ascontiguousarray(pixels), "image_grid_thw": grid}
        else:
            vision = {"pixel_values": np.ascontiguousarray(pixels)}
        count = int((ids == self.facts["image_token_id"]).sum())
        if self.facts.get("mrope"):
            positions, delta = mrope_positions(
                ids[0], vision["image_grid_thw"], self.facts["image_token_id"],
                self.facts["spatial_merge_size"],
            )  # fmt: skip
            return PromptInputs(ids, vision, count, positions[:, None, :], delta)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        return PromptInputs(ids, vision, count, positions)

    @staticmethod
    def _tiles(pixels: np.ndarray, mask: Any) -> np.ndarray:
        """(1, T, 3, S, S) tiles -> (T, 3, S, S); every tile must be a full image (no padding)."""
        if mask is not None and not bool(mask.all()):
            raise ValueError(
                "the image processor padded part of a tile (pixel_attention_mask has zeros); "
                "the ONNX vision graph takes full tiles: keep the processor's resizing to "
                "multiples of max_image_size"
            )
        return np.ascontiguousarray(pixels.reshape(-1, *pixels.shape[2:]))

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated ids, special tokens removed, stripped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
