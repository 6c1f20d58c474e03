"""``check_parity``: does the ONNX export compute what the PyTorch model computes?

For each VQA sample: the prompt's logits from the exported graphs in onnxruntime
(``OrtVLM``: vision → projector → embeddings → language model) against the PyTorch model's
logits on the same prompt (``adapter.build_inputs``), and the greedy answers of both
(``OrtVLM.answer`` against ``adapter.generate_answers``).

What to expect (measured, see ``distiq.export.onnx_quant``): activation codes are bit-identical
given identical inputs, so a single quantized layer differs only by float reassociation in the
matmul (~1e-7 relative). Across a network, float ops outside the quantized layers (norms,
softmax, GELU) round differently in onnxruntime and PyTorch by an ulp, and an ulp can move a value
across an activation rounding boundary: that code moves by one step ``s``, and the logits by
about ``s·Σ|w|`` downstream. On the 1-layer test VLM no code moved (max |Δlogit| 1.2e-7); on the
demo-sized edge VLM (3 + 3 layers, random weights, 12 questions) max |Δlogit| was 0.016 (int8)
and 0.012 (int4 with ``int4_accuracy_level=0``) with logits up to 0.77, answers identical.
"""

from __future__ import annotations

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
        answers_torch, answers_onnx: greedy answers, one per sample.
    """

    max_abs_logit_diff: float
    max_abs_logit: float
    answers_torch: list[str] = field(default_factory=list)
    answers_onnx: list[str] = field(default_factory=list)

    @property
    def answers_identical(self) -> bool:
        return self.answers_torch == self.answers_onnx

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
) -> ParityReport:
    """Compare an export with its model on VQA ``samples`` (dicts with ``image``, ``question``).

    Args:
        model: the PyTorch model that was exported (fake-quant or quantized layers).
        onnx_dir: the ``export_onnx`` directory.
        adapter: the model's adapter (``VLMWithHeads`` carries its own).
        max_new_tokens: answer length limit for both sides.
        threads, int4_accuracy_level: onnxruntime settings (``OrtVLM``).
    """
    from distiq.export.ort import OrtVLM

    if not samples:
        raise ValueError("check_parity needs at least one sample")
    adapter = adapter or getattr(model, "base_adapter", None)
    if adapter is None:
        raise ValueError("check_parity needs the model's adapter (adapter=...)")
    vlm = getattr(model, "vlm", model)
    runner = OrtVLM(onnx_dir, threads=threads, int4_accuracy_level=int4_accuracy_level)
    gap = top = 0.0
    was_training = vlm.training
    vlm.eval()
    try:
        for sample in samples:
            batch = adapter.build_inputs([sample], with_answers=False)
            ids = runner.prompt_ids(sample["question"])
            if ids != batch["input_ids"][0].tolist():
                raise ValueError(
                    "the export's prompt differs from the adapter's: export again with this "
                    "model's adapter"
                )
            pixels = runner.pixel_values(sample["image"])
            embeds = runner.inputs_embeds(ids, runner.image_features(pixels))
            with torch.no_grad():
                expected = vlm(**batch).logits.float().numpy()
            gap = max(gap, float(np.abs(runner.logits(embeds) - expected).max()))
            top = max(top, float(np.abs(expected).max()))
        answers_torch = adapter.generate_answers(vlm, samples, max_new_tokens=max_new_tokens)
    finally:
        vlm.train(was_training)
    answers_onnx = runner.answers(samples, max_new_tokens=max_new_tokens)
    return ParityReport(gap, top, answers_torch, answers_onnx)
