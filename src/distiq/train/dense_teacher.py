"""Training a dense teacher (``distiq teacher`` with ``task: segmentation | detection | depth``):
a dense vision model trained with its task loss, from a family's small config or from a
checkpoint (fine-tuning), saved as a Hugging Face model directory the compression recipes take
as their ``teacher``.

It lives in the engine, not in the demo, because it is what a user does with their own data and
checkpoint before compressing (fine-tune SegFormer on Cityscapes, RT-DETR on KITTI); it uses the
engine's own pieces — the task's data, forward path, task term and evaluation
(:mod:`distiq.train.engine_tasks`) and the training loop — so a teacher and its students are
trained and scored by the same code. The demo's teacher (the built-in edge VLM with its
grounding heads) keeps its own recipe and trainer in :mod:`distiq.demo`.

Recipe (defaults shown)::

    method: teacher
    task: segmentation           # segmentation | detection | depth (or a task section)
    output: runs/teacher-segformer
    seed: 0
    model:
      family: segformer          # segformer | rt_detr | detr | depth_anything | dpt
      image_size: 64             # the fixed input size (pixels, square)
      config: {}                 # overrides of the family's small config (hidden_sizes, ...)
      checkpoint: null           # or fine-tune this model directory (its config and processor)
    data: {scenes: ...}          # distiq.train.recipe.DataConfig (scenes, or format + splits)
    train: {steps: 300, lr: 1.0e-3, batch_size: 32, ...}   # distiq.train.TrainConfig
    eval: {batch_images: 64}

The directory gets the model (``config.json``, ``model.safetensors``, the image processor),
``recipe.yaml``, ``metrics.jsonl`` and ``results.json`` with the teacher's record (the task's
metric on the test split), which compression runs read for the retention.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from distiq.config import from_dict
from distiq.train.config import TrainConfig
from distiq.train.data_setup import prepare_scenes
from distiq.train.recipe import DataConfig, EvalConfig, read_recipe_file
from distiq.train.recipe_task import DENSE_TASKS, TaskConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseModelConfig:
    """The teacher's model: a family's small config (with overrides) at a fixed input size, or
    a checkpoint to fine-tune."""

    family: str | None = None
    image_size: int = 64
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None

    def _validate(self) -> list[str]:
        errors = []
        if (self.family is None) == (self.checkpoint is None):
            errors.append("give model.family (a small config) or model.checkpoint, one of them")
        if not 16 <= self.image_size <= 2048:
            errors.append(f"image_size must lie in [16, 2048] pixels, got {self.image_size}")
        if self.checkpoint is not None and self.config:
            errors.append("model.config overrides a family's small config, not a checkpoint")
        return errors


def _default_train() -> TrainConfig:
    return TrainConfig(steps=300, lr=1e-3, warmup_steps=20, batch_size=32)


@dataclass(frozen=True)
class DenseTeacherRecipe:
    """A dense teacher's recipe (see the module docstring)."""

    task: TaskConfig
    model: DenseModelConfig
    method: Literal["teacher"] = "teacher"
    output: Path = Path("runs/teacher")
    name: str | None = None
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_name(self) -> str:
        return self.name or self.output.name

    def _validate(self) -> list[str]:
        errors = []
        if not self.task.dense:
            errors.append(
                f"task {self.task.name}: distiq teacher trains dense models here "
                f"({', '.join(DENSE_TASKS)}); the VQA teacher is the demo's (no task key)"
            )
        if self.model.family is not None:
            from distiq.models.dense import dense_families

            families = dense_families()
            if self.model.family not in families:
                errors.append(
                    f"model.family {self.model.family!r} is unknown; dense families: "
                    f"{', '.join(sorted(families))}"
                )
            elif families[self.model.family].task != self.task.name:
                errors.append(
                    f"model.family {self.model.family} is a {families[self.model.family].task} "
                    f"model; the recipe's task is {self.task.name}"
                )
        if self.data.vqa is not None or self.data.hf is not None:
            errors.append("a dense teacher reads data.scenes or data.format + data.splits")
        return errors


def is_dense_teacher_recipe(data: Any) -> bool:
    """Whether a recipe mapping asks for a dense teacher (its ``task`` names a dense task)."""
    task = data.get("task") if isinstance(data, dict) else None
    name = task.get("name") if isinstance(task, dict) else task
    return name in DENSE_TASKS


def dense_teacher_recipe_from_dict(data: dict, *, source: str | None = None) -> DenseTeacherRecipe:
    """Build and validate a :class:`DenseTeacherRecipe` (every problem at once)."""
    return from_dict(DenseTeacherRecipe, data, source=source)


def load_dense_teacher_recipe(path: str | os.PathLike, **changes: Any) -> DenseTeacherRecipe:
    """Read a dense teacher recipe YAML file; ``changes`` replace top-level keys."""
    return dense_teacher_recipe_from_dict(read_recipe_file(path, changes), source=str(path))


def check_dense_teacher(recipe: DenseTeacherRecipe, *, overwrite: bool, resume: bool) -> None:
    """Every check that needs no long work: the checkpoint, the data, the output directory."""
    from distiq.train.engine_tasks import engine_task
    from distiq.train.runs import check_resumable, prepare_run_dir

    task = engine_task(recipe)
    if recipe.model.checkpoint is not None:
        task.check_model(recipe.model.checkpoint)
    task.check_data(recipe.data)
    output = Path(recipe.output).resolve()
    for what, path in [
        ("model.checkpoint", recipe.model.checkpoint),
        *task.data_paths(recipe.data),
    ]:
        if path is not None and (
            output == Path(path).resolve() or output in Path(path).resolve().parents
        ):
            raise ValueError(
                f"output {recipe.output} is or contains the {what} ({path}): choose another output"
            )
    prepare_run_dir(Path(recipe.output), overwrite=overwrite, resume=resume, empty=False)
    if resume:
        check_resumable(Path(recipe.output), recipe)


