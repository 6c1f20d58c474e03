"""``check_parity``: does the ONNX export compute what the PyTorch model computes?

For each VQA sample: the prompt's logits from the exported graphs in onnxruntime
(``OrtVLM``: vision → embedding → decoder with an empty cache) against the PyTorch model's
logits on the same prompt (``adapter.build_inputs``), and the greedy answers of the PyTorch
model (``adapter.generate_answers``), of ``OrtVLM`` (decoding with the KV cache) and — when
onnxruntime-genai is installed — of onnxruntime-genai driving the same export (``GenaiVLM``).

What to expect (measured, see ``distiq.export.onnx_quant``): activation codes are bit-identical
given identical inputs, so a single quantized layer differs only by float reassociation in the
matmul. Across a network, float ops outside the quantized layers (norms, softmax, GELU) round
differently in onnxruntime and PyTorch by an ulp, and an ulp can move a value across an
activation rounding boundary: that code moves by one step ``s``, and the logits by about
``s·Σ|w|`` downstream. docs/export.md lists the measured gaps.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class ParityReport:
    """Logit and answer agreement between an ONNX export and its PyTorch model.

    Attributes:
        max_abs_logit_diff: max over samples, positions and vocabulary of |Δlogit|.
        max_abs_logit: max |logit| of the PyTorch model (scale for the difference).
        answers_torch, answers_onnx: greedy answers, one per sample (onnxruntime: ``OrtVLM``).
        answers_genai: onnxruntime-genai's answers, or None when it was not run.
    """

    max_abs_logit_diff: float
    max_abs_logit: float
    answers_torch: list[str] = field(default_factory=list)
    answers_onnx: list[str] = field(default_factory=list)
    answers_genai: list[str] | None = None

    @property
    def answers_identical(self) -> bool:
        return self.answers_torch == self.answers_onnx

    @property
    def genai_answers_identical(self) -> bool | None:
        """Whether onnxruntime-genai gave the PyTorch answers (None: genai was not run)."""
        return None if self.answers_genai is None else self.answers_genai == self.answers_torch

    @property
    def answer_agreement(self) -> float:
        pairs = list(zip(self.answers_torch, self.answers_onnx))
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")

    def to_dict(self) -> dict:
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "max_abs_logit": self.max_abs_logit,
            "answers_identical": self.answers_identical,
            "answer_agreement": self.answer_agreement,
            "num_samples": len(self.answers_torch),
            "genai_answers_identical": self.genai_answers_identical,
        }


def check_parity(
    model: nn.Module,
    onnx_dir: str | os.PathLike,
    samples: list[dict],
    *,
    adapter: Any = None,
    max_new_tokens: int = 8,
    threads: int | None = None,
    int4_accuracy_level: int | None = None,
    genai: bool | None = None,
) -> ParityReport:
    """Compare an export with its model on VQA ``samples`` (dicts with ``image``, ``question``).

    Args:
        model: the PyTorch model that was exported (fake-quant or quantized layers).
        onnx_dir: the ``export_onnx`` directory.
        adapter: the model's adapter (``VLMWithHeads`` carries its own).
        max_new_tokens: answer length limit for every runtime.
        threads, int4_accuracy_level: onnxruntime settings (``OrtVLM``; the accuracy level is
            also given to onnxruntime-genai).
        genai: also answer with onnxruntime-genai (None: when the package is installed).

    Raises:
        ValueError: no samples, no adapter, or an export whose prompt differs from the adapter's.
    """
    from distiq.export.ort import OrtVLM

    if not samples:
        raise ValueError("check_parity needs at least one sample")
    adapter = adapter or getattr(model, "base_adapter", None)
    if adapter is None:
        raise ValueError("check_parity needs the model's adapter (adapter=...)")
    from distiq.models.multitask import unwrap_vlm

    vlm = unwrap_vlm(model)
    runner = OrtVLM(onnx_dir, threads=threads, int4_accuracy_level=int4_accuracy_level)
    gap = top = 0.0
    was_training = vlm.training
    vlm.eval()
    try:
        for sample in samples:
            batch = adapter.build_inputs([sample], with_answers=False)
            prompt = runner.inputs.prepare(sample["image"], sample["question"])
            if prompt.input_ids[0].tolist() != batch["input_ids"][0].tolist():
                raise ValueError(
                    "the export's prompt differs from the adapter's: export again with this "
                    "model's adapter"
                )
            embeds = runner.embed(prompt.input_ids, runner.image_features(prompt.vision))
            got, _ = runner.decode(embeds, prompt.position_ids)
            with torch.no_grad():
                expected = vlm(**batch).logits.float().numpy()
            gap = max(gap, float(np.abs(got - expected).max()))
            top = max(top, float(np.abs(expected).max()))
        answers_torch = adapter.generate_answers(vlm, samples, max_new_tokens=max_new_tokens)
    finally:
        vlm.train(was_training)
    answers_onnx = runner.answers(samples, max_new_tokens=max_new_tokens)
    answers_genai = None
    if genai or (genai is None and importlib.util.find_spec("onnxruntime_genai") is not None):
        from distiq.export.onnx_genai import GenaiVLM, accuracy_overlay

        runtime = GenaiVLM(onnx_dir, config_overlay=accuracy_overlay(int4_accuracy_level))
        answers_genai = runtime.answers(samples, max_new_tokens=max_new_tokens)
    return ParityReport(gap, top, answers_torch, answers_onnx, answers_genai)
