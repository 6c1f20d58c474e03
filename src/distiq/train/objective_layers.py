"""Part names in an objective's layer lists: ``feat: {student_layers: [language_model],
teacher_layers: [language_model]}`` means "each decoder layer of each model", resolved through
the models' adapters, so a recipe needs no family's module names.

Names resolved (``distiq.models.FeaturePoints``):

- ``feat`` — ``language_model`` / ``vision``: the decoder / vision encoder layers; ``projector``:
  the projector's output;
- ``attn`` — ``language_model`` / ``vision``: those layers' attention modules (their
  probabilities need eager attention, which the engine loads models with);
- ``qk_entropy`` — ``language_model`` / ``vision``: those attention modules' ``q_proj`` and
  ``k_proj``.

Any other entry is a module-name glob and passes through unchanged. When the two models have
different depths, the feature terms pair their layers evenly (``distiq.distill.map_layers``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

PART_LAYERS = ("language_model", "vision", "projector")


def _points(model: nn.Module, adapter: Any) -> Any:
    adapter = getattr(model, "adapter", adapter) if hasattr(model, "base_adapter") else adapter
    return adapter.feature_points(model)


def _expand(names: tuple[str, ...], points: Any, kind: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        if name not in PART_LAYERS:
            out.append(name)
        elif kind == "feat":
            out += (
                [points.projector]
                if name == "projector"
                else list(
                    points.language_layers if name == "language_model" else points.vision_layers
                )
            )
        else:
            if name == "projector":
                raise ValueError(f"{kind}: the projector has no attention; name its layers")
            modules = (
                points.language_attention if name == "language_model" else points.vision_attention
            )
            if not modules:
                raise ValueError(
                    f"{kind}: this family's {name} attention modules cannot return probabilities"
                )
            out += list(modules)
    return tuple(out)


def resolve_layer_names(
    objective: Any,
    student: nn.Module,
    student_adapter: Any,
    teacher: nn.Module,
    teacher_adapter: Any,
) -> Any:
    """``objective`` (an ``ObjectiveConfig``) with the part names of its ``feat``, ``attn`` and
    ``qk_entropy`` layer lists replaced by the models' module names.

    Raises:
        ValueError: a part that has no such modules in this family.
    """
    terms = objective.terms
    uses_parts = any(
        name in PART_LAYERS
        for term in (terms.feat, terms.attn)
        if term is not None
        for name in (*term.student_layers, *term.teacher_layers)
    ) or (
        terms.qk_entropy is not None
        and any(
            n in PART_LAYERS
            for n in (*terms.qk_entropy.query_modules, *terms.qk_entropy.key_modules)
        )
    )
    if not uses_parts:
        return objective
    student_points = _points(student, student_adapter)
    teacher_points = _points(teacher, teacher_adapter)
    changes = {}
    for kind in ("feat", "attn"):
        term = getattr(terms, kind)
        if term is not None:
            changes[kind] = dataclasses.replace(
                term,
                student_layers=_expand(term.student_layers, student_points, kind),
                teacher_layers=_expand(term.teacher_layers, teacher_points, kind),
            )
    qk = terms.qk_entropy
    if qk is not None:

        def projections(names: tuple[str, ...], suffix: str) -> tuple[str, ...]:
            out: list[str] = []
            for name in names:
                if name in PART_LAYERS:
                    modules = _expand((name,), student_points, "qk_entropy")
                    out += [f"{module}.{suffix}" for module in modules]
                else:
                    out.append(name)
            return tuple(out)

        changes["qk_entropy"] = dataclasses.replace(
            qk,
            query_modules=projections(qk.query_modules, "q_proj"),
            key_modules=projections(qk.key_modules, "k_proj"),
        )
    return dataclasses.replace(objective, terms=dataclasses.replace(terms, **changes))