def _classes(recipe: DenseTeacherRecipe) -> tuple[str, ...]:
    """The train split's class names (none for depth)."""
    from distiq.train.engine_tasks.dense_data import load_records

    if recipe.task.name == "depth":
        return ()
    return tuple(load_records(recipe.task.name, recipe.data, recipe.data.train_split).classes)


def build_teacher_model(recipe: DenseTeacherRecipe) -> tuple[torch.nn.Module, Any]:
    """The model to train: the family's small config sized for the data's classes, or the
    checkpoint (whose classes must be the data's)."""
    from distiq.models import build_dense
    from distiq.train.engine_tasks import engine_task

    classes = _classes(recipe)
    if recipe.model.checkpoint is not None:
        model, adapter = engine_task(recipe).load_model(recipe.model.checkpoint)
        if classes and adapter.num_labels != len(classes):
            raise ValueError(
                f"the checkpoint {recipe.model.checkpoint} predicts {adapter.num_labels} classes "
                f"but the data has {len(classes)} ({', '.join(classes[:8])}); give it a head with "
                "one output per class of the data"
            )
        return model, adapter
    return build_dense(
        recipe.model.family,
        num_labels=max(1, len(classes)),
        image_size=recipe.model.image_size,
        class_names=classes,
        config=recipe.model.config,
        seed=recipe.seed,
    )


def train_dense_teacher(
    recipe: DenseTeacherRecipe | str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable | None = None,
    on_eval: Callable | None = None,
) -> Path:
    """Train the dense teacher of ``recipe`` (a :class:`DenseTeacherRecipe` or a YAML path)
    into ``recipe.output`` and return that directory (see the module docstring).

    Raises:
        ConfigError, FileNotFoundError, FileExistsError, ValueError: bad input, found before
            any long work.
    """
    from distiq.config import dump_yaml
    from distiq.train.distributed import launched_rank
    from distiq.train.lock import RunLock
    from distiq.train.runs import RECIPE_FILE, prepare_run_dir

    if not isinstance(recipe, DenseTeacherRecipe):
        recipe = load_dense_teacher_recipe(recipe)
    check_dense_teacher(recipe, overwrite=overwrite, resume=resume)
    prepare_scenes(recipe.data)
    run_dir = Path(recipe.output)
    with RunLock(run_dir):
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        if launched_rank() == 0:
            dump_yaml(recipe, run_dir / RECIPE_FILE)
        torch.manual_seed(recipe.seed)
        return _train(recipe, run_dir, resume, on_step, on_eval)


def _train(
    recipe: DenseTeacherRecipe,
    run_dir: Path,
    resume: bool,
    on_step: Callable | None,
    on_eval: Callable | None,
) -> Path:
    """:func:`train_dense_teacher` once the directory is locked and prepared."""
    from distiq.integrity import record_hashes
    from distiq.objective import QuantDistillObjective
    from distiq.results import ResultRecord, upsert_records
    from distiq.train.engine_tasks import engine_task
    from distiq.train.engine_tasks.dense_step import dense_step_fn
    from distiq.train.loop import train
    from distiq.train.optim import param_groups
    from distiq.train.runs import RESULTS_FILE

    started = time.perf_counter()
    task = engine_task(recipe)
    model, adapter = build_teacher_model(recipe)
    model.train()
    data = task.load_data(recipe, adapter)
    engine = task.engine_for(model, adapter, data.train)
    objective = QuantDistillObjective({"terms": {"task": {}}})
    result = train(
        engine,
        dense_step_fn(task, objective, None, model),
        data.train,
        config=recipe.train,
        run_dir=run_dir,
        eval_fn=task.validation_fn(data.val, recipe),
        collate_fn=data.train.collate,
        optimizer_params=param_groups([engine], recipe.train.weight_decay),
        resume=resume,
        overwrite=not resume,
        on_step=on_step,
        on_eval=on_eval,
    )
    model.eval()
    model.save_pretrained(run_dir)
    adapter.save_pretrained(run_dir)
    record_hashes(run_dir, sorted(p.name for p in run_dir.glob("*.safetensors")))
    evaluation = task.evaluate(task.engine_for(model, adapter, data.test), data.test, recipe)
    record = ResultRecord(
        name=recipe.run_name,
        method="teacher",
        params=sum(p.numel() for p in model.parameters()),
        task=task.name,
        metric=task.metric,
        value=evaluation.value,
        retention=1.0,
        seed=recipe.seed,
        steps=result.step,
        extra={
            **evaluation.extra,
            "family": adapter.family,
            "best_val_value": result.best_value,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    upsert_records(run_dir / RESULTS_FILE, [record])
    logger.info("teacher: %s in %.0f s", task.describe(evaluation), time.perf_counter() - started)
    return run_dir


__all__ = [
    "DenseModelConfig",
    "DenseTeacherRecipe",
    "build_teacher_model",
    "check_dense_teacher",
    "dense_teacher_recipe_from_dict",
    "is_dense_teacher_recipe",
    "load_dense_teacher_recipe",
    "train_dense_teacher",
]
