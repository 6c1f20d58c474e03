"""``EngineTask``: what the compression methods ask the recipe's task for.

The methods (:mod:`distiq.train.methods`) know no task. They ask the task of the recipe
(``recipe.task``: ``vqa``, ``segmentation``, ``detection``, ``depth``) for:

- the model: :meth:`EngineTask.load_model` / :meth:`EngineTask.load_adapter` (a VLM, or a dense
  vision model), :meth:`EngineTask.build_student`;
- the data: :meth:`EngineTask.check_data`, :meth:`EngineTask.load_data` (``EngineData``:
  train / val / test splits prepared for the student's processing), :meth:`EngineTask.load_test`;
- the forward path: :meth:`EngineTask.engine_for` (the model wrapped so that the training loop,
  calibration and PTQ run it on the task's batches: ``engine(batch, heads=False)``,
  ``engine.model_inputs(batch)``, ``engine.inner``);
- the objective's inputs: :meth:`EngineTask.objective_config` (the recipe's objective as the
  task's outputs need it), :meth:`EngineTask.teacher_side`, :meth:`EngineTask.step_fn` (one
  training step: student and teacher forwards, then ``QuantDistillObjective`` with the task's
  logits, task loss, regressions and features);
- evaluation: :meth:`EngineTask.validation_fn` (the metric that picks the best checkpoint) and
  :meth:`EngineTask.evaluate` (:class:`TaskEvaluation`: the metric in 0-100, the record's
  extras, per-item rows for paired comparisons);
- the result record: ``name`` / ``metric`` (the record's ``task`` and ``metric``),
  :meth:`EngineTask.teacher_record_value`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn


@dataclass
class TaskEvaluation:
    """A model's score on one split.

    Attributes:
        value: the task's metric in 0-100 (VQA accuracy, mIoU, mAP, δ<1.25) — a record's value.
        metrics: every metric the task computed (fractions, or the task's own units).
        extra: what a result record keeps in ``extra`` (per-type accuracy, AbsRel, counts).
        items: per-item rows (a question's answer and score, an image's IoU / depth errors),
            written to ``predictions.jsonl`` for comparisons item by item; may be empty.
    """

    value: float
    metrics: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)


class EngineTask:
    """A recipe task as the engine runs it (see the module docstring). One instance per run,
    built from the recipe's ``task`` section (``config``)."""

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""  # the result record's metric name
    best_key: ClassVar[str] = ""  # the record's extra key of the best validation value

    def __init__(self, config: Any = None) -> None:
        self.config = config

    # ------------------------------------------------------------------ models
    def load_model(self, path: Any) -> tuple[nn.Module, Any]:
        raise NotImplementedError

    def load_adapter(self, path: Any) -> Any:
        raise NotImplementedError

    def check_model(self, path: Any) -> None:
        """Fail fast when ``path`` holds no model this task runs (no weights loaded)."""
        self.load_adapter(path)

    def build_student(self, ctx: Any) -> tuple[nn.Module, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ data
    def check_data(self, data: Any) -> None:
        raise NotImplementedError

    def load_data(self, recipe: Any, adapter: Any) -> Any:
        raise NotImplementedError

    def load_test(self, recipe: Any, adapter: Any) -> Any:
        raise NotImplementedError

    def data_paths(self, data: Any) -> list[tuple[str, Any]]:
        """``(what, path)`` of every input the data section names (an output may not hold
        them)."""
        return []

    # ------------------------------------------------------------------ running
    def engine_for(self, model: nn.Module, adapter: Any, split: Any) -> nn.Module:
        raise NotImplementedError

    def objective_config(self, ctx: Any, student: nn.Module, student_adapter: Any) -> Any:
        """The recipe's objective as this task's step feeds it."""
        return ctx.recipe.objective

    def teacher_side(self, ctx: Any, student_adapter: Any) -> Any:
        raise NotImplementedError

    def step_fn(
        self, objective: Any, side: Any, student: nn.Module, student_adapter: Any, ctx: Any
    ) -> Callable:
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    def validation_fn(self, split: Any, recipe: Any) -> Callable[[nn.Module], dict[str, float]]:
        raise NotImplementedError

    def evaluate(
        self, engine: nn.Module, split: Any, recipe: Any, *, shard: bool = False
    ) -> TaskEvaluation:
        raise NotImplementedError

    def teacher_record_value(self, records: list[Any], test: Any) -> float | None:
        """The value of a teacher record in ``records`` measured on ``test`` (the teacher's
        directory's ``results.json``), or None."""
        for record in records:
            if record.method == "teacher" and record.task == self.name:
                return record.value
        return None

    def describe(self, evaluation: TaskEvaluation) -> str:
        """One line for the log: the metric and its value."""
        return f"test {self.metric} {evaluation.value:.2f} %"
