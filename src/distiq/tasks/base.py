"""The uniform task interface a training loop uses without knowing the task.

A task (``VQATask``, ``DetectionTask``, ``SegmentationTask``) is a frozen dataclass holding its
options (so a recipe can build it with ``distiq.config.from_dict``) and offers four verbs:

- ``task.loss(outputs, batch) -> TaskLoss`` — ``TaskLoss(total, terms, stats)``: ``total`` is the
  scalar to optimise; ``terms`` holds every *weighted* part, so ``total == sum(terms.values())``;
  ``stats`` holds detached diagnostics (e.g. the number of positive points) for logging only.
- ``task.distill_view(outputs, batch=None) -> DistillView`` — which outputs a distillation loss
  compares as probability distributions and which as regressions (see ``DistillView``).
- ``task.predict(outputs) -> predictions`` — turns head outputs into what the metric scores.
- ``task.metric() -> MetricAccumulator`` — a fresh accumulator: ``update(predictions, batch)``
  per batch, ``compute() -> dict[str, float]`` at the end, ``merge(other)`` to combine the
  accumulators of several processes, ``reset()``. Metric values are fractions in [0, 1];
  ``task.primary_metric`` names the key that model selection should maximise.

``outputs`` is whatever the model returned (a Hugging Face output object with ``.logits``, a
dict, or a tensor, depending on the task; each task documents it); ``batch`` is the dict the
collate function and the model adapter produced.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, TypedDict

import torch

__all__ = [
    "Distribution",
    "DistillView",
    "MetricAccumulator",
    "Regression",
    "Task",
    "TaskLoss",
    "logits_of",
]


class Distribution(TypedDict):
    """Logits of categorical distributions over the last axis.

    ``logits``: ``(..., K)`` unnormalised log-probabilities; a divergence applies ``softmax`` over
    the last axis (with its temperature). ``mask``: ``(...)`` bool of the positions to compare,
    or ``None`` for all. Teacher and student views of the same task have equal shapes.
    """

    logits: torch.Tensor
    mask: torch.Tensor | None


class Regression(TypedDict):
    """Real-valued outputs compared with a regression loss (MSE, L1).

    ``values``: ``(..., D)``, already scaled to be unit-free (e.g. box sides in strides);
    ``mask``: ``(...)`` bool of the positions to compare, or ``None`` for all.
    """

    values: torch.Tensor
    mask: torch.Tensor | None


class DistillView(TypedDict):
    """``{"distributions": {name: Distribution}, "regressions": {name: Regression}}``."""

    distributions: dict[str, Distribution]
    regressions: dict[str, Regression]


class TaskLoss(NamedTuple):
    """A task loss: ``total`` (scalar, differentiable) equals the sum of the weighted ``terms``;
    ``stats`` are detached diagnostics (floats) for logging, never part of ``total``."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    stats: dict[str, float]


class MetricAccumulator(Protocol):
    """Accumulates a task's metric over batches (see the module docstring)."""

    def update(self, predictions: Any, batch: Mapping[str, Any]) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def merge(self, other: MetricAccumulator) -> None: ...

    def reset(self) -> None: ...


class Task(abc.ABC):
    """Base class of the tasks; see the module docstring for the contract."""

    name: str = ""
    primary_metric: str = ""

    @abc.abstractmethod
    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> TaskLoss: ...

    @abc.abstractmethod
    def distill_view(self, outputs: Any, batch: Mapping[str, Any] | None = None) -> DistillView: ...

    @abc.abstractmethod
    def predict(self, outputs: Any) -> Any: ...

    @abc.abstractmethod
    def metric(self) -> MetricAccumulator: ...


def logits_of(outputs: Any, key: str = "logits") -> torch.Tensor:
    """The logits tensor of a model output: a tensor, a mapping with ``key``, or an object with
    that attribute (Hugging Face ``ModelOutput``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and key in outputs:
        return outputs[key]
    value = getattr(outputs, key, None)
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(
        f"cannot find {key!r} in the model outputs (got {type(outputs).__name__}); pass a tensor, "
        f"a dict with a {key!r} entry, or a model output object with a .{key} attribute"
    )


def require(batch: Mapping[str, Any] | None, key: str, task: str) -> Any:
    """``batch[key]`` or a clear error naming the task and the keys the batch has."""
    if batch is None or key not in batch:
        have = ", ".join(sorted(map(str, batch))) if batch else "nothing"
        raise KeyError(f"the {task} task needs batch[{key!r}]; the batch has {have}")
    return batch[key]


def check_problems(problems: list[str], owner: str) -> None:
    """Raise one ``ValueError`` listing every problem found in a task's options."""
    if problems:
        raise ValueError(f"invalid {owner} options: " + "; ".join(problems))
