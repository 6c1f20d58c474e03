"""``qat``, ``kd`` and ``qad``: the student trained with the training loop.

- ``qat`` — a fake-quantized student trained with the task loss only.
- ``kd`` — a smaller full-precision student distilled from the teacher (task + kd terms).
- ``qad`` — a fake-quantized student trained with the whole objective (``distiq.objective``):
  optionally initialised by GPTQ / RTN (``init``), optionally EfQAT-style selective
  (``selective``: only quantizer parameters and the most sensitive layers train).

The student is a copy of the teacher, a copy with layers dropped, a smaller checkpoint or a
built-in preset (``recipe.student``); the teacher runs beside it, from a cache of its outputs
(``teacher.cache``), or on its own batches when its processing differs (the task's
``teacher_side``). The recipe's task (:mod:`distiq.train.engine_tasks`) gives the forward path,
the step and the validation metric, which picks the best checkpoint.
"""

from __future__ import annotations

import logging

from distiq.results import ResultRecord
from distiq.train.methods.common import (
    RunContext,
    apply_ptq,
    calibrate,
    calibration_batches,
    finish,
    plan_for,
    register_method,
)

logger = logging.getLogger(__name__)


@register_method("qat", "kd", "qad")
def run_trained(ctx: RunContext) -> list[ResultRecord]:
    from distiq.objective import QuantDistillObjective
    from distiq.quant import quantize_
    from distiq.train.loop import train
    from distiq.train.optim import param_groups

    recipe, data, task = ctx.recipe, ctx.data, ctx.task
    student, student_adapter = ctx.build_student()
    engine = task.engine_for(student, student_adapter, data.train)
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
    side = task.teacher_side(ctx, student_adapter)
    objective = QuantDistillObjective(task.objective_config(ctx, student, student_adapter))
    objective.attach(student=student, teacher=ctx.teacher)
    selected = None
    if recipe.selective is not None:
        from distiq.train.selective import apply_selective

        selected = apply_selective(engine, calib, recipe.selective, data=data)
    step_fn = task.step_fn(objective, side, student, student_adapter, ctx)
    result = train(
        engine,
        step_fn,
        data.train,
        config=recipe.train,
        run_dir=recipe.output,
        eval_fn=task.validation_fn(data.val, recipe),
        collate_fn=data.train.collate,
        optimizer_params=param_groups([engine, objective], recipe.train.weight_decay),
        stateful={"objective": objective},
        resume=ctx.resume,
        overwrite=not ctx.resume,
        on_step=ctx.on_step,
        on_eval=ctx.on_eval,
    )
    objective.remove_hooks()
    extra = {task.best_key: result.best_value, "best_step": result.best_step}
    if selected is not None:
        extra["selective_layers"] = selected
    student.eval()
    return finish(
        ctx, student, student_adapter, ptq=None, steps=result.step, plan=plan, extra=extra
    )
