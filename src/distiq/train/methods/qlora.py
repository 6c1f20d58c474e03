"""``qlora-kd``: the QLoRA recipe (Dettmers et al., 2023) trained with the distillation objective.

1. The teacher directory is loaded again through transformers' ``BitsAndBytesConfig``
   (``load_in_4bit``, ``nf4``, double quantization of the absmax constants, float32 compute):
   every ``nn.Linear`` of the quantized parts becomes a frozen bitsandbytes ``Linear4bit``
   (bitsandbytes' CPU backend). ``lm_head``, the parts the recipe leaves out and layers narrower
   than the 64-element NF4 block stay in full precision.
2. peft LoRA adapters (rank ``qlora.rank``, ``alpha``, ``dropout``) go on every linear layer but
   ``lm_head`` (peft's ``"all-linear"``, QLoRA's placement); only they train, with the recipe's
   objective (task + kd against the full-precision teacher), data, steps and batch size.
3. The QLoRA model as trained (NF4 base + float adapters) is evaluated on the test split.
4. The adapters are merged into the dequantized NF4 weights, ``W = deq(W_nf4) + (α/r)·B·A``,
   and the result is re-quantized with the recipe's weight spec (NF4, group 64, by default;
   distiq's NF4 keeps the absmax in float32 — no second quantization), baked and saved like
   every other run, then evaluated again. The record's ``value`` is the deployable (merged,
   re-quantized) model's accuracy; ``extra["qlora_unmerged_value"]`` and
   ``extra["merge_requantize_drop"]`` report what merging and re-quantizing cost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.results import ResultRecord
from distiq.train.engines import engine_for, evaluate_vqa
from distiq.train.methods.common import RunContext, finish, register_method
from distiq.train.quant_plan import plan_quantization

logger = logging.getLogger(__name__)

NF4_BLOCK = 64


def _skip_modules(vlm: nn.Module, planned: set[str]) -> list[str]:
    """Full names of the linear layers bitsandbytes must leave in full precision: every one
    the quantization plan does not quantize (``lm_head`` unless targeted, other parts, ignored
    layers, layers narrower than the 64-element NF4 block)."""
    skip = []
    for name, module in vlm.named_modules():
        if isinstance(module, nn.Linear) and (
            name not in planned or module.in_features % NF4_BLOCK
        ):
            skip.append(name)
    return skip


def load_qlora_base(teacher_dir: Path, skip: list[str]) -> nn.Module:
    """The teacher loaded with a frozen NF4 + double-quant base (see the module docstring);
    the layers ``skip`` stay in full precision."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )
    model = AutoModelForImageTextToText.from_pretrained(
        teacher_dir,
        quantization_config=config,
        attn_implementation="eager",
        local_files_only=True,
        dtype=torch.float32,
        device_map="cpu",
    )
    return model


def add_lora(model: nn.Module, config: Any) -> nn.Module:
    """peft LoRA on every linear layer but ``lm_head``; returns the peft model (only the
    adapters are trainable)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules="all-linear",
        bias="none",
    )
    return get_peft_model(model, lora)


@torch.no_grad()
def merged_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name in the base model: merged float weight (out, in)}`` for every LoRA
    layer: the base weight (dequantized from NF4 when 4-bit) plus ``scaling · B @ A``."""
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    out = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        layer = module.get_base_layer()
        weight = layer.weight
        if hasattr(weight, "quant_state") and weight.quant_state is not None:
            dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        else:
            dense = weight.detach().float().clone()
        for key in module.active_adapters:
            if key not in module.lora_A:
                continue
            lora_a = module.lora_A[key].weight.float()  # (r, in)
            lora_b = module.lora_B[key].weight.float()  # (out, r)
            dense += module.scaling[key] * (lora_b @ lora_a)
        out[name] = dense.reshape(layer.out_features, layer.in_features)
    return out


@register_method("qlora-kd")
def run_qlora_kd(ctx: RunContext) -> list[ResultRecord]:
    """Train, evaluate, merge, re-quantize, evaluate; returns the run's result record."""
    from distiq.models import unwrap_vlm
    from distiq.objective import QuantDistillObjective
    from distiq.quant import quantize_
    from distiq.train.loop import train
    from distiq.train.modeling import resolve_model_dir
    from distiq.train.optim import param_groups
    from distiq.train.student import student_step_fn

    recipe, data, teacher, adapter = ctx.recipe, ctx.data, ctx.teacher, ctx.teacher_adapter
    teacher_vlm = unwrap_vlm(teacher)
    planned = set(plan_quantization(teacher_vlm, adapter, recipe.quantization).layers)
    base = load_qlora_base(
        resolve_model_dir(recipe.teacher.path), _skip_modules(teacher_vlm, planned)
    )
    peft_model = add_lora(base, recipe.qlora)
    llava = peft_model.get_base_model()
    engine = engine_for(llava, adapter, data.train.path)
    side = ctx.task.teacher_side(ctx, adapter)
    objective = QuantDistillObjective(recipe.objective)
    objective.attach(student=llava, teacher=teacher)

    def eval_fn(module: Any) -> dict[str, float]:
        metrics = evaluate_vqa(module, data.val, max_new_tokens=recipe.eval.max_new_tokens)
        return {"vqa_accuracy": 100.0 * metrics["vqa_accuracy"]}

    result = train(
        engine,
        student_step_fn(objective, side, llava),
        data.train,
        config=recipe.train,
        run_dir=recipe.output,
        eval_fn=eval_fn,
        collate_fn=data.train.collate,
        optimizer_params=param_groups([engine], recipe.train.weight_decay),
        stateful={"objective": objective},
        resume=ctx.resume,
        overwrite=not ctx.resume,
        on_step=ctx.on_step,
    )
    objective.remove_hooks()
    engine.eval()
    unmerged = evaluate_vqa(
        engine,
        data.test,
        max_new_tokens=recipe.eval.max_new_tokens,
        batch_images=recipe.eval.batch_images,
    )
    # Merge into a float copy of the teacher (heads kept), then re-quantize the merged weights.
    merged = merged_weights(peft_model)
    student, _ = ctx.build_student()
    prefix = "vlm." if hasattr(student, "vlm") else ""
    with torch.no_grad():
        for name, weight in merged.items():
            student.get_submodule(prefix + name).weight.copy_(weight)
    plan = plan_quantization(student, adapter, recipe.quantization)
    quantize_(student, plan.config(weights=True, activations=False))
    student.eval()
    unmerged_value = 100.0 * unmerged["vqa_accuracy"]
    records = finish(
        ctx,
        student,
        adapter,
        ptq=None,
        steps=result.step,
        plan=plan,
        extra={
            "qlora_unmerged_value": unmerged_value,
            "lora_layers": len(merged),
            "best_val_accuracy": result.best_value,
        },
    )
    record = records[0]
    drop = unmerged_value - record.value
    logger.info(
        "qlora-kd: %.2f %% as trained (NF4 base + adapters), %.2f %% merged and re-quantized "
        "(drop %.2f points)",
        unmerged_value,
        record.value,
        drop,
    )
    return [record.replace(extra={**record.extra, "merge_requantize_drop": drop})]
