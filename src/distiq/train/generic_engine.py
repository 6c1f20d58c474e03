"""The generic forward path: any supported family, through its adapter.

Each question becomes one sequence built by ``adapter.build_inputs`` (the family's own image
processing — fixed size, shortest edge and crop, Idefics3's image splitting, Qwen2-VL's dynamic
grid, LLaVA-NeXT's tiles — its prompt format, and the answer and eos marked in ``labels``), the
training forward is the model's own ``forward`` and answers come from its ``generate`` (greedy,
``adapter.generate_answers``). An image with several questions is processed once per question:
simple and exact, at the cost the shared-prefix path saves where it applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from distiq.train.engine_base import EngineModel, VQAOutputs, question_metadata


def samples_of(dataset: Any, items: Sequence[dict], *, with_answers: bool) -> list[dict]:
    """One VQA sample (``image``, ``question`` and, with answers, ``answer``) per question of
    ``items``, in row order."""
    samples = []
    for item in items:
        for row in item["rows"]:
            record = dataset.questions[row]
            sample = {"image": item["image"], "question": record["question"]}
            if with_answers:
                sample["answer"] = record["answer"]
            samples.append(sample)
    return samples


class GenericEngine(EngineModel):
    """The generic path (see the module docstring)."""

    name = "generic"

    @classmethod
    def accepts(cls, adapter: Any) -> bool:
        return True

    @classmethod
    def collate(cls, dataset: Any, items: Sequence[dict], *, with_answers: bool = True) -> dict:
        """Items -> one batch of Q questions.

        Keys: ``inputs`` (the Hugging Face model's keyword arguments: ``input_ids`` (Q, L),
        ``attention_mask`` (Q, L), the family's image tensors and extras; right-padded with
        answers, left-padded prompts for generation); with answers ``labels`` (Q, L): answer
        and eos ids, -100 elsewhere; without, ``samples`` (the Q samples to generate for);
        ``image_id`` (B,), ``answers``, ``question_type``, ``question_id`` and ``items``.
        """
        if not items:
            raise ValueError("collate: empty batch")
        rows = [row for item in items for row in item["rows"]]
        samples = samples_of(dataset, items, with_answers=with_answers)
        batch: dict[str, Any] = {
            "image_id": torch.tensor([int(item["image_id"]) for item in items], dtype=torch.long),
            **question_metadata(dataset, rows),
            "items": list(items),
        }
        if not with_answers:
            batch["samples"] = samples
            return batch
        if not all(isinstance(s["answer"], str) and s["answer"] for s in samples):
            raise ValueError("the batch has no answer tokens: does the split have answers?")
        inputs = dataset.adapter.build_inputs(samples)
        batch["labels"] = inputs.pop("labels")
        batch["inputs"] = inputs
        return batch

    def forward(
        self, batch: Mapping[str, Any], heads: bool = True, language: bool = True
    ) -> VQAOutputs:
        """The model's own forward on the batch's inputs; ``heads`` is ignored (the built-in
        VLM's heads run on the shared-prefix path) and ``language`` must be True."""
        if not language:
            raise ValueError("the generic path runs the whole model (language=True)")
        inputs = self.model_inputs(batch)
        out = self.vlm(**inputs, use_cache=False)
        return VQAOutputs(
            logits=out.logits,
            labels=batch.get("labels"),
            detection=None,
            segmentation=None,
            patch_features=None,
            suffix_mask=inputs["attention_mask"],
        )

    def answers(self, batch: Mapping[str, Any], *, max_new_tokens: int = 4) -> list[str]:
        return self.adapter.generate_answers(
            self.vlm, batch["samples"], max_new_tokens=max_new_tokens
        )

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "inputs" not in batch:
            raise ValueError("model_inputs needs a training batch (collate with answers)")
        return dict(batch["inputs"])
