"""What the engine runs a VLM through: :class:`EngineModel`, one subclass per forward path.

A forward path says how one model is run on the engine's VQA data (``ImageQuestions``):

- ``accepts(adapter)`` — whether the path applies to models with this adapter (decided from the
  config and the processing alone, before any weights are loaded, so that data can be prepared
  in a parent process before it forks);
- ``prepare(dataset)`` — one-off work on a split when it is built (e.g. tokenizing every
  question once);
- ``collate(dataset, items, with_answers=...)`` — a batch of images with their questions;
- ``forward(batch)`` — :class:`VQAOutputs` with logits and labels aligned the Hugging Face way
  (``logits[:, t]`` predicts ``labels[:, t + 1]``);
- ``answers(batch, max_new_tokens)`` — greedy answers, one string per question;
- ``model_inputs(batch)`` — the batch as keyword arguments of the Hugging Face model (what
  ``distiq.ptq.quantize_model`` calibrates on).

The paths are tried in order (:mod:`distiq.train.engines`): the first that accepts a model's
adapter wins; the generic path (``adapter.build_inputs`` and the model's own forward and
``generate``) accepts every supported family and comes last. The wrapped model is ``inner``:
quantize, attach hooks to, and save ``inner``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distiq.models import unwrap_vlm


@dataclass
class VQAOutputs:
    """What :meth:`EngineModel.forward` returns.

    Attributes:
        logits: (Q, S, V) language-model logits of each question's sequence (the suffix after
            the shared image prefix on the prefix path, the whole sequence on the generic
            path); ``logits[:, t]`` predicts token ``t + 1``. None when the forward ran the
            vision side only.
        labels: (Q, S) answer and eos ids at their positions, -100 elsewhere (None without
            answers).
        suffix_mask: (Q, S) 1 on real tokens (the attention mask of those positions).
        detection: the detection head's dict or None (the built-in VLM's heads only).
        segmentation: (B, C, H, W) segmentation logits or None.
        patch_features: (B, N, D) the vision features the projector and heads see (the prefix
            path only; None on the generic path).
    """

    logits: torch.Tensor | None
    labels: torch.Tensor | None
    detection: dict[str, Any] | None
    segmentation: torch.Tensor | None
    patch_features: torch.Tensor | None
    suffix_mask: torch.Tensor


class EngineModel(nn.Module):
    """A VLM (``model``, with ``adapter``) run on engine batches; see the module docstring.

    Args:
        model: a Hugging Face VLM of a supported family, or ``distiq.models.VLMWithHeads``.
        adapter: the family's adapter (the unprefixed one of the VLM).
    """

    name = ""

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        super().__init__()
        self.inner = model
        self.vlm = unwrap_vlm(model)
        self.adapter = adapter

    # ------------------------------------------------------------------ class level: data
    @classmethod
    def accepts(cls, adapter: Any) -> bool:
        """Whether this path runs models with ``adapter``'s config and processing."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, dataset: Any) -> None:
        """One-off work on a split when it is built (nothing by default)."""

    @classmethod
    def collate(cls, dataset: Any, items: Sequence[dict], *, with_answers: bool = True) -> dict:
        """A batch of ``items`` (``dataset[i]``: one image with its question rows)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ running
    def forward(
        self, batch: Mapping[str, Any], heads: bool = True, language: bool = True
    ) -> VQAOutputs:
        raise NotImplementedError

    def answers(self, batch: Mapping[str, Any], *, max_new_tokens: int = 4) -> list[str]:
        """Greedy answers (stripped strings) for a ``collate(..., with_answers=False)`` batch."""
        raise NotImplementedError

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The batch as keyword arguments of the Hugging Face model (no labels)."""
        raise NotImplementedError


def question_metadata(dataset: Any, rows: Sequence[int]) -> dict[str, Any]:
    """What every batch carries about its questions (for metrics and the teacher cache):
    ``answers`` (Q lists of human answers), ``question_type`` (Q str) and ``question_id`` (Q,)."""
    questions = dataset.questions
    return {
        "answers": [list(questions[r]["answers"]) for r in rows],
        "question_type": [str(questions[r].get("question_type", "")) for r in rows],
        "question_id": torch.tensor([int(questions[r]["question_id"]) for r in rows]),
    }
