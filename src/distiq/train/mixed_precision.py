"""Mixed precision under a size budget: how many bits the vision tower, the projector and the
language model each get so that the quantized model fits ``size_mb`` and loses the least.

1. **Sensitivity.** For each part ``p`` and each candidate width ``b`` (default 2, 4, 8 bits),
   the part alone is fake-quantized at ``b`` bits (round to nearest, the recipe's weight spec
   with ``bits=b``) and its damage is measured on the calibration batches as the mean KL of the
   float model's answer distribution to the quantized one's, over answer tokens:
   ``s(p, b) = mean KL(p_float ‖ p_{only p at b bits})``.
2. **Size.** Each layer's packed size at ``b`` bits is its codes (``b`` bits per weight), its
   scales (per tensor / channel / group, in the spec's ``scale_dtype``) and zero-points
   (asymmetric specs), plus everything left in float32 (embeddings, norms, biases, parts not
   quantized) — the layout of distiq's packed checkpoint (``distiq.export.save_packed``).
3. **Allocation.** Every combination of widths over the parts is tried (3 parts × 3 widths: 27)
   and the one with the smallest summed sensitivity whose size fits the budget wins (an
   additive model of the damage, as HAWQ's and the usual mixed-precision searches assume).

The chosen widths become overrides of the recipe's quantization (``{part: {weight: {bits}}}``)
and the run's record keeps them (``extra["bits_allocation"]``, ``extra["size_budget_mb"]``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SCALE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class SizeBudget:
    """``quantization.budget``: fit the packed model's tensors (codes, scales, zero-points and
    float leftovers; the manifest aside) into ``size_mb`` MiB by choosing, per part of
    ``parts``, one width of ``bits`` for its weights."""

    size_mb: float
    bits: tuple[int, ...] = (2, 4, 8)
    parts: tuple[str, ...] = ("vision", "projector", "language_model")

    def _validate(self) -> list[str]:
        errors = []
        if not self.size_mb > 0:
            errors.append(f"size_mb must be > 0, got {self.size_mb}")
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            errors.append(f"bits must be widths in 2..8, got {list(self.bits)}")
        if not self.parts:
            errors.append("parts is empty")
        return errors


@dataclass
class Allocation:
    """What the search chose: ``bits`` per part, the estimated size (MiB) and damage, and every
    part's measured sensitivity per width."""

    bits: dict[str, int]
    size_mb: float
    damage: float
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)


def layer_bytes(module: nn.Module, spec: Any) -> int:
    """Packed bytes of ``module``'s weight under ``spec`` (codes, scales, zero-points)."""
    weight = module.weight
    rows, width = weight.shape[0], weight[0].numel()
    values = rows * width
    if spec.group_size is not None:
        scales = rows * math.ceil(width / spec.group_size)
    elif spec.granularity.__class__.__name__ == "PerTensor":
        scales = 1
    else:
        scales = rows
    scale_bytes = SCALE_BYTES.get(spec.scale_dtype, 4)
    zero_bytes = 0 if spec.symmetric else scales
    return math.ceil(values * spec.bits / 8) + scales * scale_bytes + zero_bytes


def model_bytes(model: nn.Module, plan: Any) -> int:
    """Estimated packed size of ``model`` quantized by ``plan`` (a ``QuantPlan``): planned
    layers' weights packed, every other tensor in float32."""
    modules = dict(model.named_modules())
    packed, quantized_params = 0, set()
    for name, (weight, _activation) in plan.layers.items():
        if weight is None:
            continue
        module = modules[name]
        packed += layer_bytes(module, weight)
        quantized_params.add(id(module.weight))
    floats = sum(
        4 * p.numel() for p in {id(p): p for p in model.parameters()}.values()
        if id(p) not in quantized_params
    )  # fmt: skip
    return packed + floats


@torch.no_grad()
def _damage(engine: Any, calib: list[dict], references: list[torch.Tensor]) -> float:
    """Mean answer-token KL(reference ‖ engine) over the calibration batches."""
    from distiq.tasks.vqa import answer_token_mask

    total, count = 0.0, 0
    for batch, reference in zip(calib, references):
        out = engine(batch, heads=False)
        mask = answer_token_mask(out.labels)
        p = torch.log_softmax(reference[mask].float(), dim=-1)
        q = torch.log_softmax(out.logits[mask].float(), dim=-1)
        total += float((p.exp() * (p - q)).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def sensitivity(
    model: nn.Module, adapter: Any, quantization: Any, calib: list[dict], path: Any, bits: Any
) -> dict[str, dict[int, float]]:
    """``{part: {bits: damage}}`` (see the module docstring, step 1)."""
    from distiq.quant import quantize_
    from distiq.train.engines import engine_for
    from distiq.train.quant_plan import plan_quantization

    engine = engine_for(model, adapter, path).eval()
    with torch.no_grad():
        references = [engine(batch, heads=False).logits for batch in calib]
    out: dict[str, dict[int, float]] = {}
    for part in bits.parts:
        out[part] = {}
        for width in bits.bits:
            config = dataclasses.replace(
                quantization,
                weight=dataclasses.replace(quantization.weight, bits=width, learnable=False),
                activation=None,
                targets=(part,),
                overrides={},
                budget=None,
            )
            trial = copy.deepcopy(model)
            plan = plan_quantization(trial, adapter, config)
            quantize_(trial, plan.config(weights=True, activations=False))
            out[part][width] = _damage(engine_for(trial, adapter, path).eval(), calib, references)
            del trial
    return out


def allocate(
    model: nn.Module, adapter: Any, quantization: Any, calib: list[dict], path: Any
) -> Allocation:
    """Choose each part's width (see the module docstring).

    Raises:
        ValueError: no combination of widths fits the budget (with the smallest size there is).
    """
    from distiq.train.quant_plan import plan_quantization

    budget = quantization.budget
    damage = sensitivity(model, adapter, quantization, calib, path, budget)
    best: Allocation | None = None
    smallest = math.inf
    for widths in itertools.product(budget.bits, repeat=len(budget.parts)):
        bits = dict(zip(budget.parts, widths))
        plan = plan_quantization(model, adapter, with_widths(quantization, bits))
        size = model_bytes(model, plan) / 2**20
        smallest = min(smallest, size)
        if size > budget.size_mb:
            continue
        total = sum(damage[p][b] for p, b in bits.items())
        if best is None or total < best.damage:
            best = Allocation(bits, size, total, damage)
    if best is None:
        raise ValueError(
            f"no width of {list(budget.bits)} bits per part fits quantization.budget.size_mb "
            f"{budget.size_mb}: the smallest allocation is {smallest:.3f} MiB"
        )
    logger.info(
        "mixed precision: %s (%.3f MiB of %.3f; estimated damage %.4g)",
        best.bits,
        best.size_mb,
        budget.size_mb,
        best.damage,
    )
    return best


def with_widths(quantization: Any, bits: dict[str, int]) -> Any:
    """``quantization`` with the parts of ``bits`` as targets, each at its width (the recipe's
    weight spec otherwise), and no budget left to search."""
    overrides = {part: {"weight": {"bits": width}} for part, width in bits.items()}
    return dataclasses.replace(quantization, targets=tuple(bits), overrides=overrides, budget=None)
