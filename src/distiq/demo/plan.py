"""The plan of ``distiq demo``: which runs, from which recipes, with which settings, and which of
them are already done (the cache).

The demo runs the shipped recipes (``recipes/*.yaml``, the same files ``distiq compress`` takes),
changing only where things go (``output``, ``data.scenes``, ``teacher``) and, with ``--quick``,
how long they run (:data:`QUICK`). Every trained method keeps the same steps, batch size and data
order, because the same changes apply to all of them.

A run is reused when its directory holds ``recipe.yaml`` equal to the planned recipe and a
``results.json`` with an accuracy; a run killed half-way (same recipe, a checkpoint, no result)
is resumed; anything else is run anew (``overwrite``). Nothing here imports torch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import distiq
from distiq.config import ConfigError, load_yaml

TEACHER = "teacher"
# The compression runs, in the order they appear in the report (they run longest first:
# :func:`longest_first`).
RUNS: tuple[str, ...] = (
    "rtn-w4a8",
    "gptq-w4a8",
    "qat-w4a8",
    "qad-w4a8",
    "rtn-w2a16-g64",
    "gptq-w2a16-g64",
    "qat-w2a16-g64",
    "qad-w2a16-g64",
    "kd-small",
)
RECIPES_ENV = "DISTIQ_RECIPES"
TRAINED_METHODS = ("teacher", "qat", "kd", "qad", "qlora-kd")


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is. ``None`` keeps the recipe's own value.

    Attributes:
        scenes: synthetic scenes generated (train + val + test, 80/10/10).
        teacher_steps / student_steps: optimizer steps of the teacher / of each trained method.
        teacher_vision_steps: the teacher's vision-only warm-up steps (short runs skip it: the
            language model needs every step it gets).
        eval_every: validation every N steps while training (teacher and students).
        val_questions / test_questions: questions in validation / the final test evaluation.
        calibration_samples: calibration images for rtn / gptq / activation ranges.
        bench_repeats: timed runs per backend in ``bench``.
        bench_workloads: what ``bench`` times (``language_model``, ``vision``).
    """

    scenes: int
    teacher_steps: int | None = None
    teacher_vision_steps: int | None = None
    student_steps: int | None = None
    eval_every: int | None = None
    val_questions: int | None = None
    test_questions: int | None = None
    calibration_samples: int | None = None
    bench_repeats: int = 20
    bench_workloads: tuple[str, ...] = ("language_model", "vision")


FULL = DemoSettings(scenes=25_000)
# The quick demo checks the whole pipeline in under 2 minutes; its 150-step teacher answers at
# about the blind (question-only) baseline.
QUICK = DemoSettings(
    scenes=2_000,
    teacher_steps=150,
    teacher_vision_steps=0,
    student_steps=12,
    eval_every=60,
    val_questions=120,
    test_questions=300,
    calibration_samples=32,
    bench_repeats=3,
    bench_workloads=("language_model",),
)


def recipes_dir() -> Path:
    """The shipped recipes: ``$DISTIQ_RECIPES`` if set, else the ``recipes`` folder of the
    installed package (a link to the checkout's top-level ``recipes/`` in a source tree; package
    data in a wheel)."""
    env = os.environ.get(RECIPES_ENV)
    path = Path(env) if env else Path(distiq.__file__).resolve().parent / "recipes"
    if not (path / f"{TEACHER}.yaml").is_file():
        raise FileNotFoundError(
            f"the demo's recipes are not in {path} (no {TEACHER}.yaml); reinstall distiq "
            f"(`bash scripts/setup.sh`) or point {RECIPES_ENV} at a folder of recipes"
        )
    return path


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def planned_recipe(
    name: str, settings: DemoSettings, out: Path, scenes: Path, recipes: Path | None = None
) -> dict:
    """The recipe mapping of run ``name`` (``teacher`` or one of :data:`RUNS`): the shipped
    recipe with the demo's paths and ``settings`` applied (not yet validated)."""
    folder = recipes if recipes is not None else recipes_dir()
    path = folder / f"{name}.yaml"
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("a recipe is a YAML mapping", str(path))
    data = copy.deepcopy(data)
    is_teacher = name == TEACHER
    changes: dict[str, Any] = {
        "output": str(run_dir(out, name)),
        "data.scenes": str(scenes),
        "data.val_questions": settings.val_questions,
        "data.test_questions": settings.test_questions,
    }
    if not is_teacher:
        changes["teacher"] = str(run_dir(out, TEACHER))
        changes["calibration.samples"] = settings.calibration_samples
    if is_teacher:
        changes["teacher.vision_steps"] = settings.teacher_vision_steps
    if data.get("method") in TRAINED_METHODS:  # rtn / gptq have no training loop
        changes["train.steps"] = settings.teacher_steps if is_teacher else settings.student_steps
        changes["train.eval_every"] = settings.eval_every
    for key, value in changes.items():
        if value is not None:
            _set(data, key, value)
    return data


def expected_work(recipe: Any) -> float:
    """A rough measure of how long ``recipe`` runs, for ordering only: a trained run's steps,
    twice for a quantized student and twice when a teacher runs beside it (the objective has
    more than the task term); post-training runs count less than one step (gptq above rtn)."""
    if recipe.method not in TRAINED_METHODS:
        return 0.5 if recipe.method == "gptq" else 0.0
    terms = recipe.objective.terms
    with_teacher = any(getattr(terms, name) is not None for name in ("kd", "feat", "attn", "pd"))
    quantized = recipe.quantization is not None
    return float(recipe.train.steps) * (1 + quantized) * (1 + with_teacher)


def longest_first(recipes: dict[str, Any]) -> list[str]:
    """The run names by :func:`expected_work`, largest first (ties keep their order): with the
    runs shared out over worker processes as each frees up, the long ones start early and the
    last to finish is a short one (longest-processing-time-first scheduling)."""
    return sorted(recipes, key=lambda name: -expected_work(recipes[name]))


def run_dir(out: Path, name: str) -> Path:
    """``OUT/teacher`` for the teacher, ``OUT/runs/NAME`` for every other run."""
    return out / TEACHER if name == TEACHER else out / "runs" / name


Action = Literal["reuse", "resume", "run"]


def cache_action(
    directory: Path, recipe_as_run: dict, normalize: Callable[[dict], dict] | None = None
) -> Action:
    """What to do with a run directory, given the planned recipe as the engine writes it to
    ``recipe.yaml`` (``recipe_to_dict`` of the validated recipe).

    ``normalize`` (the recipe's validation and ``recipe_to_dict``) is applied to the stored
    recipe first, so a run written before a key with a default was added to the schema still
    matches; a stored recipe the schema refuses is run anew."""
    from distiq.results import read_records

    stored = directory / "recipe.yaml"
    if not stored.is_file():
        return "run"
    try:
        written = load_yaml(stored)
        same = (normalize(written) if normalize else written) == recipe_as_run
        records = read_records(directory / "results.json")
    except ConfigError:
        return "run"  # a corrupt file: start anew
    if not same:
        return "run"
    if any(r.value is not None for r in records):
        return "reuse"
    if (directory / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "run"
