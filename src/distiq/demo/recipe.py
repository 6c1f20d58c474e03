"""The demo teacher's recipe (``method: teacher``): how the built-in edge VLM is trained from
scratch on the synthetic scenes.

Schema (defaults shown)::

    method: teacher
    output: runs/teacher         # the teacher directory (a Hugging Face model directory + heads)
    seed: 0
    teacher:
      preset: tiny               # edge VLM preset (tiny | small | base)
      model: {}                  # EdgeVLMConfig overrides, e.g. {text_layers: 4}
      heads: true                # segmentation / detection heads on the vision tower
      segmentation_target: category   # category | colour
      weights: {vqa: 1.0, detection: 1.0, segmentation: 1.0, grounding: 1.0, centres: 1.0,
                counts: 0.0}     # each loss term's weight; 0 turns a term (and its head) off
      grounding_layer: null      # language-model layer the grounding head reads (null: the
                                 # second to last)
      side_target: true          # also train "left or right of the previous reference" at the
                                 # question words (distiq.demo.grounding)
      side_layer: null           # the layer that target is read from, with its own head
      pca_stem: true             # start the patch embedding as the PCA whitening of patches
      vision_steps: null         # vision-only warm-up steps (null: 20 % of train.steps)
    data: {scenes: ...}          # distiq.train.recipe.DataConfig
    train: {...}                 # distiq.train.TrainConfig
    eval: {max_new_tokens: 4, batch_images: 64}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from distiq.config import ConfigError, from_dict
from distiq.train.config import TrainConfig
from distiq.train.recipe import EDGE_PRESET_NAMES, DataConfig, EvalConfig, read_recipe_file
from distiq.util import suggest


@dataclass(frozen=True)
class TeacherWeights:
    """Weights of the teacher's training losses (each a mean over its own elements):
    ``vqa`` answer tokens, the ``detection`` and ``segmentation`` heads, and the grounded
    auxiliary heads of :mod:`distiq.demo.grounding` (``grounding``: question words,
    ``centres``: object centres, ``counts``: scene counts in every image token; 0 turns them
    off)."""

    vqa: float = 1.0
    detection: float = 1.0
    segmentation: float = 1.0
    grounding: float = 1.0
    centres: float = 1.0
    counts: float = 0.0

    def _validate(self) -> list[str]:
        return [f"{k} must be >= 0" for k, v in dataclasses.asdict(self).items() if v < 0]


@dataclass(frozen=True)
class EdgeTeacherConfig:
    """How to build and train the built-in edge VLM teacher."""

    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    heads: bool = True
    segmentation_target: Literal["category", "colour"] = "category"
    weights: TeacherWeights = field(default_factory=TeacherWeights)
    grounding_layer: int | None = None
    side_target: bool = True
    side_layer: int | None = None
    pca_stem: bool = True
    vision_steps: int | None = None

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


def _default_train() -> TrainConfig:
    return TrainConfig(steps=300, lr=1e-4, warmup_steps=20, batch_size=32)


@dataclass(frozen=True)
class TeacherRecipe:
    """A teacher recipe (see the module docstring)."""

    method: Literal["teacher"]
    output: Path = Path("runs/teacher")
    name: str | None = None
    seed: int = 0
    teacher: EdgeTeacherConfig = field(default_factory=EdgeTeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_name(self) -> str:
        return self.name or self.output.name

    def _validate(self) -> list[str]:
        if self.data.scenes is None:
            return [
                "the demo teacher trains on a generated scene set: set data.scenes (its "
                "grounded targets and heads read the scenes' annotations)"
            ]
        return []


def teacher_recipe_from_dict(data: dict, *, source: str | None = None) -> TeacherRecipe:
    """Build and validate a :class:`TeacherRecipe` (every problem at once)."""
    if isinstance(data, dict) and data.get("method") not in (None, "teacher"):
        raise ConfigError(
            f"a {data.get('method')!r} recipe compresses a model: run it with "
            "`distiq compress RECIPE`",
            source,
        )
    return from_dict(TeacherRecipe, data, source=source)


def load_teacher_recipe(path: str | os.PathLike, **changes: Any) -> TeacherRecipe:
    """Read a teacher recipe YAML file; ``changes`` replace top-level keys."""
    return teacher_recipe_from_dict(read_recipe_file(path, changes), source=str(path))
