"""``qat``, ``kd`` and ``qad``: the student trained with the training loop.

- ``qat`` — a fake-quantized student trained with the task loss only.
- ``kd`` — a smaller full-precision student distilled from the teacher (task + kd terms).
- ``qad`` — a fake-quantized student trained with the whole objective (``distiq.objective``):
  optionally initialised by GPTQ / RTN (``init``), optionally EfQAT-style selective
  (``selective``: only quantizer parameters and the most sensitive layers train).

The student is a copy of the teacher, a copy with layers dropped, a smaller checkpoint or a
built-in preset (``recipe.student``); the teacher runs beside it, from a cache of its outputs
(``teacher.cache``), or on its own batches when its processing differs
(:class:`distiq.train.student.TeacherSide`). Validation accuracy picks the best checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from distiq.results import ResultRecord
from distiq.train.engines import GenericEngine, engine_for, evaluate_vqa
from distiq.train.methods.common import (
    RunContext,
    apply_ptq,
    calibrate,
    calibration_batches,
    finish,
    plan_for,
    register_method,
)
from distiq.train.student import TeacherSide

logger = logging.getLogger(__name__)


def teacher_side(ctx: RunContext, student_adapter: Any) -> TeacherSide:
    """The teacher's side of the steps (see :class:`TeacherSide`); builds the teacher cache
    when the recipe asks for one."""
    from distiq.train.modeling import same_processing
    from distiq.train.teacher_outputs import processing_view

    recipe, data = ctx.recipe, ctx.data
    teacher = ctx.teacher
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    if same_processing(student_adapter, ctx.teacher_adapter):
        engine = engine_for(teacher, ctx.teacher_adapter, data.train.path)
        collate = None
    else:
        if {"feat", "attn"} & set(recipe.objective.terms.active()):
            raise ValueError(
                "the feat / attn terms compare hidden states position by position, which needs "
                "teacher and student to see the same tokens (the same processing); this teacher "
                "and student process images and prompts differently"
            )
        engine = GenericEngine(teacher, ctx.teacher_adapter)
        view = processing_view(data.train, ctx.teacher_adapter)

        def collate(items: list) -> dict:
            return GenericEngine.collate(view, items)

    if recipe.teacher.cache is None:
        return TeacherSide(engine=engine, collate=collate)
    return TeacherSide(cache=_cache(ctx, engine, collate))


def _cache(ctx: RunContext, engine: Any, collate: Any) -> Any:
    """The teacher cache of the images this run visits (built or reused)."""
    from distiq.train.teacher_outputs import (
        build_teacher_cache,
        teacher_fingerprint,
        visited_images,
    )

    recipe, train = ctx.recipe, ctx.data.train
    indices = visited_images(train, recipe.train)
    question_ids = [int(train.questions[r]["question_id"]) for i in indices for r in train.rows[i]]
    kd = recipe.objective.terms.kd
    settings = f"{type(ctx.teacher_adapter).__name__}:{kd.temperature}"
    fingerprint = teacher_fingerprint(recipe.teacher.path, question_ids, settings)
    return build_teacher_cache(
        engine,
        train,
        indices,
        recipe.teacher.cache.path,
        top_k=recipe.teacher.cache.top_k,
        temperature=kd.temperature,
        batch_images=recipe.eval.batch_images,
        fingerprint=fingerprint,
        collate=collate or train.collate,
    )


@register_method("qat", "kd", "qad")
def run_trained(ctx: RunContext) -> list[ResultRecord]:
    from distiq.objective import QuantDistillObjective
    from distiq.quant import quantize_
    from distiq.train.loop import train
    from distiq.train.objective_layers import resolve_layer_names
    from distiq.train.optim import param_groups
    from distiq.train.student import student_step_fn

    recipe, data = ctx.recipe, ctx.data
    student, student_adapter = ctx.build_student()
    engine = engine_for(student, student_adapter, data.train.path)
    calib = calibration_batches(recipe, data) if recipe.quantization is not None else []
    plan = None
    if recipe.quantization is not None:
        plan = plan_for(recipe, student, student_adapter, calib=calib, path=data.train.path)
        if recipe.init != "none":
            student.eval()
            inputs = [engine.model_inputs(b) for b in calib]
            apply_ptq(recipe, student, plan, inputs, recipe.init)
        quantize_(student, plan.config(weights=True, activations=True))
        calibrate(engine, calib)
    side = teacher_side(ctx, student_adapter)
    config = resolve_layer_names(
        recipe.objective, student, student_adapter, ctx.teacher, ctx.teacher_adapter
    )
    objective = QuantDistillObjective(config)
    objective.attach(student=student, teacher=ctx.teacher)
    selected = None
    if recipe.selective is not None:
        from distiq.train.selective import apply_selective

        selected = apply_selective(engine, calib, recipe.selective, data=data)
    step_fn = student_step_fn(objective, side, student)

    def eval_fn(module: Any) -> dict[str, float]:
        metrics = evaluate_vqa(module, data.val, max_new_tokens=recipe.eval.max_new_tokens)
        return {"vqa_accuracy": 100.0 * metrics["vqa_accuracy"]}

    result = train(
        engine,
        step_fn,
        data.train,
        config=recipe.train,
        run_dir=recipe.output,
        eval_fn=eval_fn,
        collate_fn=data.train.collate,
        optimizer_params=param_groups([engine, objective], recipe.train.weight_decay),
        stateful={"objective": objective},
        resume=ctx.resume,
        overwrite=not ctx.resume,
        on_step=ctx.on_step,
        on_eval=ctx.on_eval,
    )
    objective.remove_hooks()
    extra = {"best_val_accuracy": result.best_value, "best_step": result.best_step}
    if selected is not None:
        extra["selective_layers"] = selected
    student.eval()
    return finish(
        ctx, student, student_adapter, ptq=None, steps=result.step, plan=plan, extra=extra
    )
