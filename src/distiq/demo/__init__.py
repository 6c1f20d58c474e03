"""The embedded example: the built-in edge VLM trained from scratch on synthetic scenes, then
compressed by the engine with every method, exported, measured and reported (``distiq demo``).

It sits above the engine (``distiq.train``), which imports nothing of it:

- :mod:`distiq.demo.recipe` — the teacher recipe (``method: teacher``);
- :mod:`distiq.demo.teacher` — training that teacher (``train_teacher``) with its heads;
- :mod:`distiq.demo.grounding` — the grounded auxiliary heads its training uses;
- :mod:`distiq.demo.scenes` — the scenes' vocabulary and question-only baseline;
- :mod:`distiq.demo.plan` / :mod:`distiq.demo.jobs` / :mod:`distiq.demo.run` — which runs, in
  which processes, and the whole demo (``run_demo``);
- :mod:`distiq.demo.goals` — what the demo checks its results against.

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from distiq.demo.jobs import default_jobs
from distiq.demo.plan import FULL, QUICK, RUNS, TEACHER, DemoSettings

_LAZY = {
    "run_demo": "distiq.demo.run",
    "train_teacher": "distiq.demo.teacher",
    "load_teacher_training_data": "distiq.demo.teacher",
    "load_teacher_recipe": "distiq.demo.recipe",
    "teacher_recipe_from_dict": "distiq.demo.recipe",
    "TeacherRecipe": "distiq.demo.recipe",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distiq.demo' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["FULL", "QUICK", "RUNS", "TEACHER", "DemoSettings", "default_jobs", *_LAZY]
