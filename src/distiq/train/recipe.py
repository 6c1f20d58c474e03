"""Recipes: one YAML file that says what to compress, how, on which data, for how long.

``load_recipe(path)`` reads and validates a recipe with :func:`distiq.config.from_dict`: every
problem (unknown keys with "did you mean", wrong types, bad values, inconsistent sections) is
reported in one :class:`distiq.config.ConfigError`. ``check_recipe(recipe, ...)`` then checks the
file system (teacher directory, data, output) before any long work starts.

Schema (every key but ``method`` and ``teacher`` optional; defaults shown)::

    name: null                   # run name in results (default: the output folder's name)
    method: qad                  # rtn | gptq | qat | kd | qad | qlora-kd
    task: vqa                    # vqa | segmentation | detection | depth, or a section:
    #   name: segmentation
    #   ignore_index: 255        #   segmentation: mask value left out of loss and metric
    #   weight_ce: 1.0           #   segmentation: the task term's CE and Dice weights
    #   weight_dice: 1.0
    #   min_depth: 0.001         #   depth: ground-truth depths that count (metres), and
    #   max_depth: null          #   the clip of predictions
    #   variance_focus: 0.85     #   depth: the scale-invariant log loss's lambda
    #   max_detections: 100      #   detection: detections per image COCO mAP scores
    seed: 0
    output: runs/qad-w4a8        # the run directory (refused if it holds a run, unless
                                 # overwrite / resume)
    teacher: path/to/model       # a Hugging Face model directory (any supported family), or:
    #   path: path/to/model
    #   cache: {path: runs/teacher-cache, top_k: 16}   # run the teacher once over the train
    #                            # split and distil from its stored top-k log-probabilities
    student: teacher             # teacher: a copy of the teacher (default), or a section:
    #   init: teacher            #   teacher | checkpoint | preset
    #   depth: null              #   keep this many decoder layers, evenly spaced (first and
    #   keep_layers: null        #   last kept), or exactly these ([0, 2, 5])
    #   vision_depth: null       #   the same for the vision encoder
    #   vision_keep_layers: null
    #   path: null               #   init: checkpoint -- a smaller Hugging Face model of any
    #                            #   supported family with the teacher's tokenizer
    #   preset: null             #   init: preset -- a built-in edge VLM (tiny | small | base)
    #   model: {}                #     with EdgeVLMConfig overrides, e.g. {text_layers: 2}
    #   copy_teacher_layers: true  #   starting from the teacher's layers where shapes allow
    quantization:                # null for kd; distiq.train.quant_plan has the details
      scheme: null               # W4A16 | W4A8 | W8A8 | W8A16 | W2A16-g64 | NF4 | Q4_0 | Q8_0
      weight: {bits: 4, granularity: per_channel}      # distiq.quant.QuantSpec fields
      activation: {bits: 8, granularity: per_token, dynamic: true}   # or null (A16)
      targets: null              # parts (vision, projector, language_model, lm_head,
                                 # patch_embedding, heads) or module globs; null: the family's
                                 # vision tower, projector and language model
      overrides: {}              # {part or glob: {weight: {fields} | null, activation: ...}}
      ignore: []                 # module globs kept in floating point
    objective: {terms: {task: {}}}   # distiq.objective's schema
    data:                        # exactly one of scenes / vqa / hf / format
      scenes: data/edge-scenes-s0-n25000-64px-xxxxxxxx   # a generated scene set
      generate: null             # {count, image_size, seed}: make that set first if missing
      vqa: null                  # {split: {questions, annotations, images}} (VQA v2 files)
      hf: null                   # a datasets folder (save_to_disk): {path, columns: {...}}
      format: null               # dense tasks: a data set's own format (coco, voc, kitti,
      splits: null               #   bdd100k, cityscapes, ade20k, scannet, folder) and per
                                 #   split its loader's keys (distiq.train.engine_tasks.dense_data)
      segmentation_target: category   # scenes, segmentation: category | colour masks
      val_images: null           # dense tasks: validation / test images (null: all)
      test_images: null
      train_split: train
      val_split: val
      test_split: test
      val_questions: 600         # validation questions during training (null: all)
      test_questions: null       # test questions in the final evaluation (null: all)
      on_bad_record: error       # error | skip: what a malformed record does
      labels: true               # false: train on the teacher's answers, not the human ones
                                 # (distiq.train.pseudo_labels; the test split keeps its own)
    train: {steps: 300, lr: 1.0e-4, batch_size: 32, ...}   # distiq.train.TrainConfig;
                                 # batch_size counts images (each with all its questions)
    calibration: {samples: 256, batch_size: 32}   # images from the train split
    ptq: {block_size: 128, damp: 0.01, act_order: false, static_groups: false}
    init: none                   # qad, qat: none | rtn | gptq (initialise weights by PTQ first)
    selective: null              # qad, EfQAT-style: {fraction: 0.25, samples: 64}
    qlora: {rank: 8, alpha: 16, dropout: 0.0}      # qlora-kd
    eval: {max_new_tokens: 4, batch_images: 64, teacher: true}   # teacher: measure the
                                 # teacher's accuracy when its directory records none
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distiq.config import ConfigError, from_dict, load_yaml, to_dict
from distiq.objective.config import ObjectiveConfig
from distiq.train.config import TrainConfig
from distiq.train.quant_plan import QuantizationConfig
from distiq.train.recipe_task import TaskConfig, task_errors
from distiq.util import suggest

Method = Literal["rtn", "gptq", "qat", "kd", "qad", "qlora-kd"]
METHODS: tuple[str, ...] = ("rtn", "gptq", "qat", "kd", "qad", "qlora-kd")
TRAINED_METHODS: tuple[str, ...] = ("qat", "kd", "qad", "qlora-kd")
DISTILLED_METHODS: tuple[str, ...] = ("kd", "qad", "qlora-kd")
EDGE_PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "base")
MAX_CALIBRATION_SAMPLES = 100_000


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Distil from the teacher's stored outputs: its top-k log-probabilities at the answer
    tokens of every train question, computed once into ``path`` (reused while the teacher, the
    data and these settings are the same), so that the teacher need not run beside the
    student."""

    path: Path
    top_k: int = 16

    def _validate(self) -> list[str]:
        return [] if self.top_k >= 1 else [f"top_k must be >= 1, got {self.top_k}"]


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher is (a Hugging Face model directory), and whether to run it from a
    cache of its outputs."""

    path: Path | None = None
    cache: TeacherCacheConfig | None = None

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


@dataclass(frozen=True)
class StudentConfig:
    """The student: a copy of the teacher (optionally with layers dropped), a smaller
    checkpoint, or a built-in edge VLM from a preset."""

    init: Literal["teacher", "checkpoint", "preset"] = "teacher"
    path: Path | None = None
    depth: int | None = None
    keep_layers: tuple[int, ...] | None = None
    vision_depth: int | None = None
    vision_keep_layers: tuple[int, ...] | None = None
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    copy_teacher_layers: bool = True

    @classmethod
    def _from_config(cls, value: object) -> StudentConfig:
        if value == "teacher":
            return cls()
        if isinstance(value, str | os.PathLike):
            return cls(init="checkpoint", path=Path(value))
        if isinstance(value, dict):
            return from_dict(cls, value, where="student")
        raise ValueError(
            f"expected 'teacher', a model directory or a student section, got {value!r}"
        )

    def _to_config(self) -> dict:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def shallower(self) -> bool:
        """Whether layers of the teacher's copy are dropped."""
        return any(
            v is not None
            for v in (self.depth, self.keep_layers, self.vision_depth, self.vision_keep_layers)
        )

    @property
    def is_teacher_copy(self) -> bool:
        """A full copy of the teacher (what rtn / gptq / qlora-kd compress)."""
        return self.init == "teacher" and not self.shallower

    def _validate(self) -> list[str]:
        errors = []
        if self.init == "checkpoint" and self.path is None:
            errors.append("init: checkpoint needs path: the student's model directory")
        if self.init != "checkpoint" and self.path is not None:
            errors.append("path applies to init: checkpoint")
        if self.init == "preset" and self.preset is None and not self.model:
            errors.append("init: preset needs preset (tiny | small | base) and/or model overrides")
        if self.preset is not None and self.preset not in EDGE_PRESET_NAMES:
            errors.append(
                f"preset {self.preset!r} is unknown{suggest(self.preset, EDGE_PRESET_NAMES)}; "
                f"choose {', '.join(EDGE_PRESET_NAMES)}"
            )
        if self.init != "preset" and (self.preset is not None or self.model):
            errors.append("preset / model apply to init: preset (the built-in edge VLM)")
        if self.init != "teacher" and self.shallower:
            errors.append("depth / keep_layers drop layers of the teacher's copy (init: teacher)")
        for depth, keep in (
            ("depth", "keep_layers"),
            ("vision_depth", "vision_keep_layers"),
        ):
            if getattr(self, depth) is not None and getattr(self, keep) is not None:
                errors.append(f"give {depth} or {keep}, not both")
            if getattr(self, depth) is not None and getattr(self, depth) < 1:
                errors.append(f"{depth} must be >= 1, got {getattr(self, depth)}")
        return errors


