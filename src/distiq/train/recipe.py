"""Recipes: one YAML file that says what to compress, how, on which data, for how long.

``load_recipe(path)`` reads and validates a recipe with :func:`distiq.config.from_dict`: every
problem (unknown keys with "did you mean", wrong types, bad values, inconsistent sections) is
reported in one :class:`distiq.config.ConfigError`. ``check_recipe(recipe, ...)`` then checks the
file system (teacher directory, data, output) before any long work starts.

Schema (every key but ``method`` optional; defaults shown)::

    name: null                   # run name in results (default: the output folder's name)
    method: qad                  # teacher | rtn | gptq | qat | kd | qad | qlora-kd
    seed: 0
    output: runs/qad-w4a8        # the run directory (refused if it holds a run, unless
                                 # overwrite / resume)
    teacher: runs/teacher        # a teacher directory (a Hugging Face directory written by
                                 # `method: teacher`), or a section:
    #   path: runs/teacher       #   where it is (compression) -- for `method: teacher` the
    #                            #   output is the teacher directory
    #   preset: tiny             #   edge VLM preset to train (tiny | small | base)
    #   model: {}                #   EdgeVLMConfig overrides, e.g. {text_layers: 4}
    #   heads: true              #   detection + segmentation heads (dense supervision)
    #   segmentation_target: category   # category | colour
    #   weights: {vqa: 1.0, detection: 1.0, segmentation: 1.0, grounding: 1.0, centres: 1.0}
    #   grounding_layer: null    #   language-model layer whose output the grounding head reads
    #                            #   (null: the second to last)
    #   side_target: true        #   also train "left or right of the previous reference" at the
    #                            #   question words (distiq.train.grounding)
    #   side_layer: null         #   language-model layer whose output that target is read
    #                            #   from, with its own head (null: grounding_layer's)
    #   pca_stem: true           #   start the ViT patch embedding as the PCA whitening of
    #                            #   training patches (a better-conditioned vision stem)
    student:
      init: teacher              # teacher: a copy of the teacher | preset: a smaller edge VLM
      preset: null               # (init: preset) tiny | small | base
      model: {}                  # EdgeVLMConfig overrides, e.g. {text_layers: 2}
      copy_teacher_layers: true  # (init: preset) start from the teacher's layers where the
                                 # shapes allow (evenly spaced layers when depths differ)
    quantization:                # null for kd / teacher
      weight: {bits: 4, granularity: per_channel}      # distiq.quant.QuantSpec fields
      activation: {bits: 8, granularity: per_token, dynamic: true}   # or null (A16)
      parts: [vision, projector, language_model]      # + heads, lm_head, patch_embedding
      part_overrides: {}         # {part: {weight: {fields} | null, activation: ...}}
      exclude: []                # more module globs kept in full precision
    objective: {terms: {task: {}}}   # distiq.objective's schema
    data:
      scenes: data/edge-scenes-s0-n25000-64px-xxxxxxxx   # a generated scene set, or
      vqa: null                  # {split: {questions, annotations, images}} (real VQA v2)
      train_split: train
      val_split: val
      test_split: test
      val_questions: 600         # validation questions during training (null: all)
      test_questions: null       # test questions in the final evaluation (null: all)
    train: {steps: 300, lr: 1.0e-4, batch_size: 32, ...}   # distiq.train.TrainConfig;
                                 # batch_size counts images (each with all its questions)
    calibration: {samples: 256, batch_size: 32}   # images from the train split
    ptq: {block_size: 128, damp: 0.01, act_order: false, static_groups: false}
    init: none                   # qad, qat: none | rtn | gptq (initialise weights by PTQ first)
    selective: null              # qad, EfQAT-style: {fraction: 0.25, samples: 64}
    qlora: {rank: 8, alpha: 16, dropout: 0.0}      # qlora-kd
    eval: {max_new_tokens: 4, batch_images: 64}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distiq.config import ConfigError, from_dict, load_yaml, to_dict
from distiq.objective.config import ObjectiveConfig
from distiq.quant.spec import QuantSpec
from distiq.train.config import TrainConfig
from distiq.util import suggest

Method = Literal["teacher", "rtn", "gptq", "qat", "kd", "qad", "qlora-kd"]
METHODS: tuple[str, ...] = ("teacher", "rtn", "gptq", "qat", "kd", "qad", "qlora-kd")
TRAINED_METHODS: tuple[str, ...] = ("teacher", "qat", "kd", "qad", "qlora-kd")
DISTILLED_METHODS: tuple[str, ...] = ("kd", "qad", "qlora-kd")
QuantPart = Literal["vision", "projector", "language_model", "lm_head", "patch_embedding", "heads"]
QUANT_PARTS: tuple[str, ...] = (
    "vision",
    "projector",
    "language_model",
    "lm_head",
    "patch_embedding",
    "heads",
)
EDGE_PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "base")


@dataclass(frozen=True)
class TeacherWeights:
    """Weights of the teacher's training losses (each a mean over its own elements):
    ``vqa`` answer tokens, the ``detection`` and ``segmentation`` heads, and the grounded
    auxiliary heads of :mod:`distiq.train.grounding` (``grounding``: question words,
    ``centres``: object centres, ``counts``: scene counts in every image token; synthetic
    scenes only, 0 turns them off)."""

    vqa: float = 1.0
    detection: float = 1.0
    segmentation: float = 1.0
    grounding: float = 1.0
    centres: float = 1.0
    counts: float = 0.0

    def _validate(self) -> list[str]:
        return [f"{k} must be >= 0" for k, v in dataclasses.asdict(self).items() if v < 0]


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher is, and how to train it (``method: teacher``)."""

    path: Path | None = None
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    heads: bool = True
    segmentation_target: Literal["category", "colour"] = "category"
    weights: TeacherWeights = field(default_factory=TeacherWeights)
    grounding_layer: int | None = None
    side_target: bool = True
    side_layer: int | None = None
    pca_stem: bool = True
    # steps that train the vision side alone first (None: 20 % of train.steps; 0: none)
    vision_steps: int | None = None

    @classmethod
    def _from_config(cls, value: object) -> TeacherConfig:
        if isinstance(value, str | os.PathLike):
            return cls(path=Path(value))
        if isinstance(value, dict):
            return from_dict(cls, value, where="teacher")
        raise ValueError(
            f"expected a teacher directory (a string) or a teacher section, got {value!r}"
        )

    def _to_config(self) -> dict:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def _validate(self) -> list[str]:
        errors = []
        if self.preset not in EDGE_PRESET_NAMES:
            errors.append(
                f"preset {self.preset!r} is unknown{suggest(self.preset, EDGE_PRESET_NAMES)}; "
                f"choose {', '.join(EDGE_PRESET_NAMES)}"
            )
        if self.vision_steps is not None and self.vision_steps < 0:
            errors.append(f"vision_steps must be >= 0 (or left out), got {self.vision_steps}")
        if self.side_layer is not None and not self.side_target:
            errors.append("side_layer reads the side target: leave it out with side_target: false")
        return errors


