"""The verbs that call the engine, export and bench: input checks before any work, exit codes,
and the shared error handling."""

import pytest
import typer
from typer.testing import CliRunner

from distiq.cli import _common, app
from distiq.config import ConfigError


@pytest.mark.parametrize("verb", ["teacher", "compress"])
def test_recipe_verbs_check_their_recipe_first(runner, tmp_path, verb):
    result = runner.invoke(app, [verb, str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert f"error: recipe not found: {tmp_path / 'missing.yaml'}" in result.stderr
    result = runner.invoke(app, [verb, str(tmp_path)])
    assert result.exit_code == 1 and "is a directory" in result.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: qad\n")
    result = runner.invoke(app, [verb, str(recipe), "--overwrite", "--resume"])
    assert result.exit_code == 1 and "--overwrite and --resume exclude each other" in result.stderr


@pytest.mark.parametrize(
    "args", [["eval"], ["bench"], ["export", "--format", "packed"], ["export", "-f", "onnx"]]
)
def test_run_dir_verbs_check_the_run_dir_first(runner, tmp_path, args):
    result = runner.invoke(app, [*args, str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert f"run directory not found: {tmp_path / 'missing'}" in result.stderr
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, [*args, str(tmp_path / "file")])
    assert result.exit_code == 1 and "is a file" in result.stderr


def test_export_format_is_checked(runner, tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "tflite"])
    assert result.exit_code == 2 and "'tflite' is not one of" in result.output
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "--format" in result.output


def _verb_app(func):
    """A one-verb app running ``func`` under ``user_errors``."""
    verb = typer.Typer()

    @verb.command()
    @_common.user_errors
    def run() -> None:
        func()

    return verb


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            ConfigError(["a: unknown key (did you mean 'b'?)", "c: required"], "r.yaml"),
            "2 problems",
        ),
        (FileNotFoundError("teacher directory not found: t/"), "teacher directory not found: t/"),
        (PermissionError(13, "Permission denied", "/x"), "Permission denied: /x"),
        (KeyError("unknown method 'qadd' (did you mean 'qad'?)"), "unknown method 'qadd'"),
        (FloatingPointError("step 7: loss term 'kd' is nan"), "step 7: loss term 'kd' is nan"),
        (ModuleNotFoundError("no onnx", name="onnx"), "needs the package 'onnx'"),
    ],
)
def test_user_errors_are_one_message_and_exit_1(error, message):
    def raise_it():
        raise error

    result = CliRunner().invoke(_verb_app(raise_it), [])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_interrupt_exits_130_and_bugs_keep_their_traceback():
    def interrupt():
        raise KeyboardInterrupt

    result = CliRunner().invoke(_verb_app(interrupt), [])
    assert result.exit_code == 130 and "interrupted" in result.stderr

    def bug():
        return 1 / 0

    result = CliRunner().invoke(_verb_app(bug), [])
    assert isinstance(result.exception, ZeroDivisionError)  # not dressed up as a user error

    def missing_distiq_module():
        raise ModuleNotFoundError("gone", name="distiq.nothing")

    result = CliRunner().invoke(_verb_app(missing_distiq_module), [])
    assert isinstance(result.exception, ModuleNotFoundError)


def test_progress_callbacks(capsys):
    class Info:
        def __init__(self, step):
            self.step, self.steps, self.total = step, 4, 1.0 / step

    with _common.step_progress("qad") as progress:
        for step in range(1, 5):
            progress.on_step(Info(step))
        progress.on_eval(4, {"vqa_accuracy": 91.25, "vqa_accuracy/question_type/count": 80.0})
    err = capsys.readouterr().err
    assert "4/4" in err and "loss 0.25" in err
    assert "step 4: validation vqa_accuracy 91.25" in err and "question_type" not in err
