"""``distiq teacher RECIPE``: train a full-precision teacher (a ``method: teacher`` recipe)."""

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
    """Train a full-precision teacher from a recipe (method: teacher)."""
    run_recipe("teacher", recipe, out=out, overwrite=overwrite, resume=resume)
