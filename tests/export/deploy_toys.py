"""Tiny models and data shared by tests/export and tests/bench (loaded by their conftest)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from distiq.quant import PerChannel, PerGroup, PerTensor, QuantSpec, calibration, quantize_

WORDS = [
    *("how", "many", "red", "blue", "green", "squares", "circles", "are", "there", "what"),
    *("colour", "is", "the", "shape", "at", "top", "left", "right", "bottom", "yes", "no"),
    *("0", "1", "2", "3", "4"),
]
QUESTIONS = [
    "how many red squares are there",
    "what colour is the shape at the top left",
    "are there blue circles",
    "how many green circles are there",
]
W8 = QuantSpec(bits=8, granularity=PerChannel(0))
A8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
W4G32 = QuantSpec(bits=4, granularity=PerGroup(32))
PARTS = ("vision", "projector", "language_model")
SIZES = dict(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
    vision_intermediate_size=64, text_hidden_size=32, text_layers=1, text_heads=2,
    text_kv_heads=2, text_intermediate_size=64, max_length=48,
)  # fmt: skip


def tiny_vlm(seed: int = 0):
    """(model, adapter): a 1-layer edge VLM, 16 image tokens, eval mode."""
    from distiq.models import build_edge_vlm

    model, adapter = build_edge_vlm(WORDS, "tiny", seed=seed, **SIZES)
    return model.eval(), adapter


def tiny_vlm_with_heads(seed: int = 0):
    from distiq.models import VLMWithHeads

    model, adapter = tiny_vlm(seed)
    heads = VLMWithHeads(model, adapter, num_detection_classes=3, num_segmentation_classes=4)
    return heads.eval(), adapter


def samples(n: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        out.append({"image": Image.fromarray(pixels), "question": QUESTIONS[i % 4], "answer": "2"})
    return out


def quantized(model, adapter, weight, activation=None, data=None, parts=PARTS):
    """A fake-quant copy of ``model`` (``quantize_`` on ``parts``), calibrated on ``data``."""
    from distiq.models import VLMWithHeads

    model = copy.deepcopy(model)
    base = model.adapter if isinstance(model, VLMWithHeads) else adapter
    for part in parts:
        quantize_(model, base.quant_config(part, weight=weight, activation=activation, model=model))
    if activation is not None and not activation.dynamic:
        batch = adapter.build_inputs(data or samples())
        with calibration(model), torch.no_grad():
            model(**batch)
    return model.eval()
