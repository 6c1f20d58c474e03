"""The recipe's ``task`` section, and what each task rules out in a recipe.

``task: vqa`` (the default) compresses vision-language models; ``segmentation``, ``detection``
and ``depth`` compress dense vision models (:mod:`distiq.train.engine_tasks`), with the methods
rtn, gptq, qat, kd and qad.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from distiq.config import from_dict, to_dict

TaskName = Literal["vqa", "segmentation", "detection", "depth"]
TASK_NAMES: tuple[str, ...] = ("vqa", "segmentation", "detection", "depth")
DENSE_TASKS: tuple[str, ...] = ("segmentation", "detection", "depth")


@dataclass(frozen=True)
class TaskConfig:
    """The recipe's task (``vqa`` by default) and its options; ``task: segmentation`` in YAML
    is ``TaskConfig(name="segmentation")`` (see the module docstring for the options)."""

    name: TaskName = "vqa"
    ignore_index: int = 255
    weight_ce: float = 1.0
    weight_dice: float = 1.0
    min_depth: float = 1.0e-3
    max_depth: float | None = None
    variance_focus: float = 0.85
    max_detections: int = 100

    @classmethod
    def _from_config(cls, value: object) -> TaskConfig:
        if isinstance(value, str):
            return from_dict(cls, {"name": value}, where="task")
        if isinstance(value, dict):
            return from_dict(cls, value, where="task")
        raise ValueError(
            f"expected a task name ({', '.join(TASK_NAMES)}) or a section, got {value!r}"
        )

    def _to_config(self) -> str | dict:
        if self == TaskConfig(name=self.name):
            return self.name
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def dense(self) -> bool:
        """A dense vision task (segmentation, detection, depth)."""
        return self.name in DENSE_TASKS

    def _validate(self) -> list[str]:
        errors = []
        if min(self.weight_ce, self.weight_dice) < 0:
            errors.append("weight_ce and weight_dice must be >= 0")
        if self.min_depth < 0 or (self.max_depth is not None and self.max_depth <= self.min_depth):
            errors.append("need 0 <= min_depth < max_depth")
        if not 0.0 <= self.variance_focus <= 1.0:
            errors.append(f"variance_focus must lie in [0, 1], got {self.variance_focus}")
        if self.max_detections < 1:
            errors.append("max_detections must be >= 1")
        return errors


def task_errors(recipe: Any, terms: set[str]) -> list[str]:
    """What the recipe's task rules out (the dense tasks run rtn, gptq, qat, kd and qad on
    dense vision models)."""
    data, task = recipe.data, recipe.task.name
    if not recipe.task.dense:
        errors = []
        if "reg" in terms:
            errors.append("the reg term distils dense outputs (boxes, depth): task vqa has none")
        if data.format is not None:
            errors.append(
                "data.format / splits name dense data sets; VQA data is scenes, vqa or hf"
            )
        return errors
    errors = []
    if recipe.method == "qlora-kd":
        errors.append(f"qlora-kd adapts VLMs; task {task}: use rtn, gptq, qat, kd or qad")
    if data.vqa is not None or data.hf is not None:
        errors.append(f"task {task} reads data.scenes or data.format + data.splits, not VQA data")
    if not data.labels:
        errors.append(f"data.labels: false is for VQA; task {task} trains on its labels")
    if recipe.teacher.cache is not None:
        errors.append(f"teacher.cache holds VQA answer distributions; task {task} has none")
    if recipe.selective is not None:
        errors.append("selective measures answer-token sensitivity: VQA only")
    if "attn" in terms:
        errors.append(f"the attn term compares VLM attention maps; task {task}: use feat")
    if task == "depth" and "kd" in terms:
        errors.append("depth has no class distribution to distil: use the reg term instead")
    if recipe.student.shallower or recipe.student.init == "preset":
        errors.append(
            f"task {task}: the student is a copy of the teacher or a checkpoint "
            "(student.init: checkpoint); depth / keep_layers / presets are for VLMs"
        )
    quantization = recipe.quantization
    if quantization is not None and getattr(quantization, "budget", None) is not None:
        errors.append("quantization.budget measures answer-token damage: VQA only")
    return errors