@dataclass(frozen=True)
class VQAFiles:
    """One real VQA v2 split: questions JSON, annotations JSON, image folder."""

    questions: Path
    annotations: Path
    images: Path


@dataclass(frozen=True)
class HFColumns:
    """Column names of a Hugging Face ``datasets`` VQA table. ``answers``: a list of human
    answers (strings, or VQA v2's ``{"answer": ...}`` dicts) or one string; ``answer``: the
    answer to train on (default: the most frequent of ``answers``); the ids default to row
    numbers, ``question_type`` to none."""

    image: str = "image"
    question: str = "question"
    answers: str = "answers"
    answer: str | None = None
    question_id: str | None = None
    image_id: str | None = None
    question_type: str | None = None


@dataclass(frozen=True)
class HFDataConfig:
    """A folder written by ``datasets.DatasetDict.save_to_disk`` (or ``Dataset.save_to_disk``
    for one split: then ``split_column`` or all three splits point at it)."""

    path: Path
    columns: HFColumns = field(default_factory=HFColumns)


@dataclass(frozen=True)
class ScenesGeneration:
    """A scene set to generate into ``data.scenes`` when that folder does not exist yet
    (:func:`distiq.data.generate_scenes_at`; a set already there with the same settings is
    reused, anything else is refused)."""

    count: int = 3000
    image_size: int = 64
    seed: int = 0

    def _validate(self) -> list[str]:
        errors = []
        if self.count < 30:
            errors.append(f"count must be >= 30 scenes (got {self.count})")
        if not 32 <= self.image_size <= 1024:
            errors.append(f"image_size must be in [32, 1024] pixels (got {self.image_size})")
        if self.seed < 0:
            errors.append(f"seed must be >= 0 (got {self.seed})")
        return errors


