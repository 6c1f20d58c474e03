"""``compress(recipe) -> run dir`` and ``evaluate(run_dir)``: every method of the engine.

Methods (``recipe.method``):

- ``teacher`` — train the built-in edge VLM teacher (:mod:`distiq.train.teacher`).
- ``rtn`` / ``gptq`` — post-training weight quantization of a copy of the teacher
  (``distiq.ptq.quantize_model``, calibration images from the train split), then activation
  quantizers (static ones calibrated on the same images).
- ``qat`` — fake-quantized copy of the teacher trained with the task loss only.
- ``kd`` — a smaller full-precision student distilled from the teacher (task + kd terms).
- ``qad`` — fake-quantized student trained with the whole objective (``distiq.objective``):
  optionally initialised by GPTQ/RTN (``init``), optionally EfQAT-style selective
  (``selective``: only quantizer parameters and the most sensitive layers train).
- ``qlora-kd`` — QLoRA (NF4 + double-quant base through transformers' BitsAndBytesConfig,
  peft LoRA on every linear layer but ``lm_head``) trained with the distillation objective;
  the adapters are then merged and the result re-quantized (:mod:`distiq.train.qlora`).

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

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.config import dump_yaml
from distiq.results import ResultRecord, read_records, upsert_records
from distiq.train.data_setup import EngineData, check_data, load_data
from distiq.train.distributed import launched_rank
from distiq.train.modeling import build_student, load_vlm, part_quant_configs, resolve_model_dir
from distiq.train.recipe import Recipe, load_recipe
from distiq.train.runs import (
    RECIPE_FILE,
    RESULTS_FILE,
    bake_quantized,
    load_compressed,
    prepare_run_dir,
    save_run_model,
)
from distiq.train.vlm import EngineModel, evaluate_vqa

logger = logging.getLogger(__name__)


def check_recipe(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> None:
    """Every check that needs no long work: teacher directory, data, output directory
    (refused if it holds a run unless ``overwrite`` / ``resume``; must be writable)."""
    if recipe.method != "teacher":
        resolve_model_dir(recipe.teacher.path)
    check_data(recipe.data)
    prepare_run_dir(Path(recipe.output), overwrite=overwrite, resume=resume)


def compress(
    recipe: Recipe | str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable | None = None,
    on_eval: Callable | None = None,
    data: EngineData | None = None,
) -> Path:
    """Run ``recipe`` (a :class:`Recipe` or a YAML path) and return its run directory.

    Args:
        overwrite: replace a previous run in ``recipe.output``.
        resume: continue a killed trained run from its last checkpoint.
        on_step / on_eval: progress callbacks of the training loop (``StepInfo``;
            ``(step, metrics)``), e.g. for a progress bar.
        data: the recipe's splits loaded already (``load_teacher_data(recipe)``, for runs that
            share data and teacher; for ``teacher``: ``load_teacher_training_data(recipe)``);
            by default they are read here.
    Raises:
        ConfigError, FileNotFoundError, FileExistsError, PermissionError: bad input, found
            before any long work.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    check_recipe(recipe, overwrite=overwrite, resume=resume)
    if recipe.method == "teacher" and data is not None:
        from distiq.train.teacher import check_teacher_data

        check_teacher_data(recipe, data)  # before the run directory is touched
    run_dir = Path(recipe.output)
    if launched_rank() == 0:  # data-parallel: one process writes the run directory
        dump_yaml(recipe, run_dir / RECIPE_FILE)
    torch.manual_seed(recipe.seed)
    if recipe.method == "teacher":
        from distiq.train.teacher import train_teacher

        return train_teacher(
            recipe,
            overwrite=not resume,
            resume=resume,
            on_step=on_step,
            on_eval=on_eval,
            data=data,
        )
    started = time.perf_counter()
    teacher, adapter = load_vlm(recipe.teacher.path)
    teacher_value = _teacher_accuracy(recipe.teacher.path)
    if data is None:
        data = load_data(recipe, adapter)
    if recipe.method == "qlora-kd":
        from distiq.train.qlora import run_qlora_kd

        records = run_qlora_kd(recipe, teacher, adapter, data, resume=resume, on_step=on_step)
    elif recipe.method in ("rtn", "gptq"):
        records = _run_ptq(recipe, teacher, adapter, data)
    else:
        records = _run_trained(recipe, teacher, adapter, data, resume, on_step, on_eval)
    seconds = time.perf_counter() - started
    final = []
    for record in records:
        extra = {**record.extra, "seconds": round(seconds, 1), "teacher_value": teacher_value}
        retention = record.value / teacher_value if teacher_value else None
        final.append(record.replace(retention=retention, extra=extra))
    upsert_records(run_dir / RESULTS_FILE, final)
    return run_dir


