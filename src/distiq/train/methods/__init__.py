"""``compress(recipe) -> run dir`` and ``evaluate(run_dir)``: every method of the engine.

Methods (``recipe.method``), each a function registered by name
(:func:`distiq.train.methods.common.register_method`):

- ``rtn`` / ``gptq`` (:mod:`.ptq`) — post-training weight quantization of a copy of the
  teacher, then activation quantizers calibrated on the same images.
- ``qat`` / ``kd`` / ``qad`` (:mod:`.trained`) — a student trained with the task loss, the
  distillation objective, or the whole objective on a fake-quantized student.
- ``qlora-kd`` (:mod:`.qlora`) — QLoRA (NF4 base + LoRA) trained with the distillation
  objective, then merged and re-quantized.

Every trained method uses the same data order (``train.seed``), steps and batch size from its
recipe. Each run directory is laid out as :mod:`distiq.train.runs` describes; ``results.json``
holds a ``distiq.results.ResultRecord`` with the test accuracy (per question type in
``extra["by_question_type"]``) and the retention against the teacher's accuracy.

Example::

    from distiq.train import compress, evaluate, load_recipe
    run_dir = compress(load_recipe("recipes/qad-w4a8.yaml", output="runs/qad-w4a8"))
    records = evaluate(run_dir)           # re-evaluate a run directory (test split)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.config import dump_yaml
from distiq.results import ResultRecord, read_records, upsert_records
from distiq.train.data_setup import EngineData, prepare_scenes
from distiq.train.distributed import launched_rank
from distiq.train.engine_tasks import engine_task
from distiq.train.lock import RunLock
from distiq.train.methods import ptq, qlora, trained  # noqa: F401  (register the methods)
from distiq.train.methods.common import (
    METHODS,
    RunContext,
    record_of,
    write_predictions,
)
from distiq.train.recipe import Recipe, load_recipe
from distiq.train.runs import (
    RECIPE_FILE,
    RESULTS_FILE,
    check_resumable,
    load_compressed,
    prepare_run_dir,
)

logger = logging.getLogger(__name__)


def check_recipe(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> None:
    """Every check that needs no long work, changing nothing: teacher (and student) directory,
    data, output directory (apart from the teacher, student and data; refused if it holds a
    run unless ``overwrite`` / ``resume``, or if another process is using it; writable;
    resuming needs the same recipe)."""
    if recipe.teacher.path is None:
        raise ValueError(
            f"method {recipe.method} needs teacher: the teacher's model directory (or a teacher "
            "in memory: distiq.compress(model=..., teacher=...))"
        )
    task = engine_task(recipe)
    task.check_model(recipe.teacher.path)
    if recipe.student.init == "checkpoint":
        task.check_model(recipe.student.path)
    task.check_data(recipe.data)
    _check_output_apart(recipe)
    prepare_run_dir(Path(recipe.output), overwrite=overwrite, resume=resume, empty=False)
    if resume:
        check_resumable(Path(recipe.output), recipe)


def _check_output_apart(recipe: Recipe) -> None:
    """The output must not be, nor contain, the teacher, the student or the data (``--overwrite``
    would delete them)."""
    output = Path(recipe.output).resolve()
    inputs = [
        ("teacher", recipe.teacher.path),
        ("student", recipe.student.path),
        ("teacher cache", recipe.teacher.cache.path if recipe.teacher.cache else None),
        *engine_task(recipe).data_paths(recipe.data),
    ]
    for what, path in inputs:
        if path is None:
            continue
        resolved = Path(path).resolve()
        if output == resolved or output in resolved.parents:
            raise ValueError(
                f"output {recipe.output} is or contains the {what} ({path}): a run there would "
                "replace it; choose another output"
            )


def run_data(recipe: Recipe) -> EngineData:
    """The splits ``compress(recipe)`` trains and evaluates on, prepared for the student's
    processing (the teacher's, unless the student is a checkpoint of its own), read without
    loading any weights — so that several runs on the same data and teacher can share one
    copy: ``compress(recipe, data=run_data(recipe))``."""
    task = engine_task(recipe)
    task.check_data(recipe.data)
    source = recipe.student.path if recipe.student.init == "checkpoint" else recipe.teacher.path
    return task.load_data(recipe, task.load_adapter(source))


def compress(
    recipe: Recipe | str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable | None = None,
    on_eval: Callable | None = None,
    data: EngineData | None = None,
    teacher: tuple[nn.Module, Any] | None = None,
    student: tuple[nn.Module, Any] | None = None,
) -> Path:
    """Run ``recipe`` (a :class:`Recipe` or a YAML path) and return its run directory.

    Args:
        overwrite: replace a previous run in ``recipe.output``.
        resume: continue a killed trained run from its last checkpoint.
        on_step / on_eval: progress callbacks of the training loop (``StepInfo``;
            ``(step, metrics)``), e.g. for a progress bar.
        data: the recipe's splits loaded already (:func:`run_data`); by default they are read
            here.
        teacher / student: ``(model, adapter)`` pairs held in memory, instead of the recipe's
            teacher directory and student section.
    Raises:
        ConfigError, FileNotFoundError, FileExistsError, PermissionError: bad input, found
            before any long work.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if teacher is None:
        check_recipe(recipe, overwrite=overwrite, resume=resume)
    else:
        if data is None:
            engine_task(recipe).check_data(recipe.data)
        _check_output_apart(recipe)
    if data is None:
        prepare_scenes(recipe.data)
    run_dir = Path(recipe.output)
    with RunLock(run_dir):
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        if resume:
            check_resumable(run_dir, recipe)
        if launched_rank() == 0:  # data-parallel: one process writes the run directory
            dump_yaml(recipe, run_dir / RECIPE_FILE)
        return _compress(recipe, run_dir, resume, on_step, on_eval, data, teacher, student)


def _compress(recipe, run_dir, resume, on_step, on_eval, data, teacher, student) -> Path:
    """:func:`compress` once the run directory is locked and prepared."""
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    task = engine_task(recipe)
    teacher_model, teacher_adapter = teacher or task.load_model(recipe.teacher.path)
    if data is None:
        data = run_data(recipe) if student is None else task.load_data(recipe, student[1])
    if not recipe.data.labels:
        from distiq.train.pseudo_labels import teacher_labelled

        data = teacher_labelled(recipe, data, teacher_model, teacher_adapter)
    ctx = RunContext(
        recipe,
        teacher_model,
        teacher_adapter,
        data,
        student=student[0] if student else None,
        student_adapter=student[1] if student else None,
        resume=resume,
        on_step=on_step,
        on_eval=on_eval,
    )
    teacher_value = teacher_accuracy(ctx)
    records = METHODS.get(recipe.method)(ctx)
    seconds = time.perf_counter() - started
    final = []
    for record in records:
        extra = {**record.extra, "seconds": round(seconds, 1), "teacher_value": teacher_value}
        retention = record.value / teacher_value if teacher_value else None
        final.append(record.replace(retention=retention, extra=extra))
    upsert_records(run_dir / RESULTS_FILE, final)
    return run_dir


def teacher_accuracy(ctx: RunContext) -> float | None:
    """The teacher's test value (%, the task's metric): from its directory's ``results.json``
    when it holds a teacher record for the same test split, else measured now on the run's test
    split (``eval.teacher``; None when that is off)."""
    recipe, task = ctx.recipe, ctx.task
    path = recipe.teacher.path
    if path is not None:
        value = task.teacher_record_value(read_records(Path(path) / RESULTS_FILE), ctx.data.test)
        if value is not None:
            return value
    if not recipe.eval.teacher:
        return None
    test = ctx.data.test.for_adapter(ctx.teacher_adapter)
    engine = task.engine_for(ctx.teacher, ctx.teacher_adapter, test).eval()
    evaluation = task.evaluate(engine, test, recipe)
    logger.info("teacher: %s (measured for the retention)", task.describe(evaluation))
    return evaluation.value


def evaluate(
    run_dir: str | Path,
    *,
    test_questions: int | None = -1,
    recipe: Recipe | str | Path | None = None,
    out: str | Path | None = None,
) -> list[ResultRecord]:
    """Evaluate a run directory — or any model directory (a Hugging Face checkpoint, scored
    as a teacher) — on a recipe's test split and return its record.

    Args:
        run_dir: a run directory (its own ``recipe.yaml`` names the data) or a model directory.
        test_questions: -1 keeps the recipe's limit, None evaluates all, N about N questions.
        recipe: the recipe whose data to use (required for a model directory without one).
        out: where ``results.json`` is updated (default: the run directory; a model directory
            without ``recipe.yaml`` is never written to: give ``out`` to keep the record).
    """
    run_dir = Path(run_dir)
    own_recipe = (run_dir / RECIPE_FILE).is_file()
    if recipe is None:
        if not own_recipe:
            raise ValueError(
                f"{run_dir} holds no recipe.yaml (not a distiq run); name the data with a recipe "
                "(--recipe RECIPE, recipe= in Python)"
            )
        recipe = run_dir / RECIPE_FILE
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    task = engine_task(recipe)
    if test_questions != -1:
        limit = "test_images" if recipe.task.dense else "test_questions"
        recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, **{limit: test_questions})
        )
    if own_recipe:
        model, adapter, _ = load_compressed(run_dir)
    else:
        model, adapter = task.load_model(run_dir)
    task.check_data(recipe.data)
    test = task.load_test(recipe, adapter)
    evaluation = task.evaluate(task.engine_for(model, adapter, test), test, recipe)
    target = Path(out) if out is not None else (run_dir if own_recipe else None)
    old = {r.name: r for r in read_records(target / RESULTS_FILE)} if target else {}
    if own_recipe:
        name = recipe.run_name
        base = old.get(name) or record_of(recipe, model, evaluation, steps=None, task=task)
    else:
        name = run_dir.name
        base = old.get(name) or ResultRecord(
            name=name,
            method="teacher",
            params=sum(p.numel() for p in model.parameters()),
            task=task.name,
            metric=task.metric,
            value=0.0,
            retention=1.0,
        )
    record = base.replace(value=evaluation.value, extra={**base.extra, **evaluation.extra})
    teacher_value = record.extra.get("teacher_value")
    if record.method == "teacher":
        record = record.replace(retention=1.0)
    elif teacher_value:
        record = record.replace(retention=record.value / teacher_value)
    if target is None:
        return [record]
    write_predictions(target, evaluation.items)
    return upsert_records(target / RESULTS_FILE, [record])


__all__ = ["METHODS", "check_recipe", "compress", "evaluate", "run_data", "teacher_accuracy"]
