"""Choosing a model's forward path, and the VQA evaluation every path shares.

``ENGINE_PATHS`` lists the forward paths in the order they are tried (see
:mod:`distiq.train.engine_base`): the shared-prefix fast path for LLaVA-architecture models with
a fixed-size image processor, then the generic path, which accepts every supported family.
``register_path`` puts another one in front of the generic path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from distiq.train.engine_base import EngineModel, VQAOutputs
from distiq.train.generic_engine import GenericEngine
from distiq.train.prefix_engine import SharedPrefixEngine

logger = logging.getLogger(__name__)

ENGINE_PATHS: list[type[EngineModel]] = [SharedPrefixEngine, GenericEngine]


def register_path(cls: type[EngineModel]) -> type[EngineModel]:
    """Class decorator: try ``cls`` before the generic path (after those registered before)."""
    if not (isinstance(cls, type) and issubclass(cls, EngineModel)):
        raise TypeError(f"register_path expects an EngineModel subclass, got {cls!r}")
    if cls not in ENGINE_PATHS:
        ENGINE_PATHS.insert(len(ENGINE_PATHS) - 1, cls)
    return cls


def engine_class(adapter: Any) -> type[EngineModel]:
    """The first forward path that accepts ``adapter`` (the generic one at the latest)."""
    for cls in ENGINE_PATHS:
        if cls.accepts(adapter):
            return cls
    raise AssertionError("the generic path accepts every adapter")  # pragma: no cover


def engine_for(model: nn.Module, adapter: Any, path: type[EngineModel] | None = None) -> Any:
    """``model`` wrapped in its forward path (``path``, e.g. a dataset's, or the first that
    accepts ``adapter``)."""
    cls = path if path is not None else engine_class(adapter)
    return cls(model, adapter)


@torch.no_grad()
def evaluate_vqa(
    engine: EngineModel,
    dataset: Any,
    *,
    batch_images: int = 64,
    max_new_tokens: int = 4,
    device: torch.device | str | None = None,
    shard: bool = False,
    per_question: list | None = None,
) -> dict[str, float]:
    """VQA accuracy of ``engine`` on ``dataset`` (an ``ImageQuestions``), by greedy generation.

    With ``shard`` and ``torch.distributed`` initialised, each of the W processes answers every
    W-th image (:func:`~distiq.train.distributed.shard_range`) and the scores are gathered, so
    every process returns the metrics of the whole dataset in about 1/W of the time (an image's
    answers do not depend on which images share its batch; a 2-process test compares the two).
    Every process must call it then.

    Returns fractions in [0, 1]: ``vqa_accuracy``, ``vqa_accuracy/question_type/<type>``,
    ``vqa_accuracy/answer_type/<type>``, and ``num_questions`` (the official VQA accuracy of
    ``distiq.tasks.vqa``: mean over questions). ``per_question``, a list, receives each
    question's ``{"question_id", "prediction", "score"}``.
    """
    from distiq.tasks.vqa import VQAAccuracy
    from distiq.train.batches import move_to_device
    from distiq.train.distributed import gather_objects, get_world_size, shard_range

    if device is None:
        device = next(engine.parameters()).device
    sharded = shard and get_world_size() > 1
    if sharded:
        dataset = dataset.subset(list(shard_range(len(dataset))))
    metric = VQAAccuracy()
    for start in range(0, len(dataset), batch_images):
        items = [dataset[i] for i in range(start, min(start + batch_images, len(dataset)))]
        batch = move_to_device(dataset.generation_collate(items), torch.device(device))
        predictions = engine.answers(batch, max_new_tokens=max_new_tokens)
        metric.update(predictions, batch)
    if sharded:
        parts = gather_objects(metric)
        metric = VQAAccuracy()
        for part in parts:
            metric.merge(part)
    if per_question is not None:
        per_question.extend(metric.per_question())
    return metric.compute()


def accuracy_by_type(metrics: dict[str, float]) -> dict[str, float]:
    """``{question type: accuracy %}`` from :func:`evaluate_vqa`'s fractions."""
    prefix = "vqa_accuracy/question_type/"
    return {k[len(prefix) :]: 100.0 * v for k, v in metrics.items() if k.startswith(prefix)}


__all__ = [
    "ENGINE_PATHS",
    "EngineModel",
    "GenericEngine",
    "SharedPrefixEngine",
    "VQAOutputs",
    "accuracy_by_type",
    "engine_class",
    "engine_for",
    "evaluate_vqa",
    "register_path",
]