@dataclass(frozen=True)
class StudentConfig:
    """The student: a copy of the teacher, or a (smaller) edge VLM built from a preset."""

    init: Literal["teacher", "preset"] = "teacher"
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    copy_teacher_layers: bool = True

    def _validate(self) -> list[str]:
        errors = []
        if self.init == "preset" and self.preset is None and not self.model:
            errors.append("init: preset needs preset (tiny | small | base) and/or model overrides")
        if self.preset is not None and self.preset not in EDGE_PRESET_NAMES:
            errors.append(
                f"preset {self.preset!r} is unknown{suggest(self.preset, EDGE_PRESET_NAMES)}; "
                f"choose {', '.join(EDGE_PRESET_NAMES)}"
            )
        if self.init == "teacher" and (self.preset is not None or self.model):
            errors.append(
                "preset / model apply to init: preset (a copy of the teacher has its sizes)"
            )
        return errors


@dataclass(frozen=True)
class QuantizationConfig:
    """Per-part quantization (parts are the model adapter's: vision, projector,
    language_model, lm_head, patch_embedding, and the heads), turned into one ``QuantConfig``
    per part."""

    weight: QuantSpec | None = field(default_factory=QuantSpec)
    activation: QuantSpec | None = None
    parts: tuple[QuantPart, ...] = ("vision", "projector", "language_model")
    part_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()

    def _validate(self) -> list[str]:
        errors = []
        if not self.parts:
            errors.append("parts is empty: name at least one part to quantize")
        for part, change in self.part_overrides.items():
            if part not in self.parts:
                errors.append(
                    f"part_overrides: {part!r} is not among parts ({', '.join(self.parts)})"
                    f"{suggest(part, list(self.parts))}"
                )
            if not isinstance(change, dict) or set(change) - {"weight", "activation"}:
                errors.append(
                    f"part_overrides.{part} must be a mapping with keys weight and/or activation"
                )
                continue
            for key, fields in change.items():
                try:
                    self.spec(part, key)
                except (ValueError, ConfigError) as exc:
                    errors.append(f"part_overrides.{part}.{key}: {exc}")
                if fields is not None and not isinstance(fields, dict):
                    errors.append(f"part_overrides.{part}.{key} must be a mapping or null")
        if all(self.spec(p, "weight") is None and self.spec(p, "activation") is None
               for p in self.parts if p in QUANT_PARTS):  # fmt: skip
            errors.append("neither weight nor activation is quantized in any part")
        return errors

    def spec(self, part: str, kind: str) -> QuantSpec | None:
        """The ``weight`` / ``activation`` spec of ``part`` after ``part_overrides``."""
        base = getattr(self, kind)
        change = self.part_overrides.get(part, {})
        if not isinstance(change, dict) or kind not in change:
            return base
        fields = change[kind]
        if fields is None:
            return None
        if not isinstance(fields, dict):
            return base
        merged = {**(to_dict(base) if base is not None else {}), **fields}
        return from_dict(QuantSpec, merged, where=f"part_overrides.{part}.{kind}")

    @property
    def w_bits(self) -> int:
        """Weight bits of the first quantized part (for result records); 16 when none."""
        for part in self.parts:
            spec = self.spec(part, "weight")
            if spec is not None:
                return spec.bits
        return 16

    @property
    def a_bits(self) -> int:
        for part in self.parts:
            spec = self.spec(part, "activation")
            if spec is not None:
                return spec.bits
        return 16

    @property
    def group_size(self) -> int | None:
        for part in self.parts:
            spec = self.spec(part, "weight")
            if spec is not None:
                return spec.group_size
        return None


