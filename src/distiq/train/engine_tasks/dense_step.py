"""One training step of a dense student: its forward, the teacher's, and the objective's inputs.

Per step (``step_fn(engine, batch, step)`` of ``distiq.train.train``):

1. ``pd`` when due: the student's own full-precision outputs on the batch (no gradient, under
   ``distiq.quant.fake_quant_disabled``, feature hooks paused);
2. the teacher's outputs when a term needs them (``kd``, ``reg``, ``feat``), without gradient;
3. the student's (fake-quantized) forward, with the training targets (detection: the model's
   own Hungarian-matched loss);
4. ``QuantDistillObjective`` with, per task:

   ============ ======================= ========================== =========================
   task         task term               kd / pd distributions      reg regressions
   ============ ======================= ========================== =========================
   segmentation CE + Dice (upsampled    per-pixel class logits     —
                logits vs the mask)     ``(B·h·w, C)``
   detection    the model's own loss    matched queries' class     ``boxes`` of matched
                                        logits (softmax families:  queries ((cx, cy, w, h))
                                        ``(N, C+1)``; sigmoid:
                                        ``(N, C, 2)`` Bernoulli)
   depth        scale-invariant log     —                          ``log_depth`` per pixel
                (SILog)                                            (pd: its fp–quant L1)
   ============ ======================= ========================== =========================

   and ``feat``: the stages' feature maps (the recipe's ``feat.student_layers`` /
   ``teacher_layers`` globs, default the family's stages) as channel-last tokens, a learned
   projection where widths differ.

The step returns ``(total, terms)``: the objective's weighted terms, and beside them (logged,
not added again) the task loss's own parts as ``task/<part>`` — CE and Dice, or the detection
model's ``loss_vfl`` / ``loss_ce``, ``loss_bbox``, ``loss_giou`` (auxiliary layers' too).

Queries are matched as :mod:`distiq.train.engine_tasks.dense_engine` describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distiq.train.engine_tasks.dense_engine import (
    DenseEngine,
    binary_logits,
    feature_tokens,
    match_queries,
    pick,
    pixel_logits,
)


@dataclass
class DenseTeacherSide:
    """The teacher's side of a dense step: its engine (eval mode, frozen) and, for ``feat``, the
    capture of its stages."""

    engine: DenseEngine
    capture: Any = None

    @torch.no_grad()
    def outputs(self, batch: dict) -> Any:
        return self.engine(batch)


def dense_objective_config(config: Any) -> Any:
    """The recipe's objective as dense outputs need it: ``kd`` / ``pd`` count every position the
    step passes (pixels, matched queries: ``tokens: all``, no label shift), and ``feat``'s
    layers are captured by the step itself (channel-last), not by the objective's hooks."""
    import dataclasses

    terms = config.terms
    changes: dict[str, Any] = {}
    for name in ("kd", "pd"):
        term = getattr(terms, name)
        if term is not None:
            changes[name] = dataclasses.replace(term, tokens="all")
    if terms.feat is not None:
        changes["feat"] = dataclasses.replace(terms.feat, student_layers=(), teacher_layers=())
    return dataclasses.replace(
        config, terms=dataclasses.replace(terms, **changes), shift_labels=False
    )


def feature_captures(
    recipe: Any, student: nn.Module, student_adapter: Any, teacher: nn.Module, teacher_adapter: Any
) -> tuple[Any, Any]:
    """``(student capture, teacher capture)`` of the ``feat`` term's stages, or ``(None, None)``
    without a ``feat`` term."""
    from distiq.distill import FeatureCapture

    feat = recipe.objective.terms.feat
    if feat is None:
        return None, None
    student_layers = feat.student_layers or student_adapter.feature_patterns()
    teacher_layers = feat.teacher_layers or teacher_adapter.feature_patterns()
    return (
        FeatureCapture(student, student_layers, output_index=feat.output_index),
        FeatureCapture(teacher, teacher_layers, output_index=feat.output_index, detach=True),
    )


def _scores(adapter: Any, logits: torch.Tensor) -> torch.Tensor:
    return adapter.scores(logits)


def _class_view(adapter: Any, logits: torch.Tensor) -> torch.Tensor:
    """Matched queries' class logits as the distributions kd / pd compare."""
    return binary_logits(logits) if adapter.class_activation == "sigmoid" else logits


