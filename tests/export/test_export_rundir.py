"""Run directories (as distiq.train writes them) -> real quantized layers -> packed / ONNX."""

import copy
import json

import pytest
import torch

from distiq.export import RunDirError, export_run, load_packed, load_run
from distiq.quant import PerGroup, QuantSpec


def _write_run(deploy, path, weight, activation=None):
    from distiq.train.runs import bake_quantized, save_run_model

    model, adapter = deploy.tiny_vlm()
    data = deploy.samples(3)
    student = deploy.quantized(model, adapter, weight, activation, data)
    baked = copy.deepcopy(student)
    save_run_model(path, baked, adapter, bake_quantized(baked, method="qat"))
    return student, adapter, adapter.build_inputs(data)


@pytest.fixture(scope="module")
def w8a8_run(deploy, tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "qat-w8a8"
    student, adapter, batch = _write_run(deploy, path, deploy.W8, deploy.A8)
    return path, student, adapter, batch


def test_load_run_is_the_evaluated_model(w8a8_run):
    path, student, _, batch = w8a8_run
    run = load_run(path)
    assert run.quantized and len(run.modules) > 0
    with torch.no_grad():
        expected = student(**batch).logits
        torch.testing.assert_close(run.model(**batch).logits, expected, atol=0, rtol=0)


def test_export_run_packed_and_onnx(w8a8_run):
    path, student, _, batch = w8a8_run
    packed = export_run(path, "packed")
    assert packed == path / "export" / "packed"
    with torch.no_grad():
        got = load_packed(packed)(**batch).logits
        torch.testing.assert_close(got, student(**batch).logits, atol=0, rtol=0)
    verification = json.loads((packed / "manifest.json").read_text())["verification"]
    assert verification["identical"] and verification["samples"] == 4
    onnx_dir = export_run(path, "onnx")
    assert onnx_dir.name == "onnx-int8"  # auto: every layer fits int8
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and "language_model" in manifest["graphs"]
    parity = manifest["verification"]
    assert parity["answers_identical"] and parity["max_abs_logit_diff"] <= 1e-3


def test_float_run(deploy, tmp_path):
    model, adapter = deploy.tiny_vlm()
    model.save_pretrained(tmp_path / "teacher")
    adapter.save_pretrained(tmp_path / "teacher")
    run = load_run(tmp_path / "teacher")
    assert not run.quantized
    with pytest.raises(ValueError, match="float model"):
        export_run(tmp_path / "teacher", "packed")
    assert not (tmp_path / "teacher" / "export").exists()
    assert export_run(tmp_path / "teacher", "onnx").name == "onnx-fp32"


def test_bad_run_dirs(deploy, tmp_path, w8a8_run):
    with pytest.raises(RunDirError, match="does not exist"):
        export_run(tmp_path / "missing", "packed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="holds no model"):
        export_run(tmp_path / "empty", "onnx")
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(ValueError, match="format must be one of"):
        export_run(w8a8_run[0], "tflite")
    broken = tmp_path / "broken"
    _write_run(deploy, broken, deploy.W8)
    (broken / "quantization.json").write_text("{ truncated")
    with pytest.raises(RunDirError, match="not valid JSON"):
        export_run(broken, "packed")
    (broken / "quantization.json").write_text(
        json.dumps({"version": 1, "modules": {"model.lm_head": {"weight": {"bits": 9}}}})
    )
    with pytest.raises(RunDirError, match="outside 2-8"):
        export_run(broken, "packed")
    assert not (broken / "export").exists()


def test_three_bit_run_to_onnx_is_refused_before_writing(deploy, tmp_path):
    path = tmp_path / "w3"
    _write_run(deploy, path, QuantSpec(bits=3, granularity=PerGroup(32)))
    with pytest.raises(ValueError, match="3-bit weights are not supported"):
        export_run(path, "onnx", precision="int4")
    with pytest.raises(ValueError, match="fit neither ONNX int8 nor int4"):
        export_run(path, "onnx")  # auto does not fall back to float32 silently
    assert not (path / "export").exists()
    assert export_run(path, "onnx", precision="fp32").name == "onnx-fp32"  # asked for: fine
    packed = export_run(path, "packed")  # the packed format holds 3-bit codes
    assert json.loads((packed / "manifest.json").read_text())["modules"]


def test_out_replaces_only_an_earlier_export(w8a8_run, tmp_path):
    """--out never deletes a user's folder, the run, or a folder holding the run; it replaces
    an earlier distiq export, and only once the new one is complete and verified."""
    path = w8a8_run[0]
    run_files = sorted(p.name for p in path.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a distiq export"):
        export_run(path, "packed", out=mine)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    for out, what in ((path, "the run directory itself"), (path.parent, "a parent of the run")):
        with pytest.raises(ValueError, match=what):
            export_run(path, "packed", out=out)
    assert sorted(p.name for p in path.iterdir()) == run_files
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_run(path, "packed", out=tmp_path / "a-file")
    out = export_run(path, "packed", out=tmp_path / "exports" / "p")
    first = (out / "manifest.json").read_bytes()
    assert export_run(path, "packed", out=out) == out  # an earlier export: replaced
    assert (out / "manifest.json").read_bytes() == first  # (the same model, the same bytes)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["p"]  # no leftovers


def test_failed_export_leaves_the_previous_one(w8a8_run, tmp_path, monkeypatch):
    import distiq.export.run_export as run_export

    path = w8a8_run[0]
    out = export_run(path, "packed", out=tmp_path / "p")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("verification failed")

    monkeypatch.setattr(run_export, "_verify_packed", broken)
    with pytest.raises(RuntimeError, match="verification failed"):
        export_run(path, "packed", out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # the staging folder is gone
    with pytest.raises(RuntimeError):
        export_run(path, "packed", out=tmp_path / "new" / "deeper")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # folders made for it: gone


def test_run_files_must_stay_inside_the_run(deploy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = tmp_path / "run"
    _write_run(deploy, path, deploy.W8)
    state = path / "quant_state.safetensors"
    (outside / "state.safetensors").write_bytes(state.read_bytes())
    state.unlink()
    state.symlink_to(outside / "state.safetensors")
    with pytest.raises(RunDirError, match="leads outside"):
        load_run(path)
    state.unlink()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "../outside/model.safetensors"}})
    )
    with pytest.raises(RunDirError, match="plain name"):
        export_run(path, "packed")
    assert not (path / "export").exists()
