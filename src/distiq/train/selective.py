"""EfQAT-style selective quantization-aware training: train only what matters.

EfQAT (Ashkboos et al., 2024) keeps most weights of a quantized network frozen during QAT and
updates only the quantization parameters (scales, zero-points) and the weights that matter most.
Here "what matters" is *measured* per layer, as the damage quantizing that layer alone does:

    sensitivity(l) = mean over answer tokens of KL( p_fp ‖ p_{only l quantized} )

on a few calibration batches, where ``p_fp`` is the student with every fake-quant module off and
``p_{only l quantized}`` the same student with only layer ``l``'s fake quantization on (weights
and input activations). The ``fraction`` most sensitive layers keep trainable weights (and
biases); every other parameter is frozen, except the quantizer parameters (LSQ weight and
activation scales / zero-points), which always train. Use a learnable weight spec
(``learnable: true``) so that frozen layers still adapt their scales.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def _answer_kl(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """KL(softmax(reference) ‖ softmax(logits)) summed over the vocabulary, mean over the
    positions that predict answer tokens. reference, logits: (Q, S, V); labels: (Q, S)."""
    from distiq.tasks.vqa import answer_token_mask

    mask = answer_token_mask(labels)
    ref = F.log_softmax(reference[mask].float(), dim=-1)
    out = F.log_softmax(logits[mask].float(), dim=-1)
    return float((ref.exp() * (ref - out)).sum(dim=-1).mean())


@torch.no_grad()
def layer_sensitivity(engine: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Sensitivity of every fake-quant module of ``engine.inner`` (see the module docstring),
    measured on ``batches`` (engine batches with labels)."""
    from distiq.quant import fake_quant_disabled, fake_quant_modules

    modules = fake_quant_modules(engine.inner)
    if not modules:
        raise ValueError("selective training needs a fake-quantized student")
    was_training = engine.training
    engine.eval()
    scores = {name: 0.0 for name, _ in modules}
    try:
        with fake_quant_disabled(engine.inner):
            references = [engine(batch, heads=False).logits for batch in batches]
            for name, module in modules:
                module.fake_quant_enabled = True
                for batch, reference in zip(batches, references):
                    logits = engine(batch, heads=False).logits
                    scores[name] += _answer_kl(reference, logits, batch["labels"]) / len(batches)
                module.fake_quant_enabled = False
    finally:
        engine.train(was_training)
    return scores


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable quantization parameters (LSQ scales and zero-points) of ``model``."""
    from distiq.quant import fake_quant_modules

    params = []
    for _, module in fake_quant_modules(model):
        for child_name in ("weight_quant", "act_quant", "act_quant_low"):
            child = getattr(module, child_name, None)
            if child is not None:
                params.extend(p for p in child.parameters())
    return params


def apply_selective(
    engine: nn.Module, calib: list[dict], config: Any, *, data: Any = None
) -> list[str]:
    """Measure layer sensitivities on calibration batches (about ``config.samples`` images),
    then freeze everything but the quantizer parameters and the ``config.fraction`` most
    sensitive layers (at least one when the fraction is > 0). Returns the selected names."""
    batches, images = [], 0
    for batch in calib:
        if images >= config.samples:
            break
        batches.append(batch)
        images += len(batch["image_id"])
    if not batches and data is not None:
        batches = [
            data.train.collate([data.train[i] for i in range(min(config.samples, len(data.train)))])
        ]
    scores = layer_sensitivity(engine, batches)
    ranked = sorted(scores, key=scores.get, reverse=True)
    count = math.ceil(config.fraction * len(ranked)) if config.fraction > 0 else 0
    selected = ranked[:count]
    model = engine.inner
    for param in model.parameters():
        param.requires_grad_(False)
    for name in selected:
        module = model.get_submodule(name)
        module.weight.requires_grad_(True)
        if module.bias is not None:
            module.bias.requires_grad_(True)
    trainable_quant = quantizer_parameters(model)
    for param in trainable_quant:
        param.requires_grad_(True)
    logger.info(
        "selective: %d of %d layers train (most sensitive: %s); %d quantizer parameters train",
        len(selected),
        len(ranked),
        ", ".join(f"{n} ({scores[n]:.3g})" for n in selected[:5]),
        len(trainable_quant),
    )
    if not selected and not trainable_quant:
        raise ValueError(
            "selective training left nothing to train: raise selective.fraction or use a "
            "learnable weight / activation spec (learnable: true)"
        )
    return selected