def dense_step_fn(
    task: Any,
    objective: Any,
    side: DenseTeacherSide | None,
    student: nn.Module,
    student_capture: Any = None,
) -> Callable:
    """``step_fn`` for ``distiq.train.train`` (see the module docstring). ``task`` is the
    :class:`~distiq.train.engine_tasks.dense.DenseEngineTask`; ``student`` the inner model."""
    from distiq.quant import fake_quant_disabled, fake_quant_modules

    active = objective.active
    needs_teacher = any(name in active for name in ("kd", "feat", "reg"))
    needs_outputs = any(name in active for name in ("kd", "reg", "pd"))
    if needs_teacher and side is None:
        raise ValueError("the kd / feat / reg terms need the teacher")
    pd = active.get("pd")
    if pd is not None and not fake_quant_modules(student):
        raise ValueError("the pd term needs a fake-quantized student (a quantization section)")

    def step_fn(engine: Any, batch: dict, step: int) -> Any:
        adapter = engine.adapter
        fp = None
        if pd is not None and step % pd.every == 0:
            paused = student_capture.paused() if student_capture else contextlib.nullcontext()
            with torch.no_grad(), fake_quant_disabled(student), paused:
                fp = engine(batch)
        teacher = side.outputs(batch) if needs_teacher else None
        out = engine(batch, targets=True)
        task_loss = task.task_loss(adapter, out, batch)
        inputs: dict[str, Any] = {"task_loss": task_loss.total}
        if needs_outputs:
            inputs.update(task.distill_inputs(adapter, out, teacher, fp))
        if student_capture is not None and side is not None and side.capture is not None:
            teacher_features = side.capture.features(clear=True)
            inputs["student_features"] = feature_tokens(
                student_capture.features(clear=True), teacher_features
            )
            inputs["teacher_features"] = feature_tokens(teacher_features)
        result = objective(step=step, student=student, **inputs)
        parts = {f"task/{name}": value.detach() for name, value in task_loss.terms.items()}
        return result.total, {**result.terms, **parts}

    return step_fn


def segmentation_inputs(
    adapter: Any, out: Any, teacher: Any, fp: Any
) -> dict[str, torch.Tensor | None]:
    """Per-pixel class logits of student, teacher and full-precision student (at the student's
    output resolution; the teacher's resized to it when it differs)."""
    size = tuple(out.logits.shape[-2:])
    return {
        "student_logits": pixel_logits(out.logits),
        "teacher_logits": pixel_logits(teacher.logits, size) if teacher is not None else None,
        "student_fp_logits": pixel_logits(fp.logits, size) if fp is not None else None,
    }


def detection_inputs(adapter: Any, out: Any, teacher: Any, fp: Any) -> dict[str, Any]:
    """Matched queries' class logits (kd, pd) and boxes (reg) of student and teacher; the
    full-precision student's logits listed in the same order as the student's (its queries
    matched to the quantized ones)."""
    batch, queries = out.logits.shape[:2]
    probs = _scores(adapter, out.logits.detach())
    inputs: dict[str, Any] = {}
    if teacher is not None:
        student_pairs, teacher_pairs = match_queries(
            probs, out.boxes.detach(), _scores(adapter, teacher.logits), teacher.boxes
        )
        inputs["teacher_logits"] = _class_view(adapter, pick(teacher.logits, teacher_pairs))
        inputs["student_regressions"] = {"boxes": pick(out.boxes, student_pairs)}
        inputs["teacher_regressions"] = {"boxes": pick(teacher.boxes, teacher_pairs)}
    else:
        grid = torch.cartesian_prod(torch.arange(batch), torch.arange(queries))
        student_pairs = grid.reshape(-1, 2)
    inputs["student_logits"] = _class_view(adapter, pick(out.logits, student_pairs))
    if fp is not None:
        quant_pairs, fp_pairs = match_queries(
            probs, out.boxes.detach(), _scores(adapter, fp.logits), fp.boxes
        )
        partner = {tuple(q): f for q, f in zip(quant_pairs.tolist(), fp_pairs.tolist())}
        rows = torch.tensor([partner[tuple(r)] for r in student_pairs.tolist()], dtype=torch.long)
        inputs["student_fp_logits"] = _class_view(adapter, pick(fp.logits, rows))
    return inputs


def depth_inputs(adapter: Any, out: Any, teacher: Any, fp: Any) -> dict[str, Any]:
    """Log-depth per pixel of student, teacher (resized to the student's map when it differs)
    and full-precision student."""

    def log_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        depth = adapter.resized(depth, size)
        return torch.log(depth.float().clamp(min=1e-3)).reshape(-1, 1)

    size = tuple(out.depth.shape[-2:])
    inputs: dict[str, Any] = {"student_regressions": {"log_depth": log_depth(out.depth, size)}}
    if teacher is not None:
        inputs["teacher_regressions"] = {"log_depth": log_depth(teacher.depth, size)}
    if fp is not None:
        inputs["student_fp_regressions"] = {"log_depth": log_depth(fp.depth, size)}
    return inputs
