"""The student's training step: one engine forward, the teacher's logits, the objective.

Per step (``step_fn(model, batch, step)`` of ``distiq.train.train``):

1. the ``pd`` term, when due: the student's own full-precision logits on the batch (a no-grad
   forward under ``distiq.quant.fake_quant_disabled``) — run first, so hooks of the ``feat`` /
   ``attn`` / ``qk_entropy`` terms end up holding the quantized forward's tensors;
2. the teacher's logits (no grad) when a term needs them (``kd``, ``feat``, ``attn``);
3. the student's (fake-quantized) forward;
4. ``QuantDistillObjective(step=..., student_logits, teacher_logits, labels, attention_mask,
   student_fp_logits)``: every term is returned and logged by the loop.

Logits are the answer-suffix logits ``(Q, S, V)`` of :class:`distiq.train.vlm.EngineModel`;
token-level terms use the answer tokens (``labels``, Hugging Face shift) by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters of ``modules`` (each parameter once): weight
    decay on tensors with ``ndim >= 2``, none on biases, norms and quantizer scales."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: every parameter of the student is frozen")
    return groups


def student_step_fn(objective: Any, teacher: nn.Module, student: nn.Module) -> Callable:
    """``step_fn`` for ``distiq.train.train`` (see the module docstring). ``teacher`` is the
    teacher's ``EngineModel``; ``student`` the inner student module (for ``pd``)."""
    from distiq.quant import fake_quant_disabled, fake_quant_modules

    active = objective.active
    needs_teacher = any(name in active for name in ("kd", "feat", "attn"))
    pd = active.get("pd")
    if pd is not None and not fake_quant_modules(student):
        raise ValueError("the pd term needs a fake-quantized student (a quantization section)")

    def step_fn(model: Any, batch: dict, step: int) -> Any:
        fp_logits = None
        if pd is not None and step % pd.every == 0:
            with torch.no_grad(), fake_quant_disabled(student):
                fp_logits = model(batch, heads=False).logits
        teacher_logits = None
        if needs_teacher:
            with torch.no_grad():
                teacher_logits = teacher(batch, heads=False).logits
        out = model(batch, heads=False)
        return objective(
            step=step,
            student_logits=out.logits,
            teacher_logits=teacher_logits,
            labels=batch["labels"],
            attention_mask=batch["suffix_mask"],
            student_fp_logits=fp_logits,
            student=student,
        )

    return step_fn