@dataclass(frozen=True)
class VQAFiles:
    """One real VQA v2 split: questions JSON, annotations JSON, image folder."""

    questions: Path
    annotations: Path
    images: Path


@dataclass(frozen=True)
class DataConfig:
    """Where the data is (a generated scene set, or real VQA v2 files) and which splits."""

    scenes: Path | None = None
    vqa: dict[str, VQAFiles] | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_questions: int | None = 600
    test_questions: int | None = None

    def _validate(self) -> list[str]:
        errors = []
        if (self.scenes is None) == (self.vqa is None):
            errors.append(
                "give exactly one of scenes (a generated scene set) and vqa (VQA v2 files)"
            )
        if self.vqa is not None:
            for split in (self.train_split, self.val_split, self.test_split):
                if split not in self.vqa:
                    errors.append(
                        f"vqa has no {split!r} split{suggest(split, list(self.vqa))}; it has "
                        f"{', '.join(self.vqa) or 'none'}"
                    )
        for name in ("val_questions", "test_questions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name} must be >= 1 or null (all), got {value}")
        return errors


@dataclass(frozen=True)
class CalibrationConfig:
    """PTQ / activation calibration data: ``samples`` images of the train split."""

    samples: int = 256
    batch_size: int = 32

    def _validate(self) -> list[str]:
        if self.samples < 1 or self.batch_size < 1:
            return ["samples and batch_size must be >= 1"]
        return []


