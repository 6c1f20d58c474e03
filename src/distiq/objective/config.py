"""The objective's configuration: frozen dataclasses read from a recipe's ``objective:`` section.

Validated with :func:`distiq.config.from_dict`, so unknown keys (term names included) and bad
values are all reported in one :class:`distiq.config.ConfigError` with "did you mean"
suggestions. The schema is documented in :mod:`distiq.objective`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from distiq.config import from_dict, to_dict
from distiq.objective.schedules import Schedule

Divergence = Literal["forward_kl", "reverse_kl", "js", "tv", "confidence_aware_kl"]
Tokens = Literal["answer", "all"]


def _common_errors(term: object) -> list[str]:
    errors = []
    weight = term.weight  # type: ignore[attr-defined]
    if weight < 0:
        errors.append(f"weight must be >= 0, got {weight}")
    low, _ = term.schedule.bounds()  # type: ignore[attr-defined]
    if low < 0:
        errors.append("a weight schedule must not go below 0")
    return errors


def _layer_errors(term: object) -> list[str]:
    errors = []
    student, teacher = term.student_layers, term.teacher_layers  # type: ignore[attr-defined]
    if bool(student) != bool(teacher):
        errors.append(
            "give both student_layers and teacher_layers (module-name globs), or neither (then "
            "the training loop passes the features to the objective itself)"
        )
    weights = term.layer_weights  # type: ignore[attr-defined]
    if weights is not None and (not weights or any(w < 0 for w in weights)):
        errors.append("layer_weights must be a non-empty list of numbers >= 0")
    return errors


@dataclass(frozen=True)
class TaskTerm:
    """The task loss: answer-token cross-entropy, or the ``task_loss`` the caller passes."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    label_smoothing: float = 0.0

    def _validate(self) -> list[str]:
        errors = _common_errors(self)
        if not 0.0 <= self.label_smoothing < 1.0:
            errors.append(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        return errors


@dataclass(frozen=True)
class KDTerm:
    """Logit distillation ``τ² · D(p_T^τ ‖ p_S^τ)``."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    temperature_schedule: Schedule | None = None
    beta: float = 0.5
    confidence: float | None = None
    tokens: Tokens = "answer"
    distribution: Literal["softmax", "sigmoid"] = "softmax"
    t2_scaling: bool = True

    def _validate(self) -> list[str]:
        errors = _common_errors(self)
        if self.temperature <= 0:
            errors.append(f"temperature must be > 0, got {self.temperature}")
        if self.temperature_schedule is not None:
            low, _ = self.temperature_schedule.bounds()
            if self.temperature_schedule.kind == "warmup" or low <= 0:
                errors.append(
                    "temperature_schedule values must stay > 0 (use linear or cosine from "
                    "start to end, e.g. {kind: linear, start: 4.0, end: 1.0, steps: 1000})"
                )
        if not 0.0 < self.beta < 1.0:
            errors.append(f"beta must lie strictly between 0 and 1, got {self.beta}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            errors.append(f"confidence must lie in [0, 1], got {self.confidence}")
        return errors


@dataclass(frozen=True)
class FeatureTerm:
    """Hidden-state distillation ``Σ_l w_l · d(φ_l(h_l^S), h_l^T)``."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    distance: Literal["mse", "cosine"] = "mse"
    normalize: Literal["none", "l2", "layer"] = "none"
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    layer_map: tuple[tuple[int, int], ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    output_index: int = 0
    project: bool = True
    visual_weight: float = 1.0
    text_weight: float = 1.0

    def _validate(self) -> list[str]:
        errors = _common_errors(self) + _layer_errors(self)
        if self.visual_weight < 0 or self.text_weight < 0:
            errors.append("visual_weight and text_weight must be >= 0")
        if self.visual_weight == 0 and self.text_weight == 0:
            errors.append("visual_weight and text_weight cannot both be 0")
        return errors


@dataclass(frozen=True)
class AttentionTerm:
    """Attention-map alignment (``KL(A_T ‖ A_S)`` per query row, or MSE)."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    loss: Literal["kl", "mse"] = "kl"
    inputs: Literal["probs", "logits"] = "probs"
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    layer_map: tuple[tuple[int, int], ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    output_index: int = 1

    def _validate(self) -> list[str]:
        return _common_errors(self) + _layer_errors(self)


@dataclass(frozen=True)
class PDTerm:
    """Prediction difference ``D(p_S^fp ‖ p_Sq)``: the student's full-precision path vs its
    quantized path, on the same input (one extra no-grad forward every ``every`` steps)."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    divergence: Divergence = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    tokens: Tokens = "answer"
    every: int = 1

    def _validate(self) -> list[str]:
        errors = _common_errors(self)
        if self.temperature <= 0:
            errors.append(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.beta < 1.0:
            errors.append(f"beta must lie strictly between 0 and 1, got {self.beta}")
        if self.every < 1:
            errors.append(f"every must be >= 1, got {self.every}")
        return errors


@dataclass(frozen=True)
class RegressionTerm:
    """Regression distillation ``Σ_r d(s_r, t_r)``: the student's real-valued outputs pulled
    toward the teacher's — the boxes of matched detection queries, depth maps — each a mean
    over its values; regressions named ``boxes`` ((cx, cy, w, h) fractions) add
    ``giou_weight · mean(1 − GIoU)``."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    loss: Literal["l1", "mse", "smooth_l1"] = "l1"
    giou_weight: float = 1.0

    def _validate(self) -> list[str]:
        errors = _common_errors(self)
        if self.giou_weight < 0:
            errors.append(f"giou_weight must be >= 0, got {self.giou_weight}")
        return errors


@dataclass(frozen=True)
class QKEntropyTerm:
    """EdgeQAT's ``−Σ_h [log(1 + Var(Q_h)) + log(1 + Var(K_h))]``, averaged over layers."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    query_modules: tuple[str, ...] = ("**.q_proj",)
    key_modules: tuple[str, ...] = ("**.k_proj",)
    head_dim: int | None = None

    def _validate(self) -> list[str]:
        errors = _common_errors(self)
        if not self.query_modules or not self.key_modules:
            errors.append("query_modules and key_modules need at least one pattern each")
        if self.head_dim is not None and self.head_dim < 1:
            errors.append(f"head_dim must be >= 1, got {self.head_dim}")
        return errors


@dataclass(frozen=True)
class RoundingTerm:
    """Rounding / range regulariser over the student's fake-quantized weights."""

    weight: float = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    modules: tuple[str, ...] = ("**",)

    def _validate(self) -> list[str]:
        errors = _common_errors(self)
        if not self.modules:
            errors.append("modules needs at least one pattern (default '**': every module)")
        return errors


@dataclass(frozen=True)
class Terms:
    """The objective's terms; a term left out (or null) is off."""

    task: TaskTerm | None = None
    kd: KDTerm | None = None
    feat: FeatureTerm | None = None
    attn: AttentionTerm | None = None
    reg: RegressionTerm | None = None
    pd: PDTerm | None = None
    qk_entropy: QKEntropyTerm | None = None
    rounding: RoundingTerm | None = None

    def active(self) -> dict[str, object]:
        """``{name: term config}`` of the terms that are on, in the documented order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


TERM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Terms))
# Terms that can be negative or are tiny regularisers keep their fixed weights under
# uncertainty balancing (a learned weight on a term that can go below zero would diverge).
UNBALANCED_TERMS: frozenset[str] = frozenset({"qk_entropy", "rounding"})


def _default_terms() -> Terms:
    return Terms(task=TaskTerm())


@dataclass(frozen=True)
class ObjectiveConfig:
    """The ``objective:`` section of a recipe (schema: see :mod:`distiq.objective`)."""

    terms: Terms = field(default_factory=_default_terms)
    balancing: Literal["none", "uncertainty"] = "none"
    shift_labels: bool = True
    ignore_index: int = -100

    def _validate(self) -> list[str]:
        if not self.terms.active():
            return ["no term is on: configure at least one of " + ", ".join(TERM_NAMES)]
        return []

    @classmethod
    def from_dict(
        cls, data: dict, *, source: str | None = None, where: str = ""
    ) -> ObjectiveConfig:
        """Build from a plain dict (a recipe's ``objective:`` mapping); every problem at once."""
        return from_dict(cls, data, source=source, where=where)

    def to_dict(self) -> dict:
        return to_dict(self)
