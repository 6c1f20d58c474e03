"""``distiq teacher RECIPE``: train the demo's built-in teacher (a ``method: teacher`` recipe,
:mod:`distiq.demo.recipe`)."""

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
    """Train the built-in edge VLM teacher on generated scenes (method: teacher)."""
    run_recipe("teacher", recipe, out=out, overwrite=overwrite, resume=resume)
