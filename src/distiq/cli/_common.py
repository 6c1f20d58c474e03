"""What every verb shares: turning errors into messages and exit codes, finding engine functions,
rich progress bars and consoles.

Exit codes: 0 success; 1 a user error (bad config, missing or corrupt file, unwritable output,
missing optional package, a run directory another process is using) — one clear message, no
traceback; 2 a usage error (typer's); 130 interrupted (Ctrl-C or SIGTERM; the run can be
resumed).
Anything else is a bug in distiq and keeps its traceback.

Only typer, rich and the standard library are imported here, so ``distiq --help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from distiq.progress import console, quiet_library_bars, stage, step_progress

logger = logging.getLogger("distiq.cli")

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130

# Arguments and options shared by several verbs.
RecipeArgument = Annotated[
    Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.", show_default=False)
]
RunDirArgument = Annotated[
    Path,
    typer.Argument(
        metavar="RUN_DIR", help="Run directory (made by distiq compress).", show_default=False
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Run directory (default: from the recipe).", show_default=False
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing run directory.")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue a killed run from its last checkpoint.")
]


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code=code)


def _os_message(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def _interrupted_message(exc: BaseException) -> str | None:
    """The message for an interrupted training run, if ``exc`` is one (checked without importing
    distiq.train unless it is already imported: only then can the error come from it)."""
    train = sys.modules.get("distiq.train.state")
    if train is not None and isinstance(exc, train.RunInterrupted):
        return f"{exc}"
    return None


def _in_use_message(exc: BaseException) -> str | None:
    """The message for a run directory another process holds (``RunDirectoryInUse``)."""
    lock = sys.modules.get("distiq.train.lock")
    if lock is not None and isinstance(exc, lock.RunDirectoryInUse):
        return f"{exc}"
    return None


# The optional packages by the extra that installs them (pyproject.toml).
EXTRA_OF_PACKAGE = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "onnxruntime_genai": "genai",
    "bitsandbytes": "qlora",
    "peft": "qlora",
    "tensorboard": "tensorboard",
    "compressed_tensors": "compressed-tensors",
    "gguf": "gguf",
    "datasets": "hf-data",
}


def _missing_package(exc: BaseException) -> str | None:
    """The message for a package that is not installed, if ``exc`` is (or was raised from) a
    ``ModuleNotFoundError`` of a package other than distiq."""
    missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
    if not isinstance(missing, ModuleNotFoundError) or missing.name is None:
        return None
    package = missing.name.split(".")[0]
    if package == "distiq":
        return None  # a missing distiq module is a bug, not the user's environment
    if isinstance(exc, ImportError) and exc is not missing:
        return str(exc)  # distiq's own message, which says what to install
    extra = EXTRA_OF_PACKAGE.get(package)
    how = (
        f"pip install 'distiq[{extra}]'"
        if extra
        else "install it (pip install 'distiq[all]' installs every optional backend)"
    )
    return f"this needs the package {package!r}, which is not installed: {how}"


def _user_message(exc: Exception) -> tuple[str, int] | None:
    """``(message, exit code)`` when ``exc`` is a user error, ``None`` when it is a bug."""
    missing = _missing_package(exc)
    if missing is not None:
        return missing, EXIT_USER_ERROR
    if isinstance(exc, ModuleNotFoundError):
        return None  # a missing distiq module
    if isinstance(exc, FloatingPointError):  # the training loop's NaN/Inf guard
        return str(exc), EXIT_USER_ERROR
    if isinstance(exc, KeyError):  # registry misses: "unknown method 'x' (did you mean ...)"
        return (str(exc.args[0]) if exc.args else repr(exc)), EXIT_USER_ERROR
    if isinstance(exc, ValueError):  # ConfigError is a ValueError
        return str(exc), EXIT_USER_ERROR
    if isinstance(exc, OSError):  # missing files, unwritable paths, full disks
        return _os_message(exc), EXIT_USER_ERROR
    interrupted = _interrupted_message(exc)
    if interrupted is not None:
        return interrupted, EXIT_INTERRUPTED
    in_use = _in_use_message(exc)
    if in_use is not None:
        return in_use, EXIT_USER_ERROR
    return None


def user_errors(func: F) -> F:
    """Decorator for a verb: user errors become ``error: ...`` and exit 1 (see module docstring);
    with ``--verbose`` their traceback is logged too. Other exceptions (bugs) propagate."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True, fg="yellow")
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as exc:
            found = _user_message(exc)
            if found is None:
                raise
            logger.debug("traceback of the error below:", exc_info=True)
            fail(*found)

    return wrapper  # type: ignore[return-value]


