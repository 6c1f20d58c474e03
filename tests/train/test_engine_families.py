"""The engine on every supported family, as a user runs it: a tiny checkpoint of each family
(built from a config, saved with its processor and tokenizer, tests/models/conftest.py) and a few
dozen questions in VQA v2 files, then ``distiq compress`` with rtn, gptq, qat, qad and kd (a
shallower student), ``distiq eval``, ``distiq export --format packed`` and reloading the run.

A family that cannot do a step is listed in ``CANNOT`` with the reason (none is today). The kd
student is a float model: packing it is refused with a clear message, and the run directory is
its checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distiq.cli import app
from distiq.results import read_records


def _load(file: str, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


vqa_files = _load("vqa_files.py", "distiq_train_test_vqa_files")
_family_models = vqa_files.family_models
_write_split = vqa_files.write_split
FAMILIES = _family_models().FAMILIES
METHODS = ("rtn", "gptq", "qat", "qad", "kd")
CANNOT: dict[tuple[str, str], str] = {}  # (family, method) -> why it cannot run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    return {
        "vqa": {
            "train": _write_split(root, "train", 12, 100),
            "val": _write_split(root, "val", 3, 200),
            "test": _write_split(root, "test", 4, 300),
        }
    }


_CHECKPOINTS: dict[str, Path] = {}


@pytest.fixture
def checkpoint(family, tmp_path_factory):
    """The family's tiny checkpoint directory (built once)."""
    if family not in _CHECKPOINTS:
        torch.manual_seed(0)
        model, tokenizer, processor = _family_models().build_family(family)
        path = tmp_path_factory.mktemp(f"{family}-model")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        processor.save_pretrained(path)
        _CHECKPOINTS[family] = path
    return _CHECKPOINTS[family]


def _recipe(method: str, teacher: Path, output: Path, data: dict) -> dict:
    recipe = {
        "method": method,
        "teacher": str(teacher),
        "output": str(output),
        "data": {**data, "val_questions": 4, "test_questions": 6},
        "train": {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 1, "log_every": 1},
        "calibration": {"samples": 4, "batch_size": 4},
        "eval": {"max_new_tokens": 3, "batch_images": 4},
    }
    if method != "kd":
        recipe["quantization"] = {"scheme": "W4A8"}  # per-channel: every width works
    if method in ("qad", "kd"):
        recipe["objective"] = {"terms": {"task": {}, "kd": {"temperature": 2.0}}}
    if method == "qad":
        recipe["objective"]["terms"]["pd"] = {"weight": 0.5}
    if method == "kd":
        recipe["student"] = {"depth": 1}
    return recipe


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compress_eval_export_reload(family, method, checkpoint, data, tmp_path):
    from distiq.export import load_packed
    from distiq.models import load
    from distiq.train.runs import load_compressed

    if (family, method) in CANNOT:
        pytest.xfail(CANNOT[family, method])
    runner = CliRunner()
    run = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(method, checkpoint, run, data)))
    result = runner.invoke(app, ["compress", str(recipe_file)])
    assert result.exit_code == 0, result.output
    (record,) = read_records(run / "results.json")
    assert record.method == method and 0 <= record.value <= 100
    assert record.extra["teacher_value"] is not None  # measured: a checkpoint records none
    assert record.extra["num_questions"] >= 6
    if method == "kd":
        student = json.loads((run / "config.json").read_text())
        teacher = json.loads((checkpoint / "config.json").read_text())
        assert student["text_config"]["num_hidden_layers"] == 1
        assert teacher["text_config"]["num_hidden_layers"] == 2
        assert (record.w_bits, record.a_bits) == (16, 16)
    else:
        assert (record.w_bits, record.a_bits) == (4, 8)

    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    (again,) = read_records(run / "results.json")
    assert again.value == pytest.approx(record.value)

    result = runner.invoke(app, ["export", str(run), "--format", "packed"])
    model, adapter, _ = load_compressed(run)
    if method == "kd":  # a float student: nothing to pack, said so; the run is its checkpoint
        assert result.exit_code == 1 and "holds a float model" in result.stderr
        assert type(load(run).model) is type(getattr(model, "vlm", model))
        return
    assert result.exit_code == 0, result.output
    packed_model = load_packed(run / "export" / "packed")
    samples = _family_models().vqa_samples(2)
    batch = adapter.build_inputs(samples)
    with torch.no_grad():
        reference = getattr(model, "vlm", model)(**batch).logits
        loaded = getattr(packed_model, "vlm", packed_model)(**batch).logits
    torch.testing.assert_close(loaded, reference, atol=1e-4, rtol=1e-4)
