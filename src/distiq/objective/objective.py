"""``QuantDistillObjective``: weights, schedules and balancing around the terms; ``LossOutput``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distiq.config import ConfigError
from distiq.distill import FeatureCapture, FeatureProjection, map_layers
from distiq.objective.balancing import UncertaintyWeighting
from distiq.objective.config import UNBALANCED_TERMS, ObjectiveConfig
from distiq.objective.quant_access import fp_forward, int_weight_modules, rounding_value
from distiq.objective.terms import (
    Batch,
    attention_value,
    default_logits,
    feature_value,
    kd_value,
    pd_value,
    qk_entropy_value,
    regression_pd_value,
    regression_value,
    task_value,
)

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    """What one objective call returns.

    Attributes:
        total: the scalar to ``backward()``; exactly ``sum(terms.values())`` (in that order).
        terms: every active term's weighted contribution (scalar tensors with their graphs):
            ``weight · schedule(step) [· τ²]`` times the raw value, or the uncertainty-balanced
            form ``λ (exp(−s) L + s)``.
        raw: every term's unweighted value, detached (the number to plot per term).
        weights: the effective factor each raw value was multiplied by this step (τ² and
            uncertainty factors included); floats or detached scalar tensors.
        extras: other numbers worth logging: ``temperature``, ``kd_confidence`` (γ of
            confidence-aware KL), ``log_var/<term>`` (uncertainty balancing).
    """

    total: Tensor
    terms: dict[str, Tensor]
    raw: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float | Tensor] = field(default_factory=dict)
    extras: dict[str, float | Tensor] = field(default_factory=dict)

    def log_dict(self) -> dict[str, float]:
        """Flat ``{name: float}`` for a metrics log: ``loss``, ``loss/<term>``, ``raw/<term>``,
        ``weight/<term>`` and the extras (one device sync)."""
        out = {"loss": float(self.total.detach())}
        for name, value in self.terms.items():
            out[f"loss/{name}"] = float(value.detach())
        for name, value in self.raw.items():
            out[f"raw/{name}"] = float(value)
        for name, value in self.weights.items():
            out[f"weight/{name}"] = float(value)
        for name, value in self.extras.items():
            out[name] = float(value)
        return out

    def non_finite(self) -> list[str]:
        """Names of the terms whose value is NaN or infinite (empty when all are finite)."""
        return [n for n, v in self.terms.items() if not bool(torch.isfinite(v.detach()).all())]


def _collect_errors(obj: object, where: str) -> list[str]:
    errors: list[str] = []
    if not dataclasses.is_dataclass(obj):
        return errors
    for f in dataclasses.fields(obj):
        errors.extend(_collect_errors(getattr(obj, f.name), f"{where}.{f.name}"))
    validate = getattr(obj, "_validate", None)
    if validate is not None:
        errors.extend(f"{where}: {msg}" for msg in validate())
    return errors


def _as_config(config: ObjectiveConfig | Mapping[str, Any]) -> ObjectiveConfig:
    if isinstance(config, ObjectiveConfig):
        errors = _collect_errors(config, "objective")
        if errors:
            raise ConfigError(errors)
        return config
    if isinstance(config, Mapping):
        return ObjectiveConfig.from_dict(dict(config), where="objective")
    raise TypeError(f"config must be an ObjectiveConfig or a mapping, got {type(config).__name__}")


class QuantDistillObjective(nn.Module):
    """The quantization-aware distillation objective (see :mod:`distiq.objective` for the
    YAML schema and the calling protocol).

    Args:
        config: an :class:`ObjectiveConfig` or the plain ``objective:`` mapping of a recipe.
        logits_fn: extracts logits from the student's outputs for the ``pd`` term's
            full-precision forward (default: a tensor, ``.logits``, ``["logits"]`` or ``[0]``).

    Learnable parts — feature projections (created when student and teacher widths differ) and
    uncertainty log-variances — are this module's parameters: optimise them with the student.
    """

    def __init__(
        self,
        config: ObjectiveConfig | Mapping[str, Any],
        *,
        logits_fn: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = _as_config(config)
        self.active = self.config.terms.active()
        self.logits_fn = logits_fn or default_logits
        self.projections = nn.ModuleDict()
        self.balancer: UncertaintyWeighting | None = None
        if self.config.balancing == "uncertainty":
            self.balancer = UncertaintyWeighting(
                [n for n in self.active if n not in UNBALANCED_TERMS]
            )
        self._models: dict[str, nn.Module] = {}  # not registered: their parameters are not ours
        self._captures: dict[str, FeatureCapture] = {}
        self._head_dims: list[int] = []
        self._rounding_cache: tuple[int, list[tuple[str, nn.Module]]] | None = None
        self._calls = 0
        log.info(
            "objective terms: %s; balancing: %s",
            ", ".join(f"{n} (weight {t.weight})" for n, t in self.active.items()),  # type: ignore[attr-defined]
            self.config.balancing,
        )

    # ---- attaching to models ------------------------------------------------------------------
    def attach(self, student: nn.Module | None = None, teacher: nn.Module | None = None):
        """Register the forward hooks the configured terms need and remember the models.

        - ``feat`` / ``attn`` with ``student_layers`` / ``teacher_layers``: capture those modules'
          outputs (teacher outputs detached);
        - ``qk_entropy``: capture the student's query / key projections;
        - ``pd`` and ``rounding`` use the attached student when ``forward`` gets none.

        Returns ``self``; use as a context manager or call :meth:`remove_hooks` when done.
        Hooks never change the models' outputs.
        """
        self.remove_hooks()
        if student is not None:
            self._models["student"] = student
        if teacher is not None:
            self._models["teacher"] = teacher
        for name in ("feat", "attn"):
            term = self.active.get(name)
            if term is None or not term.student_layers:  # type: ignore[attr-defined]
                continue
            if student is None or teacher is None:
                raise ValueError(f"{name} captures layers of both models: attach(student, teacher)")
            index = term.output_index  # type: ignore[attr-defined]
            self._captures[f"{name}.student"] = FeatureCapture(
                student,
                term.student_layers,
                output_index=index,  # type: ignore[attr-defined]
            )
            self._captures[f"{name}.teacher"] = FeatureCapture(
                teacher,
                term.teacher_layers,
                output_index=index,
                detach=True,  # type: ignore[attr-defined]
            )
        qk = self.active.get("qk_entropy")
        if qk is not None and student is not None:
            q_cap = FeatureCapture(student, qk.query_modules)  # type: ignore[attr-defined]
            k_cap = FeatureCapture(student, qk.key_modules)  # type: ignore[attr-defined]
            if len(q_cap) != len(k_cap):
                q_cap.remove()
                k_cap.remove()
                raise ValueError(
                    f"qk_entropy: query_modules match {len(q_cap)} modules but key_modules "
                    f"{len(k_cap)}; they must pair up layer by layer"
                )
            self._captures["qk.query"], self._captures["qk.key"] = q_cap, k_cap
            self._head_dims = [
                self._head_dim(student, name, qk.head_dim)  # type: ignore[attr-defined]
                for name in q_cap.names
            ]
        return self

    @staticmethod
    def _head_dim(model: nn.Module, name: str, configured: int | None) -> int:
        if configured is not None:
            return configured
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = model.get_submodule(parent_name) if parent_name else model
        for attr in ("head_dim", "attention_head_size", "head_size"):
            value = getattr(parent, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(
            f"qk_entropy: cannot infer the head size of {name!r} (its parent module has no "
            "head_dim attribute); set qk_entropy.head_dim in the config"
        )

    def remove_hooks(self) -> None:
        """Remove every hook this objective registered (safe to call twice)."""
        for cap in self._captures.values():
            cap.remove()
        self._captures.clear()

    def __enter__(self) -> QuantDistillObjective:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    @contextlib.contextmanager
    def _student_captures_paused(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for key, cap in self._captures.items():
                if key.endswith(".student") or key.startswith("qk."):
                    stack.enter_context(cap.paused())
            yield

    def _captured(self, key: str) -> list[Tensor] | None:
        cap = self._captures.get(key)
        return None if cap is None else cap.features()

    # ---- schedules ----------------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        """The kd temperature at ``step`` (1.0 without a kd term)."""
        kd = self.active.get("kd")
        if kd is None:
            return 1.0
        if kd.temperature_schedule is not None:  # type: ignore[attr-defined]
            return kd.temperature_schedule.value(step)  # type: ignore[attr-defined]
        return kd.temperature  # type: ignore[attr-defined]

    def term_weight(self, name: str, step: int) -> float:
        """``weight · schedule(step)`` of an active term (before τ² and balancing)."""
        term = self.active[name]
        return term.weight * term.schedule.value(step)  # type: ignore[attr-defined]

    # ---- projections --------------------------------------------------------------------------
    def _project(self, k: int, features: Tensor, teacher_width: int) -> Tensor:
        feat = self.active["feat"]
        if not feat.project:  # type: ignore[attr-defined]
            raise ValueError(
                f"feat pair {k}: student width {features.shape[-1]} differs from the teacher's "
                f"{teacher_width} and feat.project is false; enable it or capture matching layers"
            )
        key = f"pair{k}"
        if key not in self.projections:
            proj = FeatureProjection(features.shape[-1], teacher_width).to(features.device)
            self.projections[key] = proj
            level = logging.WARNING if self._calls else logging.INFO
            log.log(
                level,
                "feat: created a learned projection %d -> %d for pair %d; its parameters are in "
                "objective.parameters() (build the optimizer after objective.prepare(...))",
                features.shape[-1],
                teacher_width,
                k,
            )
        proj = self.projections[key]
        if (proj.student_dim, proj.teacher_dim) != (features.shape[-1], teacher_width):
            raise ValueError(
                f"feat pair {k}: widths changed from {proj.student_dim}->{proj.teacher_dim} to "
                f"{features.shape[-1]}->{teacher_width} between calls"
            )
        return proj(features)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):
        """As ``nn.Module.load_state_dict``; feature projections that a checkpoint holds but this
        (fresh) objective has not created yet are created first, so resuming needs no
        ``prepare`` call."""
        prefix = "projections."
        for key, value in state_dict.items():
            if key.startswith(prefix) and key.endswith(".linear.weight"):
                name = key[len(prefix) : -len(".linear.weight")]
                if name not in self.projections:
                    teacher_dim, student_dim = value.shape
                    bias = f"{prefix}{name}.linear.bias" in state_dict
                    self.projections[name] = FeatureProjection(student_dim, teacher_dim, bias=bias)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def prepare(self, **inputs: Any) -> list[str]:
        """Run one call without gradient so that lazily created parameters (feature projections)
        exist; returns the names of the objective's parameters. Call it on the first batch,
        before building the optimizer, with the same keyword arguments as :meth:`forward`."""
        with torch.no_grad():
            self(**inputs)
        return [n for n, _ in self.named_parameters()]

    # ---- the call -----------------------------------------------------------------------------
    def forward(
        self,
        *,
        step: int,
        student_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
        labels: Tensor | None = None,
        answer_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        task_loss: Tensor | None = None,
        student_features: Sequence[Tensor] | None = None,
        teacher_features: Sequence[Tensor] | None = None,
        student_attentions: Sequence[Tensor] | None = None,
        teacher_attentions: Sequence[Tensor] | None = None,
        visual_mask: Tensor | None = None,
        student: nn.Module | None = None,
        student_inputs: Mapping[str, Any] | Sequence[Any] | None = None,
        student_fp_logits: Tensor | None = None,
        student_regressions: Mapping[str, Tensor] | None = None,
        teacher_regressions: Mapping[str, Tensor] | None = None,
        student_fp_regressions: Mapping[str, Tensor] | None = None,
    ) -> LossOutput:
        """Compute every active term at optimizer step ``step``; see :mod:`distiq.objective`
        for each argument's shape and which term needs it."""
        batch = Batch(
            step=step,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            teacher_topk=teacher_topk,
            labels=labels,
            answer_mask=answer_mask,
            attention_mask=attention_mask,
            task_loss=task_loss,
            visual_mask=visual_mask,
            shift_labels=self.config.shift_labels,
            ignore_index=self.config.ignore_index,
        )
        student = student if student is not None else self._models.get("student")
        temperature = self.temperature(step)
        raw: dict[str, Tensor] = {}
        scale: dict[str, float] = {}
        extras: dict[str, float | Tensor] = {}
        for name, term in self.active.items():
            if name == "task":
                raw[name] = task_value(term, batch)  # type: ignore[arg-type]
            elif name == "kd":
                raw[name], gamma = kd_value(term, batch, temperature)  # type: ignore[arg-type]
                if term.t2_scaling:  # type: ignore[attr-defined]
                    scale[name] = temperature**2
                extras["temperature"] = temperature
                if gamma is not None:
                    extras["kd_confidence"] = gamma
            elif name == "feat":
                raw[name] = self._features(term, batch, student_features, teacher_features)
            elif name == "attn":
                raw[name] = self._attention(term, batch, student_attentions, teacher_attentions)
            elif name == "reg":
                if student_regressions is None or teacher_regressions is None:
                    raise ValueError(
                        "the 'reg' term needs student_regressions and teacher_regressions "
                        "({name: (N, D)}: boxes of matched queries, depth maps)"
                    )
                raw[name] = regression_value(term, student_regressions, teacher_regressions)  # type: ignore[arg-type]
            elif name == "pd":
                if step % term.every:  # type: ignore[attr-defined]
                    continue
                if student_logits is None and student_fp_regressions is not None:
                    raw[name] = regression_pd_value(
                        student_fp_regressions, student_regressions or {}
                    )
                    continue
                fp_logits = student_fp_logits
                if fp_logits is None:
                    fp_logits = self._fp_logits(student, student_inputs)
                raw[name] = pd_value(term, batch, fp_logits)  # type: ignore[arg-type]
                if term.temperature != 1.0:  # type: ignore[attr-defined]
                    scale[name] = term.temperature**2  # type: ignore[attr-defined]
            elif name == "qk_entropy":
                raw[name] = self._qk_entropy(batch)
            elif name == "rounding":
                if student is None:
                    raise ValueError(
                        "the 'rounding' term needs the student: attach(student) or student="
                    )
                raw[name] = rounding_value(self._rounding_modules(student), term.modules)  # type: ignore[attr-defined]
        terms: dict[str, Tensor] = {}
        weights: dict[str, float | Tensor] = {}
        for name, value in raw.items():
            w = self.term_weight(name, step) * scale.get(name, 1.0)
            if self.balancer is not None and name in self.balancer:
                terms[name], weights[name] = self.balancer.combine(name, value, w)
                extras[f"log_var/{name}"] = self.balancer.log_vars[name].detach()
            else:
                terms[name], weights[name] = w * value, w
        total = sum(terms.values(), start=torch.zeros((), device=self._device(batch, raw)))
        self._calls += 1
        return LossOutput(
            total=total,
            terms=terms,
            raw={n: v.detach() for n, v in raw.items()},
            weights=weights,
            extras=extras,
        )

    @staticmethod
    def _device(batch: Batch, raw: Mapping[str, Tensor]) -> torch.device:
        if batch.student_logits is not None:
            return batch.student_logits.device
        for value in raw.values():
            return value.device
        return torch.device("cpu")

    def _features(self, term, batch, student_feats, teacher_feats) -> Tensor:
        student_feats = (
            student_feats if student_feats is not None else self._captured("feat.student")
        )
        teacher_feats = (
            teacher_feats if teacher_feats is not None else self._captured("feat.teacher")
        )
        if student_feats is None or teacher_feats is None:
            raise ValueError(
                "the 'feat' term needs features: set feat.student_layers / teacher_layers and "
                "attach(student, teacher), or pass student_features and teacher_features"
            )
        pairs = map_layers(len(student_feats), len(teacher_feats), term.layer_map)
        return feature_value(term, batch, student_feats, teacher_feats, pairs, self._project)

    def _attention(self, term, batch, student_maps, teacher_maps) -> Tensor:
        student_maps = student_maps if student_maps is not None else self._captured("attn.student")
        teacher_maps = teacher_maps if teacher_maps is not None else self._captured("attn.teacher")
        if student_maps is None or teacher_maps is None:
            raise ValueError(
                "the 'attn' term needs attention maps: set attn.student_layers / teacher_layers "
                "and attach(student, teacher), or pass student_attentions and teacher_attentions "
                "(e.g. outputs.attentions with output_attentions=True)"
            )
        pairs = map_layers(len(student_maps), len(teacher_maps), term.layer_map)
        return attention_value(term, batch, student_maps, teacher_maps, pairs)

    def _rounding_modules(self, student: nn.Module) -> list[tuple[str, nn.Module]]:
        """The student's integer-grid fake-quant modules, found once per student."""
        if self._rounding_cache is None or self._rounding_cache[0] != id(student):
            patterns = self.active["rounding"].modules  # type: ignore[attr-defined]
            self._rounding_cache = (id(student), int_weight_modules(student, patterns))
        return self._rounding_cache[1]

    def _qk_entropy(self, batch: Batch) -> Tensor:
        queries, keys = self._captured("qk.query"), self._captured("qk.key")
        if queries is None or keys is None:
            raise ValueError("the 'qk_entropy' term captures the student's q/k: attach(student)")
        return qk_entropy_value(queries, keys, self._head_dims, batch.attention_mask)

    def _fp_logits(self, student: nn.Module | None, inputs: Any) -> Tensor:
        if student is None or inputs is None:
            raise ValueError(
                "the 'pd' term needs the student's full-precision prediction: pass "
                "student_fp_logits, or the student (attach(student) or student=) and "
                "student_inputs (the keyword arguments of its forward)"
            )
        with self._student_captures_paused():
            outputs = fp_forward(student, inputs)
        return self.logits_fn(outputs)
