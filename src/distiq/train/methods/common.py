"""What every compression method shares: the method registry, the run context, calibration,
PTQ of selected layers, activation quantizers, and finishing a run (bake, save, evaluate).

A method is a function ``run(ctx: RunContext) -> list[ResultRecord]`` registered under its
recipe name with :func:`register_method`; :func:`distiq.train.methods.compress` looks it up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.registry import Registry
from distiq.results import ResultRecord
from distiq.train.quant_plan import QuantPlan, plan_quantization
from distiq.train.runs import bake_quantized, save_run_model

logger = logging.getLogger(__name__)

MethodFn = Callable[["RunContext"], list[ResultRecord]]
METHODS: Registry[MethodFn] = Registry("compression method")


def register_method(*names: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register a method function under each of ``names``."""

    def add(fn: MethodFn) -> MethodFn:
        for name in names:
            METHODS.register(name, fn)
        return fn

    return add


@dataclass
class RunContext:
    """What a method runs on.

    Attributes:
        recipe: the validated recipe.
        teacher / teacher_adapter: the full-precision teacher (eval mode) and its adapter.
        data: the splits (``EngineData``), prepared for the student's processing.
        student / student_adapter: the student given in memory (``distiq.compress(model=...,
            teacher=...)``), or None: the recipe's ``student`` section builds it.
        resume: continue the run from its last checkpoint.
        on_step / on_eval: progress callbacks of the training loop.
        task: the recipe's task (``distiq.train.engine_tasks.EngineTask``; built from the
            recipe when not given), which the methods ask for everything task-specific.
    """

    recipe: Any
    teacher: nn.Module
    teacher_adapter: Any
    data: Any
    student: nn.Module | None = None
    student_adapter: Any = None
    resume: bool = False
    on_step: Callable | None = None
    on_eval: Callable | None = None
    task: Any = None

    def __post_init__(self) -> None:
        if self.task is None:
            from distiq.train.engine_tasks import engine_task

            self.task = engine_task(self.recipe)

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.output)

    def build_student(self) -> tuple[nn.Module, Any]:
        """The student: the one given, or the recipe's (the task's ``build_student``)."""
        if self.student is not None:
            return self.student, self.student_adapter
        return self.task.build_student(self)


# ---------------------------------------------------------------------- calibration & PTQ
def calibration_batches(recipe: Any, data: Any) -> list[dict]:
    """Batches of ``calibration.samples`` train images (seeded, fixed).

    Raises:
        ValueError: more samples asked than the train split has images.
    """
    import numpy as np

    if recipe.calibration.samples > len(data.train):
        logger.warning(
            "calibration.samples %d > the %d train images: calibrating on all of them",
            recipe.calibration.samples,
            len(data.train),
        )
    count = min(recipe.calibration.samples, len(data.train))
    rng = np.random.default_rng(recipe.seed)
    indices = sorted(rng.choice(len(data.train), size=count, replace=False).tolist())
    size = recipe.calibration.batch_size
    return [
        data.train.collate([data.train[i] for i in indices[s : s + size]])
        for s in range(0, count, size)
    ]


def apply_ptq(
    recipe: Any, model: nn.Module, plan: QuantPlan, calib_inputs: list[dict], method: str
) -> dict[str, Any]:
    """GPTQ / RTN of the planned weights of ``model``, in place (weights replaced by their
    dequantized values). ``calib_inputs`` are Hugging Face keyword-argument batches. Returns
    ``{module name: (spec, scale, zero_point)}``."""
    from distiq.ptq import quantize_model
    from distiq.quant import QuantizedLinear
    from distiq.quant.api import resolve_specs

    config = plan.config(weights=True, activations=False)
    if not config.include:
        return {}
    reports = quantize_model(
        model,
        calib_inputs,
        config,
        method=method,
        convert=True,
        block_size=recipe.ptq.block_size,
        damp=recipe.ptq.damp,
        act_order=recipe.ptq.act_order,
        static_groups=recipe.ptq.static_groups,
    )
    # Convolutions keep their dequantized weights in place; their qparams come from the report.
    out = {
        r.name: (resolve_specs(r.name, config)[0], r.scale.clone(), r.zero_point.clone())
        for r in reports
        if r.kind == "Conv2d"
    }
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.dequantized_weight())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        model.set_submodule(name, linear)
        out[name] = (
            module.weight_spec,
            module.weight_scale.detach().clone(),
            module.weight_zero_point.detach().clone(),
        )
    return out


