"""What distiq's core install (no extras) does where an optional package is missing: the demo's
needs are core dependencies, the benchmark reports its onnxruntime rows as unavailable with the
extra to install, a verb that needs an extra names it, and every extra named anywhere exists.
(scripts/check_core_install.sh runs the demo in a real core-only venv.)"""

import re
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from distiq.cli import _common

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement (``onnxruntime-genai>=0.18``)."""
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_extra_named_anywhere_exists_and_installs_its_packages():
    extras = PYPROJECT["optional-dependencies"]
    for package, extra in _common.EXTRA_OF_PACKAGE.items():
        assert extra in extras, f"{package}: extra {extra!r} is not in pyproject.toml"
        assert package.replace("_", "-") in {_name(r) for r in extras[extra]}, (package, extra)
    named = set()
    for path in (ROOT / "src").rglob("*.py"):
        named |= set(re.findall(r"distiq\[([a-z-]+)\]", path.read_text()))
    assert named <= set(extras), f"extras named in src but missing: {named - set(extras)}"
    everything = re.search(r"distiq\[(.+)\]", extras["all"][0])[1].split(",")
    kept_out = {"all", "dev", "dist"}  # dist is empty: accelerate is core
    assert set(everything) == set(extras) - kept_out


def test_the_demo_needs_no_extra():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    assert "accelerate" in core  # the teacher's data-parallel training
    optional = {p.replace("_", "-") for p in _common.EXTRA_OF_PACKAGE}
    assert not core & optional
    script = (ROOT / "scripts" / "check_core_install.sh").read_text()
    listed = set(re.search(r'optional="([^"]+)"', script)[1].split())
    assert set(_common.EXTRA_OF_PACKAGE) <= listed  # the core venv is checked for all of them


def test_bench_reports_onnxruntime_rows_as_unavailable(tmp_path, monkeypatch):
    from distiq.bench.backends import BACKENDS, export_backends, missing_onnx_packages

    assert missing_onnx_packages() == []
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert missing_onnx_packages() == ["onnxscript", "onnxruntime"]
    reasons = export_backends(None, None, tmp_path, backends=BACKENDS)  # nothing is exported
    reason = "needs onnxscript, onnxruntime: pip install 'distiq[onnx]'"
    assert reasons == {"ort-fp32": reason, "ort-int8": reason, "ort-int4": reason}
    assert list(tmp_path.iterdir()) == []


def test_data_parallel_without_accelerate_says_what_to_install(monkeypatch):
    from distiq.demo.jobs import data_parallel_unavailable
    from distiq.train.config import TrainConfig
    from distiq.train.distributed import setup_distributed

    assert data_parallel_unavailable() is None
    monkeypatch.setitem(sys.modules, "accelerate", None)
    assert "accelerate is not installed" in data_parallel_unavailable()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="pip install accelerate"):
        setup_distributed(TrainConfig(steps=1, batch_size=2))


def _verb(func):
    app = typer.Typer()

    @app.command()
    @_common.user_errors
    def run() -> None:
        func()

    return app


def _missing(name):
    return ModuleNotFoundError(f"No module named '{name}'", name=name)


@pytest.mark.parametrize(
    ("package", "message"),
    [
        (
            "gguf",
            "this needs the package 'gguf', which is not installed: pip install 'distiq[gguf]'",
        ),
        ("compressed_tensors.utils", "pip install 'distiq[compressed-tensors]'"),
        ("bitsandbytes", "pip install 'distiq[qlora]'"),
        ("datasets", "pip install 'distiq[hf-data]'"),
        ("somewhere", "pip install 'distiq[all]' installs every optional backend"),
    ],
)
def test_a_missing_package_names_its_extra(package, message):
    def raise_it():
        raise _missing(package)

    result = CliRunner().invoke(_verb(raise_it), [])
    assert result.exit_code == 1 and message in result.stderr
    assert "Traceback" not in result.output


def test_a_missing_package_behind_another_error():
    from torch.onnx import OnnxExporterError

    def torch_onnx_export():  # what torch.onnx.export raises without onnx
        try:
            raise _missing("onnx")
        except ModuleNotFoundError as exc:
            raise OnnxExporterError("Module onnx is not installed!") from exc

    result = CliRunner().invoke(_verb(torch_onnx_export), [])
    assert result.exit_code == 1
    assert "the package 'onnx', which is not installed: pip install 'distiq[onnx]'" in (
        result.stderr
    )

    def genai():  # distiq's own ImportError, which says what to install, is kept
        try:
            raise _missing("onnxruntime_genai")
        except ModuleNotFoundError as exc:
            raise ImportError("needs onnxruntime-genai (pip install 'distiq[genai]')") from exc

    result = CliRunner().invoke(_verb(genai), [])
    assert result.exit_code == 1
    assert "error: needs onnxruntime-genai (pip install 'distiq[genai]')" in result.stderr

    def distiq_bug():
        raise _missing("distiq.nothing")

    result = CliRunner().invoke(_verb(distiq_bug), [])
    assert isinstance(result.exception, ModuleNotFoundError)  # a bug keeps its traceback