def evaluate(run_dir: str | Path, *, test_questions: int | None = -1) -> list[ResultRecord]:
    """Re-evaluate a run directory on its recipe's test split (``test_questions``: -1 keeps the
    recipe's limit, None evaluates all) and update its ``results.json``; returns the records."""
    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if test_questions != -1:
        import dataclasses

        recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, test_questions=test_questions)
        )
    model, adapter, _ = load_compressed(run_dir)
    from distiq.train.data_setup import load_split

    test = load_split(recipe.data, recipe.data.test_split, adapter).limit_questions(
        recipe.data.test_questions
    )
    metrics = evaluate_vqa(EngineModel(model), test, max_new_tokens=recipe.eval.max_new_tokens)
    old = {r.name: r for r in read_records(run_dir / RESULTS_FILE)}
    name = recipe.run_name
    base = old.get(name) or _record(recipe, model, metrics, steps=None)
    record = base.replace(
        value=100.0 * metrics["vqa_accuracy"],
        extra={**base.extra, **_extra(metrics)},
    )
    teacher_value = record.extra.get("teacher_value")
    if teacher_value:
        record = record.replace(retention=record.value / teacher_value)
    return upsert_records(run_dir / RESULTS_FILE, [record])


# ---------------------------------------------------------------------- helpers
def _teacher_accuracy(path: Path | None) -> float | None:
    """The teacher's test accuracy from its ``results.json`` (None when it has none)."""
    if path is None:
        return None
    records = [r for r in read_records(Path(path) / RESULTS_FILE) if r.method == "teacher"]
    return records[0].value if records else None


def _extra(metrics: dict[str, float]) -> dict[str, Any]:
    prefix = "vqa_accuracy/question_type/"
    return {
        "by_question_type": {
            k[len(prefix) :]: 100.0 * v for k, v in metrics.items() if k.startswith(prefix)
        },
        "num_questions": int(metrics["num_questions"]),
    }


def _record(recipe: Recipe, model: nn.Module, metrics: dict, *, steps: int | None) -> ResultRecord:
    quant = recipe.quantization
    return ResultRecord(
        name=recipe.run_name,
        method=recipe.method,
        w_bits=quant.w_bits if quant is not None else 16,
        a_bits=quant.a_bits if quant is not None else 16,
        group_size=quant.group_size if quant is not None else None,
        params=sum(p.numel() for p in model.parameters()),
        value=100.0 * metrics["vqa_accuracy"],
        seed=recipe.seed,
        steps=steps,
        extra=_extra(metrics),
    )


def calibration_batches(recipe: Recipe, data: EngineData) -> list[dict]:
    """Engine batches of ``calibration.samples`` train images (seeded, fixed)."""
    import numpy as np

    count = min(recipe.calibration.samples, len(data.train))
    rng = np.random.default_rng(recipe.seed)
    indices = sorted(rng.choice(len(data.train), size=count, replace=False).tolist())
    size = recipe.calibration.batch_size
    return [
        data.train.collate([data.train[i] for i in indices[s : s + size]])
        for s in range(0, count, size)
    ]