def add_activation_quant(model: nn.Module, plan: QuantPlan, engine: Any, calib: list) -> None:
    """Fake-quantize the inputs of the planned layers (weights left as they are) and calibrate
    the static activation quantizers on ``calib`` batches."""
    from distiq.quant import quantize_

    config = plan.config(weights=False, activations=True)
    if not config.include:
        return
    quantize_(model, config)
    calibrate(engine, calib)


@torch.no_grad()
def calibrate(engine: Any, calib: list[dict]) -> None:
    """Observe ``calib`` batches with every static activation quantizer, then freeze them."""
    from distiq.quant import calibration

    was_training = engine.training
    engine.eval()
    with calibration(engine.inner):
        for batch in calib:
            engine(batch, heads=False)
    engine.train(was_training)


def plan_for(
    recipe: Any,
    model: nn.Module,
    adapter: Any,
    *,
    calib: list[dict] | None = None,
    path: Any = None,
) -> QuantPlan:
    """The recipe's quantization section resolved on ``model``; with a size budget, each part's
    width is chosen first on the calibration batches ``calib`` (batches of the forward path
    ``path``: :mod:`distiq.train.mixed_precision`)."""
    quantization = recipe.quantization
    if quantization.budget is None:
        return plan_quantization(model, adapter, quantization)
    from distiq.train.mixed_precision import allocate, with_widths

    allocation = allocate(model, adapter, quantization, calib or [], path)
    plan = plan_quantization(model, adapter, with_widths(quantization, allocation.bits))
    plan.notes.update(
        bits_allocation=allocation.bits,
        size_budget_mb=quantization.budget.size_mb,
        estimated_mb=round(allocation.size_mb, 4),
        sensitivity=allocation.sensitivity,
    )
    return plan


# ---------------------------------------------------------------------- records & finishing
def record_of(
    recipe: Any, model: nn.Module, evaluation: Any, *, steps: int | None, task: Any
) -> ResultRecord:
    """The run's result record from its test evaluation (``TaskEvaluation``) by ``task`` (the
    run's ``EngineTask``: the record's task and metric)."""
    quant = recipe.quantization
    return ResultRecord(
        name=recipe.run_name,
        method=recipe.method,
        w_bits=quant.w_bits if quant is not None else 16,
        a_bits=quant.a_bits if quant is not None else 16,
        group_size=quant.group_size if quant is not None else None,
        params=sum(p.numel() for p in model.parameters()),
        task=task.name,
        metric=task.metric,
        value=evaluation.value,
        seed=recipe.seed,
        steps=steps,
        extra=dict(evaluation.extra),
    )


PREDICTIONS_FILE = "predictions.jsonl"


def write_predictions(run_dir: Path, rows: list[dict]) -> Path:
    """``run_dir/predictions.jsonl``: each test item's result (a question's answer and score, by
    question id; an image's IoU or depth errors, by image id), one JSON object a line, so two
    runs can be compared item by item."""
    import json

    from distiq.config import atomic_write

    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    return atomic_write(Path(run_dir) / PREDICTIONS_FILE, text)


def finish(
    ctx: RunContext,
    model: nn.Module,
    adapter: Any,
    *,
    ptq: dict[str, Any] | None,
    steps: int | None,
    plan: QuantPlan | None = None,
    extra: dict | None = None,
) -> list[ResultRecord]:
    """Bake, save and evaluate the student on the test split; returns its result record."""
    from distiq.config import to_dict

    recipe = ctx.recipe
    manifest = bake_quantized(model, method=recipe.method)
    for name, (spec, scale, zero) in (ptq or {}).items():
        kind = "Conv2d" if isinstance(model.get_submodule(name), nn.Conv2d) else "Linear"
        entry = manifest["modules"].setdefault(name, {"type": kind, "activation": None})
        entry.update(weight=to_dict(spec), weights_from=recipe.method)
        manifest["state"][f"{name}.weight_scale"] = scale
        manifest["state"][f"{name}.weight_zero_point"] = zero
    if plan is not None:
        manifest["skipped"] = plan.summary()["skipped"]
        extra = {**plan.notes, **(extra or {})}
    save_run_model(ctx.run_dir, model, adapter, manifest)
    engine = ctx.task.engine_for(model, adapter, ctx.data.test).eval()
    evaluation = ctx.task.evaluate(engine, ctx.data.test, recipe)
    write_predictions(ctx.run_dir, evaluation.items)
    record = record_of(recipe, model, evaluation, steps=steps, task=ctx.task)
    record = record.replace(extra={**record.extra, **(extra or {})})
    logger.info("%s: %s", recipe.run_name, ctx.task.describe(evaluation))
    return [record]
