"""The distiq command line: help for every verb, version, light start-up."""

import os
import subprocess
import sys

import pytest

from distiq import __version__
from distiq.cli import app

VERBS = {
    "demo": ["--quick", "--out"],
    "teacher": ["RECIPE", "--out", "--overwrite", "--resume"],
    "compress": ["RECIPE", "--out", "--overwrite", "--resume"],
    "eval": ["DIR", "--recipe", "--out"],
    "export": ["RUN_DIR", "--format", "packed|onnx"],
    "bench": ["RUN_DIR"],
    "report": ["RUN_DIR...", "--out"],
}


def test_root_help_lists_every_verb(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in VERBS:
        assert f" {verb} " in result.output


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_help(runner, verb):
    result = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"Usage: distiq {verb}" in result.output
    for word in VERBS[verb]:
        assert word in result.output


def test_version_and_no_arguments(runner):
    result = runner.invoke(app, ["--version"])
    assert (result.exit_code, result.output) == (0, f"distiq {__version__}\n")
    assert "Usage: distiq" in runner.invoke(app, []).output


def test_cli_import_is_light():
    """``distiq --help`` must not import torch, matplotlib or the engine."""
    code = (
        "import sys, distiq.cli; "
        "heavy = [m for m in ('torch', 'matplotlib', 'distiq.train', 'distiq.report', 'numpy') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_main_makes_openmp_wait_passively_unless_told(monkeypatch, preset):
    from distiq.cli import main

    monkeypatch.setenv("OMP_WAIT_POLICY", "placeholder")  # restored after the test
    if preset is None:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", preset)
    monkeypatch.setattr(sys, "argv", ["distiq", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert os.environ["OMP_WAIT_POLICY"] == (preset or "PASSIVE")
