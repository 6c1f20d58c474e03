"""The dense tasks: ``segmentation``, ``detection`` and ``depth`` on dense vision models.

Models: Hugging Face checkpoints of the families :mod:`distiq.models.dense` describes (SegFormer;
RT-DETR, DETR; Depth Anything, DPT), the model's task matching the recipe's. Data:
:mod:`~distiq.train.engine_tasks.dense_data` (generated scenes or a data set in its own
format). The step: :mod:`~distiq.train.engine_tasks.dense_step`. Metrics (:meth:`evaluate`):

- segmentation — mIoU over the split's confusion matrix (``distiq.tasks.segmentation``), at each
  image's own size; extras: pixel accuracy, mean accuracy, IoU per class; per image its pixel
  accuracy and mIoU;
- detection — COCO mAP @ [.5:.95] through pycocotools (``distiq.tasks.coco_eval``); extras:
  AP50, AP75, the recall numbers;
- depth — δ < 1.25 (percentage of pixels), with AbsRel, RMSE, δ² / δ³ and SILog in extras and
  per image (``distiq.tasks.depth``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distiq.train.engine_tasks.base import EngineTask, TaskEvaluation
from distiq.train.engine_tasks.dense_engine import DenseEngine

logger = logging.getLogger(__name__)

METRICS = {"segmentation": "miou", "detection": "map", "depth": "delta1"}


class DenseEngineTask(EngineTask):
    """Segmentation, detection or depth (see the module docstring); ``config`` is the recipe's
    ``TaskConfig``."""

    best_key = "best_val_value"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.name = config.name
        self.metric = METRICS[config.name]

    # ------------------------------------------------------------------ models
    def _check_model(self, adapter: Any, where: Any) -> None:
        if adapter.task != self.name:
            raise ValueError(
                f"{where} is a {adapter.task} model ({adapter.family}); the recipe's task is "
                f"{self.name}: set task: {adapter.task} or point at a {self.name} checkpoint"
            )

    def load_model(self, path: Any) -> tuple[nn.Module, Any]:
        from distiq.models import load_dense
        from distiq.train.modeling import resolve_model_dir

        model, adapter = load_dense(resolve_model_dir(path))
        self._check_model(adapter, path)
        return model, adapter

    def load_adapter(self, path: Any) -> Any:
        from distiq.models import load_dense_adapter
        from distiq.train.modeling import resolve_model_dir

        adapter = load_dense_adapter(resolve_model_dir(path))
        self._check_model(adapter, path)
        return adapter

    def build_student(self, ctx: Any) -> tuple[nn.Module, Any]:
        """A copy of the teacher, or a checkpoint of the same task with the same classes."""
        config = ctx.recipe.student
        if config.init == "checkpoint":
            student, adapter = self.load_model(config.path)
            if self.name != "depth" and adapter.num_labels != ctx.teacher_adapter.num_labels:
                raise ValueError(
                    f"the student {config.path} predicts {adapter.num_labels} classes, the "
                    f"teacher {ctx.teacher_adapter.num_labels}; distillation compares them class "
                    "by class"
                )
            student.train()
            return student, adapter
        student = copy.deepcopy(ctx.teacher)
        student.train()
        return student, ctx.teacher_adapter

    # ------------------------------------------------------------------ data
    def check_data(self, data: Any) -> None:
        from distiq.train.data_setup import check_scenes
        from distiq.train.engine_tasks.dense_data import check_split_args

        if data.scenes is not None:
            check_scenes(data)
            return
        if data.format is None:
            raise ValueError(
                f"the recipe names no {self.name} data: set data.scenes, or data.format with "
                "data.splits (one mapping of the format's keys per split)"
            )
        check_split_args(self.name, data)

    def data_paths(self, data: Any) -> list[tuple[str, Any]]:
        from distiq.train.engine_tasks.dense_data import data_format

        paths = [("data.scenes", data.scenes)]
        if data.format is not None:
            fmt = data_format(self.name, data.format)
            for split, args in (data.splits or {}).items():
                paths += [(f"data.splits.{split}.{k}", args.get(k)) for k in fmt.paths]
        return paths

    def _split(self, recipe: Any, split: str, adapter: Any) -> Any:
        from distiq.train.engine_tasks.dense_data import DenseSplit, load_records

        records = load_records(self.name, recipe.data, split)
        if self.name != "depth":
            classes = tuple(records.classes)
            if len(classes) != adapter.num_labels:
                raise ValueError(
                    f"the {split} data has {len(classes)} classes ({', '.join(classes[:8])}"
                    f"{' ...' if len(classes) > 8 else ''}) but the model predicts "
                    f"{adapter.num_labels}; use a checkpoint with one output per class of the data"
                )
        if not len(records):
            raise ValueError(f"the {split} split of the recipe's data has no images")
        return DenseSplit(records, adapter, self.name)

    def load_data(self, recipe: Any, adapter: Any) -> Any:
        from distiq.train.data_setup import EngineData

        data = recipe.data
        train = self._split(recipe, data.train_split, adapter)
        val = self._split(recipe, data.val_split, adapter).limit(data.val_images)
        test = self.load_test(recipe, adapter)
        logger.info("data: %d train / %d val / %d test images", len(train), len(val), len(test))
        return EngineData(train, val, test)

    def load_test(self, recipe: Any, adapter: Any) -> Any:
        data = recipe.data
        return self._split(recipe, data.test_split, adapter).limit(data.test_images)

    # ------------------------------------------------------------------ running
    def engine_for(self, model: nn.Module, adapter: Any, split: Any) -> nn.Module:
        return DenseEngine(model, adapter)

    def objective_config(self, ctx: Any, student: nn.Module, student_adapter: Any) -> Any:
        from distiq.train.engine_tasks.dense_step import dense_objective_config

        return dense_objective_config(ctx.recipe.objective)

    def teacher_side(self, ctx: Any, student_adapter: Any) -> Any:
        from distiq.train.engine_tasks.dense_step import DenseTeacherSide

        teacher = ctx.teacher
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        ours, theirs = student_adapter.image_processor, ctx.teacher_adapter.image_processor
        if student_adapter is not ctx.teacher_adapter and ours.to_dict() != theirs.to_dict():
            raise ValueError(
                "teacher and student process images differently (image processors differ); a "
                "dense student is distilled on the teacher's own pixels: save the student with "
                "the teacher's image processor"
            )
        return DenseTeacherSide(engine=DenseEngine(teacher, ctx.teacher_adapter))

    def step_fn(
        self, objective: Any, side: Any, student: nn.Module, student_adapter: Any, ctx: Any
    ) -> Callable:
        from distiq.train.engine_tasks.dense_step import dense_step_fn, feature_captures

        student_capture, teacher_capture = feature_captures(
            ctx.recipe, student, student_adapter, ctx.teacher, ctx.teacher_adapter
        )
        if side is not None:
            side.capture = teacher_capture
        return dense_step_fn(self, objective, side, student, student_capture)

    def task_loss(self, adapter: Any, out: Any, batch: dict) -> Any:
        """The task term: ``distiq.tasks.TaskLoss`` of the student's outputs on the batch."""
        from distiq.tasks.base import TaskLoss

        config = self.config
        if self.name == "segmentation":
            from distiq.tasks.segmentation import SegmentationTask

            task = SegmentationTask(
                num_classes=adapter.num_labels,
                ignore_index=config.ignore_index,
                weight_ce=config.weight_ce,
                weight_dice=config.weight_dice,
            )
            logits = adapter.upsampled_logits(out.logits, tuple(batch["mask"].shape[-2:]))
            return task.loss(logits, batch)
        if self.name == "depth":
            from distiq.tasks.depth import DepthTask

            task = DepthTask(
                min_depth=config.min_depth,
                max_depth=config.max_depth,
                variance_focus=config.variance_focus,
            )
            pred = adapter.resized(out.depth, tuple(batch["depth"].shape[-2:]))
            return task.loss({"depth": pred}, batch)
        if out.loss is None:
            raise ValueError(f"the {adapter.family} model returned no loss for the targets")
        return TaskLoss(out.loss, dict(out.loss_terms), {})

    def distill_inputs(self, adapter: Any, out: Any, teacher: Any, fp: Any) -> dict[str, Any]:
        from distiq.train.engine_tasks import dense_step

        return getattr(dense_step, f"{self.name}_inputs")(adapter, out, teacher, fp)

    # ------------------------------------------------------------------ evaluation
    def validation_fn(self, split: Any, recipe: Any) -> Callable[[nn.Module], dict[str, float]]:
        def eval_fn(module: nn.Module) -> dict[str, float]:
            return {self.metric: self.evaluate(module, split, recipe).value}

        return eval_fn

    def _accumulator(self, adapter: Any) -> Any:
        config = self.config
        if self.name == "segmentation":
            from distiq.tasks.segmentation import ConfusionMatrix

            return ConfusionMatrix(adapter.num_labels, config.ignore_index, adapter.class_names)
        if self.name == "detection":
            from distiq.tasks.coco_eval import COCOMeanAP

            return COCOMeanAP(adapter.num_labels)
        from distiq.tasks.depth import DepthMetrics

        return DepthMetrics(config.min_depth, config.max_depth)

    @torch.no_grad()
    def predictions(self, engine: nn.Module, split: Any, batch_images: int):
        """``(batch, predictions)`` over ``split`` in batches of ``batch_images`` (eval mode)."""
        from distiq.train.batches import move_to_device

        weights = next(engine.parameters(), None)  # an onnxruntime engine holds none
        device = weights.device if weights is not None else torch.device("cpu")
        was_training = engine.training
        engine.eval()
        try:
            for start in range(0, len(split), batch_images):
                items = [split[i] for i in range(start, min(start + batch_images, len(split)))]
                batch = move_to_device(split.collate(items), device)
                out = engine(batch)
                kwargs = (
                    {"max_detections": self.config.max_detections}
                    if self.name == "detection"
                    else {}
                )
                yield batch, engine.adapter.predict(out, batch["sizes"], **kwargs)
        finally:
            engine.train(was_training)

    def evaluate(
        self, engine: nn.Module, split: Any, recipe: Any, *, shard: bool = False
    ) -> TaskEvaluation:
        adapter = engine.adapter
        metric = self._accumulator(adapter)
        items: list[dict[str, Any]] = []
        for batch, predictions in self.predictions(engine, split, recipe.eval.batch_images):
            predictions = [p.cpu() if isinstance(p, torch.Tensor) else p for p in predictions]
            if self.name == "segmentation":
                masks = [m.cpu() for m in batch["masks"]]
                for image_id, pred, mask in zip(batch["image_id"].tolist(), predictions, masks):
                    items.append(_image_iou(image_id, pred, mask, metric))
                    metric.update(pred[None], {"mask": mask[None]})
            elif self.name == "detection":
                predictions = [{k: v.cpu() for k, v in p.items()} for p in predictions]
                boxes = [b.cpu() for b in batch["boxes"]]
                labels = [label.cpu() for label in batch["labels"]]
                metric.update(predictions, {"boxes": boxes, "labels": labels})
            else:
                depths = [d.cpu() for d in batch["depths"]]
                metric.update(predictions, {"depth": depths, "image_id": batch["image_id"].cpu()})
        metrics = metric.compute()
        if self.name == "depth":
            items = list(metric.per_image)
        value = 100.0 * metrics[self.metric]
        extra = {k: v for k, v in metrics.items() if k != self.metric and v == v}
        extra["num_images"] = len(split)
        return TaskEvaluation(value=value, metrics=metrics, extra=extra, items=items)

    def teacher_record_value(self, records: list[Any], test: Any) -> float | None:
        for record in records:
            if (
                record.method == "teacher"
                and record.task == self.name
                and record.extra.get("num_images") in (None, len(test))
            ):
                return record.value
        return None

    def describe(self, evaluation: TaskEvaluation) -> str:
        return f"test {self.metric} {evaluation.value:.2f} %"


def _image_iou(image_id: int, pred: torch.Tensor, mask: torch.Tensor, metric: Any) -> dict:
    """One image's pixel accuracy and mIoU (classes present in its prediction or truth)."""
    from distiq.tasks.segmentation import confusion_matrix, metrics_from_confusion

    matrix = confusion_matrix(pred, mask, metric.num_classes, metric.ignore_index)
    if int(matrix.sum()) == 0:
        return {"image_id": image_id, "pixel_accuracy": None, "miou": None}
    found = metrics_from_confusion(matrix)
    return {
        "image_id": image_id,
        "pixel_accuracy": found["pixel_accuracy"],
        "miou": found["miou"],
    }