@dataclass(frozen=True)
class DataConfig:
    """Where the data is (a generated scene set, VQA v2 files, a ``datasets`` folder, or — for
    the dense tasks — a data set in its own ``format`` with loader keys per split) and which
    splits."""

    scenes: Path | None = None
    generate: ScenesGeneration | None = None
    vqa: dict[str, VQAFiles] | None = None
    hf: HFDataConfig | None = None
    format: str | None = None
    splits: dict[str, dict[str, Any]] | None = None
    segmentation_target: Literal["category", "colour"] = "category"
    val_images: int | None = None
    test_images: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_questions: int | None = 600
    test_questions: int | None = None
    on_bad_record: Literal["error", "skip"] = "error"
    labels: bool = True

    def _validate(self) -> list[str]:
        errors = []
        if sum(x is not None for x in (self.scenes, self.vqa, self.hf, self.format)) > 1:
            errors.append(
                "give one of scenes (a generated scene set), vqa (VQA v2 files), hf "
                "(a datasets folder) and format (a data set in its own format), not several"
            )
        if self.generate is not None and self.scenes is None:
            errors.append("generate makes a scene set: it needs scenes (the folder to write)")
        if (self.format is None) != (self.splits is None):
            errors.append("format and splits go together: the format, and its keys per split")
        if self.vqa is not None:
            for split in (self.train_split, self.val_split, self.test_split):
                if split not in self.vqa:
                    errors.append(
                        f"vqa has no {split!r} split{suggest(split, list(self.vqa))}; it has "
                        f"{', '.join(self.vqa) or 'none'}"
                    )
        for name in ("val_questions", "test_questions", "val_images", "test_images"):
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
        if self.samples > MAX_CALIBRATION_SAMPLES:
            return [
                f"samples {self.samples} is more than {MAX_CALIBRATION_SAMPLES:,} images; "
                "a few hundred calibrate well"
            ]
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
    """The VQA evaluation: generation settings, and whether to measure the teacher on the test
    split when its directory holds no result for it (its accuracy gives the retention)."""

    max_new_tokens: int = 4
    batch_images: int = 64
    teacher: bool = True


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
    task: TaskConfig = field(default_factory=TaskConfig)
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
        if self.seed < 0:
            errors.append(f"seed must be >= 0, got {self.seed}")
        quantized = method in ("rtn", "gptq", "qat", "qad", "qlora-kd")
        if quantized and self.quantization is None:
            errors.append(f"method {method} needs a quantization section")
        if method == "kd" and self.quantization is not None:
            errors.append("method kd trains a full-precision student: remove quantization")
        terms = self.objective.terms.active()
        if method == "qat" and set(terms) != {"task"}:
            errors.append(
                f"qat trains with the task loss only; objective terms {sorted(terms)} given "
                "(use method qad for distillation terms)"
            )
        distils = {"kd", "reg"} if self.task.dense else {"kd"}
        if method in DISTILLED_METHODS and not distils & set(terms):
            errors.append(
                f"{method} distils the teacher: the objective needs a "
                f"{' or a '.join(sorted(distils))} term"
            )
        errors += task_errors(self, set(terms))
        if method in ("kd", "qlora-kd") and {"pd", "rounding", "qk_entropy"} & set(terms):
            errors.append(
                f"{method}: pd / rounding / qk_entropy act on fake-quantized layers, which this "
                "method does not train"
            )
        if self.teacher.cache is not None:
            if method not in DISTILLED_METHODS:
                errors.append(f"teacher.cache serves distillation; method {method} does not distil")
            if {"feat", "attn"} & set(terms):
                errors.append(
                    "teacher.cache holds the teacher's output distribution only: the feat / attn "
                    "terms need the teacher itself (drop teacher.cache or those terms)"
                )
        if self.init != "none" and method not in ("qad", "qat"):
            errors.append(f"init: {self.init} applies to methods qad and qat only")
        if self.selective is not None and method != "qad":
            errors.append("selective applies to method qad only")
        if method == "kd" and self.student.is_teacher_copy:
            errors.append(
                "kd trains a smaller full-precision student: give student.depth / keep_layers, "
                "a student checkpoint (student.init: checkpoint) or a preset"
            )
        if method in ("rtn", "gptq", "qlora-kd") and not self.student.is_teacher_copy:
            errors.append(
                f"{method} compresses the teacher itself: leave student out (a copy of the teacher)"
            )
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
    if isinstance(data, dict) and data.get("method") == "teacher":
        raise ConfigError(
            "method: teacher trains a teacher; run it with `distiq teacher RECIPE` "
            "(distiq.demo.train_teacher, or distiq.train.dense_teacher.train_dense_teacher for "
            "task: segmentation | detection | depth, in Python)",
            source,
        )
    return from_dict(Recipe, data, source=source)


def read_recipe_file(path: str | os.PathLike, changes: dict[str, Any]) -> dict:
    """A recipe YAML file as a mapping, ``changes`` replacing its top-level keys (paths as
    strings); the error for a file that is not a mapping names it."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("a recipe is a YAML mapping (method:, teacher:, ...)", str(path))
    data.update({k: (str(v) if isinstance(v, Path) else v) for k, v in changes.items()})
    return data


def load_recipe(path: str | os.PathLike, **changes: Any) -> Recipe:
    """Read a recipe YAML file; ``changes`` replace top-level keys (e.g. ``output=...``)."""
    return recipe_from_dict(read_recipe_file(path, changes), source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain-data view of a recipe (``load_recipe`` of its YAML gives it back)."""
    return to_dict(recipe)