def records_table(records: list[Any], title: str | None = None) -> Any:
    """A rich table of result records (the report's main columns)."""
    from rich.table import Table

    from distiq.report.tables import results_table, sort_key

    header, rows = results_table(sorted(records, key=sort_key))
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name in ("name", "method") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def check_run_dir(run_dir: Path) -> None:
    """A run directory must exist and be a directory (checked before any engine import)."""
    if not run_dir.exists():
        raise FileNotFoundError(
            f"run directory not found: {run_dir}; pass a directory made by `distiq compress`"
        )
    if not run_dir.is_dir():
        raise NotADirectoryError(
            f"{run_dir} is a file; pass a run directory made by `distiq compress`"
        )


def check_recipe(recipe: Any) -> None:
    """A recipe path must be an existing file (checked before any engine import)."""
    path = Path(recipe)
    if not path.exists():
        raise FileNotFoundError(f"recipe not found: {path}; pass the path of a recipe YAML file")
    if not path.is_file():
        raise IsADirectoryError(f"recipe {path} is a directory; pass the path of a YAML file")


def run_recipe(
    verb: str, recipe_path: Path, *, out: Path | None, overwrite: bool, resume: bool
) -> Path:
    """``distiq teacher`` / ``distiq compress``: check the recipe file, load and validate it
    (``--out`` replaces its ``output``), run it as a stage with its progress (bars on a
    terminal, plain lines at a steady interval elsewhere: :mod:`distiq.progress`; a teacher's
    vision-only warm-up named as such) and print the run directory and its result records. Bad input fails before any long work (teacher, data and output
    directory are checked first)."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other: choose one")
    check_recipe(recipe_path)
    changes = {"output": out} if out is not None else {}
    quiet_library_bars()
    phase = None
    if verb == "teacher" and _dense_teacher(recipe_path):
        from distiq.train.dense_teacher import check_dense_teacher, load_dense_teacher_recipe
        from distiq.train.dense_teacher import train_dense_teacher as run

        recipe = load_dense_teacher_recipe(recipe_path, **changes)
        check_dense_teacher(recipe, overwrite=overwrite, resume=resume)
    elif verb == "teacher":
        from distiq.demo.recipe import load_teacher_recipe
        from distiq.demo.run import teacher_phase as phase
        from distiq.demo.teacher import train_teacher as run

        recipe = load_teacher_recipe(recipe_path, **changes)
    else:
        from distiq.train import check_recipe as check_run
        from distiq.train import compress as run
        from distiq.train import load_recipe

        recipe = load_recipe(recipe_path, **changes)
        check_run(recipe, overwrite=overwrite, resume=resume)
    name = f"{recipe.method} {recipe.run_name}"
    with stage(name), step_progress(name, phase) as progress:
        run_dir = run(
            recipe,
            overwrite=overwrite,
            resume=resume,
            on_step=progress.on_step,
            on_eval=progress.on_eval,
        )
    show_run(run_dir)
    return run_dir


def _dense_teacher(recipe_path: Path) -> bool:
    """Whether a teacher recipe trains a dense vision model (its ``task`` is segmentation,
    detection or depth: the engine's ``train_dense_teacher``) rather than the demo's VLM."""
    from distiq.config import load_yaml
    from distiq.train.dense_teacher import is_dense_teacher_recipe

    return is_dense_teacher_recipe(load_yaml(recipe_path))


def show_run(run_dir: Path) -> None:
    """Print a run directory's result records (if any) and where it is."""
    from distiq.results import read_records

    records = read_records(Path(run_dir) / "results.json")
    if records:
        console().print(records_table(records, title=str(run_dir)))
    typer.echo(f"run: {run_dir}")