def hf_calibration_batches(batches: list[dict], data: EngineData, adapter: Any) -> list[dict]:
    """The same calibration questions as plain ``model(**kwargs)`` inputs (``input_ids``,
    ``attention_mask``, ``pixel_values``), for ``distiq.ptq.quantize_model``."""
    out = []
    for batch in batches:
        input_ids = torch.cat(
            [batch["prefix_ids"].expand(batch["suffix_ids"].shape[0], -1), batch["suffix_ids"]],
            dim=1,
        )
        mask = torch.cat(
            [
                torch.ones_like(batch["prefix_ids"]).expand(input_ids.shape[0], -1),
                batch["suffix_mask"],
            ],
            dim=1,
        )
        out.append(
            {
                "input_ids": input_ids,
                "attention_mask": mask,
                "pixel_values": batch["pixel_values"][batch["question_image"]],
            }
        )
    return out


def merged_quant_config(
    configs: dict[str, Any], model: nn.Module, *, weights: bool, activations: bool
) -> Any:
    """One ``QuantConfig`` for every part of ``configs`` (``{part: QuantConfig}``) on
    ``model``: each linear / conv layer gets the specs of the first part that selects it
    (weights and/or activations kept). Parts exclude by name within themselves only — the
    vision part's embeddings are still the ``patch_embedding`` part's, Qwen2-VL's merger
    (inside the vision tower) still the projector's — so the merged config names the layers
    one by one."""
    from distiq.config import to_dict
    from distiq.quant import QuantConfig

    changes = {}
    for part, config in configs.items():
        changes[part] = {
            "weight": to_dict(config.weight) if weights and config.weight is not None else None,
            "activation": (
                to_dict(config.activation)
                if activations and config.activation is not None
                else None
            ),
        }
    overrides = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        part = next((p for p, c in configs.items() if c.selects(name)), None)
        if part is None:
            continue
        change = changes[part]
        if change["weight"] is not None or change["activation"] is not None:
            overrides[name] = change
    return QuantConfig(weight=None, activation=None, include=tuple(overrides), overrides=overrides)


