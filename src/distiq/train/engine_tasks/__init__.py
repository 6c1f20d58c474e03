"""The recipe's task as the engine runs it: ``vqa`` (vision-language models), ``segmentation``,
``detection`` and ``depth`` (dense vision models).

``engine_task(recipe)`` gives the :class:`EngineTask` of a recipe (its ``task`` section); the
compression methods ask it for models, data, the forward path, the step, the teacher's side and
the evaluation (:mod:`distiq.train.engine_tasks.base`). ``ENGINE_TASKS`` maps a task name to its
class; ``register_engine_task`` adds one.
"""

from __future__ import annotations

from typing import Any

from distiq.registry import Registry
from distiq.train.engine_tasks.base import EngineTask, TaskEvaluation
from distiq.train.engine_tasks.dense import DenseEngineTask
from distiq.train.engine_tasks.vqa import VQAEngineTask

ENGINE_TASKS: Registry[type[EngineTask]] = Registry("task")
ENGINE_TASKS.register("vqa", VQAEngineTask)
for _name in ("segmentation", "detection", "depth"):
    ENGINE_TASKS.register(_name, DenseEngineTask)


def register_engine_task(name: str, cls: type[EngineTask]) -> type[EngineTask]:
    """Register ``cls`` as the engine task of recipes with ``task: name``."""
    if not (isinstance(cls, type) and issubclass(cls, EngineTask)):
        raise TypeError(f"register_engine_task expects an EngineTask subclass, got {cls!r}")
    ENGINE_TASKS.register(name, cls)
    return cls


def engine_task(recipe_or_config: Any) -> EngineTask:
    """The :class:`EngineTask` of a recipe (or of its ``task`` section)."""
    config = getattr(recipe_or_config, "task", recipe_or_config)
    return ENGINE_TASKS.get(config.name)(config)


__all__ = [
    "ENGINE_TASKS",
    "DenseEngineTask",
    "EngineTask",
    "TaskEvaluation",
    "VQAEngineTask",
    "engine_task",
    "register_engine_task",
]
