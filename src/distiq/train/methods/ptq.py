"""``rtn`` / ``gptq``: post-training weight quantization of a copy of the teacher
(``distiq.ptq.quantize_model`` on calibration images from the train split), then activation
quantizers (static ones calibrated on the same images)."""

from __future__ import annotations

import time

from distiq.results import ResultRecord
from distiq.train.methods.common import (
    RunContext,
    add_activation_quant,
    apply_ptq,
    calibration_batches,
    finish,
    plan_for,
    register_method,
)


@register_method("rtn", "gptq")
def run_ptq(ctx: RunContext) -> list[ResultRecord]:
    recipe = ctx.recipe
    student, adapter = ctx.build_student()
    student.eval()
    calib = calibration_batches(recipe, ctx.data)
    plan = plan_for(recipe, student, adapter, calib=calib, path=ctx.data.train.path)
    engine = ctx.task.engine_for(student, adapter, ctx.data.train)
    started = time.perf_counter()
    ptq = apply_ptq(recipe, student, plan, [engine.model_inputs(b) for b in calib], recipe.method)
    add_activation_quant(student, plan, engine, calib)
    seconds = time.perf_counter() - started
    return finish(
        ctx,
        student,
        adapter,
        ptq=ptq,
        steps=0,
        plan=plan,
        extra={"ptq_seconds": round(seconds, 1)},
    )
