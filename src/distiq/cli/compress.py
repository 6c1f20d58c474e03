"""``distiq compress RECIPE``: compress a model with rtn | gptq | qat | kd | qad | qlora-kd."""

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
    """Compress a model as a recipe says: rtn | gptq | qat | kd | qad | qlora-kd."""
    run_recipe("compress", recipe, out=out, overwrite=overwrite, resume=resume)