@dataclass(frozen=True)
class PTQConfig:
    """GPTQ options (``distiq.ptq.gptq_quantize``)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False


@dataclass(frozen=True)
class SelectiveConfig:
    """EfQAT-style selective training (qad): only the quantizer parameters and the ``fraction``
    most sensitive linear layers (sensitivity measured on ``samples`` train images) train."""

    fraction: float = 0.25
    samples: int = 64

    def _validate(self) -> list[str]:
        errors = []
        if not 0.0 <= self.fraction <= 1.0:
            errors.append(f"fraction must lie in [0, 1], got {self.fraction}")
        if self.samples < 1:
            errors.append("samples must be >= 1")
        return errors


@dataclass(frozen=True)
class QLoRAConfig:
    """QLoRA adapters (peft LoRA on every linear layer but ``lm_head``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def _validate(self) -> list[str]:
        return [] if self.rank >= 1 and self.alpha > 0 else ["rank must be >= 1 and alpha > 0"]


@dataclass(frozen=True)
class EvalConfig:
    """Generation settings of the VQA evaluation."""

    max_new_tokens: int = 4
    batch_images: int = 64


def _default_train() -> TrainConfig:
    return TrainConfig(steps=300, lr=1e-4, warmup_steps=20, batch_size=32)


def _default_objective() -> ObjectiveConfig:
    return ObjectiveConfig()


@dataclass(frozen=True)
class Recipe:
    """A whole recipe (see the module docstring for the YAML schema)."""

    method: Method
    output: Path = Path("runs/run")
    name: str | None = None
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    quantization: QuantizationConfig | None = None
    objective: ObjectiveConfig = field(default_factory=_default_objective)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    init: Literal["none", "rtn", "gptq"] = "none"
    selective: SelectiveConfig | None = None
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_name(self) -> str:
        return self.name or self.output.name

    def _validate(self) -> list[str]:
        errors = []
        method = self.method
        quantized = method in ("rtn", "gptq", "qat", "qad", "qlora-kd")
        if quantized and self.quantization is None:
            errors.append(f"method {method} needs a quantization section")
        if method in ("teacher", "kd") and self.quantization is not None:
            errors.append(f"method {method} trains a full-precision model: remove quantization")
        if method != "teacher" and self.teacher.path is None:
            errors.append(f"method {method} needs teacher: the teacher's directory")
        terms = self.objective.terms.active()
        if method == "qat" and set(terms) != {"task"}:
            errors.append(
                f"qat trains with the task loss only; objective terms {sorted(terms)} given "
                "(use method qad for distillation terms)"
            )
        if method in DISTILLED_METHODS and "kd" not in terms:
            errors.append(f"{method} distils the teacher: the objective needs a kd term")
        if method in ("kd", "qlora-kd") and {"pd", "rounding", "qk_entropy"} & set(terms):
            errors.append(
                f"{method}: pd / rounding / qk_entropy act on fake-quantized layers, which this "
                "method does not train"
            )
        if self.init != "none" and method not in ("qad", "qat"):
            errors.append(f"init: {self.init} applies to methods qad and qat only")
        if self.selective is not None and method != "qad":
            errors.append("selective applies to method qad only")
        if method == "kd" and self.student.init != "preset":
            errors.append("kd trains a smaller full-precision student: set student.init: preset")
        if method in ("rtn", "gptq", "qlora-kd", "qat") and self.student.init != "teacher":
            errors.append(f"{method} compresses the teacher itself: student.init must be teacher")
        if method == "qlora-kd" and self.quantization is not None:
            weight = self.quantization.weight
            if weight is None or weight.format not in ("nf4", "int"):
                errors.append(
                    "qlora-kd re-quantizes merged weights: give an nf4 or int weight spec"
                )
            if self.quantization.activation is not None:
                errors.append("qlora-kd quantizes weights only: set activation: null")
        return errors


def recipe_from_dict(data: dict, *, source: str | None = None) -> Recipe:
    """Build and validate a :class:`Recipe` from a plain mapping (every problem at once)."""
    return from_dict(Recipe, data, source=source)


def load_recipe(path: str | os.PathLike, **changes: Any) -> Recipe:
    """Read a recipe YAML file; ``changes`` replace top-level keys (e.g. ``output=...``)."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("a recipe is a YAML mapping (method:, teacher:, ...)", str(path))
    data.update({k: (str(v) if isinstance(v, Path) else v) for k, v in changes.items()})
    return recipe_from_dict(data, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain-data view of a recipe (``load_recipe`` of its YAML gives it back)."""
    return to_dict(recipe)
