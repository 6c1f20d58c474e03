"""The student's training step: one engine forward, the teacher's outputs, the objective.

Per step (``step_fn(model, batch, step)`` of ``distiq.train.train``):

1. the ``pd`` term, when due: the student's own full-precision logits on the batch (a no-grad
   forward under ``distiq.quant.fake_quant_disabled``) — run first, so hooks of the ``feat`` /
   ``attn`` / ``qk_entropy`` terms end up holding the quantized forward's tensors;
2. the teacher's side when a term needs it (``kd``, ``feat``, ``attn``), from a
   :class:`TeacherSide`: the teacher's logits on the same batch, on its own batch of the same
   questions (other processing; answer positions aligned, :mod:`distiq.train.teacher_outputs`),
   or its cached top-k log-probabilities;
3. the student's (fake-quantized) forward;
4. ``QuantDistillObjective(step=..., student_logits, teacher_logits | teacher_topk, labels,
   attention_mask, student_fp_logits)``: every term is returned and logged by the loop.

Logits are ``(Q, S, V)`` from the student's ``EngineModel`` (:mod:`distiq.train.engine_base`);
token-level terms use the answer tokens (``labels``, Hugging Face shift) by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TeacherSide:
    """How a step gets the teacher's outputs.

    Attributes:
        engine: the teacher's ``EngineModel`` (None with a cache).
        collate: ``items -> batch`` for a teacher with other processing than the student's
            (None: the teacher reads the student's batch).
        cache: a ``TeacherCache`` of top-k answer-position log-probabilities (instead of
            running the teacher).
    """

    engine: Any = None
    collate: Callable | None = None
    cache: Any = None

    @torch.no_grad()
    def outputs(self, batch: dict) -> dict[str, Any]:
        """``{"teacher_logits": (Q, S, V)}`` or ``{"teacher_topk": (log_probs, indices)}``
        laid out like the student's batch."""
        from distiq.train.teacher_outputs import aligned_teacher_logits, cached_topk

        labels = batch["labels"]
        if self.cache is not None:
            return {"teacher_topk": cached_topk(self.cache, batch, labels)}
        if self.collate is None:
            return {"teacher_logits": self.engine(batch, heads=False).logits}
        from distiq.train.batches import move_to_device

        device = labels.device
        own = move_to_device(self.collate(batch["items"]), device)
        out = self.engine(own, heads=False)
        return {"teacher_logits": aligned_teacher_logits(out.logits, out.labels, labels)}


def student_step_fn(objective: Any, teacher: TeacherSide, student: nn.Module) -> Callable:
    """``step_fn`` for ``distiq.train.train`` (see the module docstring). ``student`` is the
    inner student module (for ``pd``)."""
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
        side = teacher.outputs(batch) if needs_teacher else {}
        out = model(batch, heads=False)
        return objective(
            step=step,
            student_logits=out.logits,
            labels=out.labels,
            attention_mask=out.suffix_mask,
            student_fp_logits=fp_logits,
            student=student,
            **side,
        )

    return step_fn
