"""Tasks: each head type's loss, distillation view and metric behind one interface
(``vqa``, ``detection``, ``segmentation``, ``depth``).

>>> from distiq.tasks import build_task
>>> task = build_task("segmentation", num_classes=5)
>>> task.primary_metric
'miou'

Every task offers ``loss(outputs, batch) -> TaskLoss``, ``distill_view(outputs, batch=None)``,
``predict(outputs)`` and ``metric()`` (an accumulator with ``update`` / ``compute`` / ``merge`` /
``reset``); see ``distiq.tasks.base``. pycocotools is imported only when COCO mAP is computed.
"""

from __future__ import annotations

from typing import Any

from distiq.registry import Registry
from distiq.tasks.base import (
    DistillView,
    Distribution,
    MetricAccumulator,
    Regression,
    Task,
    TaskLoss,
)
from distiq.tasks.depth import DepthTask
from distiq.tasks.detection import DetectionTask
from distiq.tasks.segmentation import SegmentationTask
from distiq.tasks.vqa import VQATask

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("vqa", VQATask)
TASKS.register("detection", DetectionTask)
TASKS.register("segmentation", SegmentationTask)
TASKS.register("depth", DepthTask)


def build_task(name: str, **options: Any) -> Task:
    """The task registered as ``name`` (``vqa``, ``detection``, ``segmentation``, ``depth``), built and
    validated from ``options`` (e.g. a recipe's YAML section) by ``distiq.config.from_dict``, so
    unknown or mistyped options are reported together with "did you mean"."""
    from distiq.config import from_dict

    return from_dict(TASKS.get(name), options, where=name)


__all__ = [
    "TASKS",
    "DepthTask",
    "DetectionTask",
    "Distribution",
    "DistillView",
    "MetricAccumulator",
    "Regression",
    "SegmentationTask",
    "Task",
    "TaskLoss",
    "VQATask",
    "build_task",
]
