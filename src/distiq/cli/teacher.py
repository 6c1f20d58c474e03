"""``distiq teacher RECIPE``: train a teacher from a ``method: teacher`` recipe — the demo's
built-in edge VLM (:mod:`distiq.demo.recipe`), or, with ``task: segmentation | detection |
depth``, a dense vision model (:mod:`distiq.train.dense_teacher`)."""

from __future__ import annotations

from distiq.cli._common import (
    OutOption,
    OverwriteOption,
    RecipeArgument,
    ResumeOption,
    run_recipe,
    user_errors,
)


@user_errors
def command(
    recipe: RecipeArgument,
    out: OutOption = None,
    overwrite: OverwriteOption = False,
    resume: ResumeOption = False,
) -> None:
    """Train a teacher (method: teacher): the built-in edge VLM on generated scenes, or a dense
    vision model (task: segmentation | detection | depth)."""
    run_recipe("teacher", recipe, out=out, overwrite=overwrite, resume=resume)