def apply_ptq(
    recipe: Recipe, model: nn.Module, configs: dict, calib: list[dict], method: str
) -> dict[str, Any]:
    """GPTQ / RTN of the selected weights of ``model``, in place (weights replaced by their
    dequantized values). Returns ``{module name: (spec, scale, zero_point)}``."""
    from distiq.ptq import quantize_model
    from distiq.quant import QuantizedLinear
    from distiq.quant.api import resolve_specs

    config = merged_quant_config(configs, model, weights=True, activations=False)
    if not config.include:
        return {}
    reports = quantize_model(
        model,
        calib,
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
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        out[name] = (
            module.weight_spec,
            module.weight_scale.detach().clone(),
            module.weight_zero_point.detach().clone(),
        )
    return out


def add_activation_quant(model: nn.Module, configs: dict, engine: EngineModel, calib: list) -> None:
    """Fake-quantize the inputs of the selected layers (weights left as they are) and calibrate
    the static activation quantizers on ``calib`` engine batches."""
    from distiq.quant import quantize_

    config = merged_quant_config(configs, model, weights=False, activations=True)
    if not config.include:
        return
    quantize_(model, config)
    calibrate(engine, calib)


@torch.no_grad()
def calibrate(engine: EngineModel, calib: list[dict]) -> None:
    """Observe ``calib`` batches with every static activation quantizer, then freeze them."""
    from distiq.quant import calibration

    was_training = engine.training
    engine.eval()
    with calibration(engine.inner):
        for batch in calib:
            engine(batch, heads=False)
    engine.train(was_training)


def _finish(
    recipe: Recipe,
    model: nn.Module,
    adapter: Any,
    data: EngineData,
    *,
    ptq: dict[str, Any] | None,
    steps: int | None,
    extra: dict | None = None,
) -> list[ResultRecord]:
    """Bake, save and evaluate the student; returns its result record."""
    manifest = bake_quantized(model, method=recipe.method)
    for name, (spec, scale, zero) in (ptq or {}).items():
        from distiq.config import to_dict

        kind = "Conv2d" if isinstance(model.get_submodule(name), nn.Conv2d) else "Linear"
        entry = manifest["modules"].setdefault(name, {"type": kind, "activation": None})
        entry.update(weight=to_dict(spec), weights_from=recipe.method)
        manifest["state"][f"{name}.weight_scale"] = scale
        manifest["state"][f"{name}.weight_zero_point"] = zero
    run_dir = Path(recipe.output)
    save_run_model(run_dir, model, adapter, manifest)
    engine = EngineModel(model).eval()
    metrics = evaluate_vqa(
        engine,
        data.test,
        max_new_tokens=recipe.eval.max_new_tokens,
        batch_images=recipe.eval.batch_images,
    )
    record = _record(recipe, model, metrics, steps=steps)
    record = record.replace(
        extra={**record.extra, "blind_baseline": data.blind_baseline, **(extra or {})}
    )
    logger.info("%s: test VQA accuracy %.2f %%", recipe.run_name, record.value)
    return [record]


def _run_ptq(recipe: Recipe, teacher: nn.Module, adapter: Any, data: EngineData) -> list:
    student = build_student(teacher, adapter, recipe.student, seed=recipe.seed)[0]
    student.eval()
    configs = part_quant_configs(recipe.quantization, student, adapter)
    calib = calibration_batches(recipe, data)
    started = time.perf_counter()
    ptq = apply_ptq(
        recipe, student, configs, hf_calibration_batches(calib, data, adapter), recipe.method
    )
    engine = EngineModel(student)
    add_activation_quant(student, configs, engine, calib)
    seconds = time.perf_counter() - started
    return _finish(
        recipe, student, adapter, data, ptq=ptq, steps=0, extra={"ptq_seconds": round(seconds, 1)}
    )


def _run_trained(
    recipe: Recipe,
    teacher: nn.Module,
    adapter: Any,
    data: EngineData,
    resume: bool,
    on_step: Callable | None,
    on_eval: Callable | None,
) -> list[ResultRecord]:
    from distiq.objective import QuantDistillObjective
    from distiq.quant import quantize_
    from distiq.train.loop import train
    from distiq.train.student import param_groups, student_step_fn

    student, student_adapter = build_student(teacher, adapter, recipe.student, seed=recipe.seed)
    engine = EngineModel(student)
    calib = calibration_batches(recipe, data) if recipe.quantization is not None else []
    ptq = None
    if recipe.quantization is not None:
        configs = part_quant_configs(recipe.quantization, student, student_adapter)
        if recipe.init != "none":
            student.eval()
            apply_ptq(
                recipe, student, configs, hf_calibration_batches(calib, data, adapter), recipe.init
            )
        quantize_(student, merged_quant_config(configs, student, weights=True, activations=True))
        calibrate(engine, calib)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    teacher_engine = EngineModel(teacher)
    objective = QuantDistillObjective(recipe.objective)
    objective.attach(student=student, teacher=teacher)
    selected = None
    if recipe.selective is not None:
        from distiq.train.selective import apply_selective

        selected = apply_selective(
            engine, teacher_engine, calib, recipe.selective, data=data, seed=recipe.seed
        )
    step_fn = student_step_fn(objective, teacher_engine, student)

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
        resume=resume,
        overwrite=not resume,
        on_step=on_step,
        on_eval=on_eval,
    )
    objective.remove_hooks()
    extra = {"best_val_accuracy": result.best_value, "best_step": result.best_step}
    if selected is not None:
        extra["selective_layers"] = selected
    student.eval()
    return _finish(recipe, student, student_adapter, data, ptq=ptq, steps=result.step, extra=extra)
