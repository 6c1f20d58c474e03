"""The engine on dense vision models, as a user runs it: a tiny scene set (class masks, COCO
boxes, depth maps), a tiny checkpoint of each dense family (SegFormer and RT-DETR trained for a
few steps by ``distiq teacher``, the others built from config), then ``distiq compress`` with
rtn, gptq, qat and qad, ``distiq eval``, reloading the run, ``distiq export --format onnx``
(int8 QDQ, scored on the test split in onnxruntime) and ``distiq bench``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distiq.cli import app
from distiq.results import read_records

FAMILIES = {
    "segformer": "segmentation",
    "rt_detr": "detection",
    "detr": "detection",
    "depth_anything": "depth",
}
TRAINED = ("segformer", "rt_detr")  # teachers trained by distiq teacher (the others: random)
SMALLER = {  # the families' small configs, smaller still where a test needs no more
    "rt_detr": {
        "encoder_hidden_dim": 16, "encoder_in_channels": [16, 16, 16],
        "decoder_in_channels": [16, 16, 16], "d_model": 16, "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32, "num_queries": 10,
        "backbone_config": {"embedding_size": 8, "hidden_sizes": [8, 16, 16, 16]},
    },
}  # fmt: skip
STATIC_A8 = {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "minmax"}
METHODS = ("rtn", "gptq", "qat", "qad")
IMAGE = 32


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from distiq.data import generate_scenes

    root = tmp_path_factory.mktemp("dense-scenes")
    return generate_scenes(root, count=30, image_size=IMAGE, workers=1)


def _data(scenes) -> dict:
    return {"scenes": str(scenes.root), "val_images": 2, "test_images": 3}


_TEACHERS: dict[str, Path] = {}


@pytest.fixture
def teacher(dense_family, scenes, tmp_path_factory, runner):
    """The family's tiny teacher directory (built once): trained for a few steps with ``distiq
    teacher`` (``TRAINED``), or built from the family's small config."""
    from distiq.models import build_dense

    if dense_family in _TEACHERS:
        return _TEACHERS[dense_family]
    path = tmp_path_factory.mktemp(f"{dense_family}-teacher")
    task = FAMILIES[dense_family]
    if dense_family in TRAINED:
        recipe = {
            "method": "teacher",
            "task": task,
            "output": str(path),
            "model": {
                "family": dense_family,
                "image_size": IMAGE,
                "config": SMALLER.get(dense_family, {}),
            },
            "data": _data(scenes),
            "train": {"steps": 3, "batch_size": 4, "lr": 2.0e-3, "warmup_steps": 1},
            "eval": {"batch_images": 4},
        }
        recipe_file = path.parent / f"{dense_family}-teacher.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        result = runner.invoke(app, ["teacher", str(recipe_file), "--overwrite"])
        assert result.exit_code == 0, result.output
        (record,) = read_records(path / "results.json")
        metric = {"segmentation": "miou", "detection": "map"}[task]
        assert (record.method, record.task, record.metric) == ("teacher", task, metric)
        assert record.extra["num_images"] == 3 and 0 <= record.value <= 100
    else:
        meta = scenes.read_meta()
        classes = meta["categories"] if task == "detection" else []
        model, adapter = build_dense(
            dense_family, num_labels=max(1, len(classes)), image_size=IMAGE, class_names=classes
        )
        model.save_pretrained(path)
        adapter.save_pretrained(path)
    _TEACHERS[dense_family] = path
    return path


def _recipe(method: str, task: str, teacher: Path, output: Path, scenes, bits: int = 4) -> dict:
    recipe = {
        "method": method,
        "task": task,
        "teacher": str(teacher),
        "output": str(output),
        "data": _data(scenes),
        "quantization": {
            "weight": {"bits": bits, "symmetric": True, "granularity": "per_channel(0)"},
            "activation": STATIC_A8,  # static: what ONNX QDQ holds
        },
        "train": {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 1, "log_every": 1},
        "calibration": {"samples": 4, "batch_size": 4},
        "eval": {"batch_images": 4},
    }
    if method == "qad":
        terms = {"task": {}, "feat": {"weight": 0.1}, "pd": {"weight": 0.5}}
        if task != "depth":
            terms["kd"] = {"temperature": 2.0}
        if task != "segmentation":
            terms["reg"] = {}
        recipe["objective"] = {"terms": terms}
    return recipe


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dense_family", FAMILIES)
def test_compress_eval_reload(dense_family, method, teacher, scenes, tmp_path, runner):
    from distiq.train import load_recipe
    from distiq.train.engine_tasks import engine_task
    from distiq.train.runs import load_compressed

    task = FAMILIES[dense_family]
    run = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(method, task, teacher, run, scenes)))
    result = runner.invoke(app, ["compress", str(recipe_file)])
    assert result.exit_code == 0, result.output
    (record,) = read_records(run / "results.json")
    metric = {"segmentation": "miou", "detection": "map", "depth": "delta1"}[task]
    assert (record.method, record.task, record.metric) == (method, task, metric)
    assert (record.w_bits, record.a_bits) == (4, 8) and 0 <= record.value <= 100
    assert record.extra["num_images"] == 3 and record.extra["teacher_value"] is not None
    manifest = json.loads((run / "quantization.json").read_text())
    assert manifest["modules"] and all(m["activation"] for m in manifest["modules"].values())
    if method in ("qat", "qad"):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        terms = next(x for x in lines if x["kind"] == "train")["terms"]
        expected = {"task"} if method == "qat" else {"task", "feat", "pd"}
        if method == "qad":
            expected |= {"kd"} if task != "depth" else set()
            expected |= {"reg"} if task != "segmentation" else set()
        assert expected <= set(terms)  # every objective term logged ...
        assert any(name.startswith("task/") for name in terms)  # ... and the task's parts

    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    (again,) = read_records(run / "results.json")
    assert again.value == pytest.approx(record.value)

    model, adapter, _ = load_compressed(run)
    recipe = load_recipe(run / "recipe.yaml")
    engine_of = engine_task(recipe)
    test = engine_of.load_test(recipe, adapter)
    evaluation = engine_of.evaluate(engine_of.engine_for(model, adapter, test), test, recipe)
    assert evaluation.value == pytest.approx(record.value)
    if task != "detection":
        rows = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all("image_id" in row for row in rows)


@pytest.mark.parametrize("dense_family", FAMILIES)
def test_onnx_export_scores_like_pytorch_and_benches(
    dense_family, teacher, scenes, tmp_path, runner
):
    """A W8A8 qad run exports as int8 QDQ at its fixed input size, loads in onnxruntime and
    scores the test split within 0.1 of the PyTorch model; ``distiq bench`` times it against
    its fp32 export."""
    from distiq.export.onnx_dense import OrtDenseEngine, read_dense_manifest
    from distiq.train import load_recipe
    from distiq.train.engine_tasks import engine_task

    task = FAMILIES[dense_family]
    run = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe("qad", task, teacher, run, scenes, bits=8)))
    assert runner.invoke(app, ["compress", str(recipe_file)]).exit_code == 0
    result = runner.invoke(app, ["export", str(run), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    export = run / "export" / "onnx-int8"
    manifest = read_dense_manifest(export)
    assert manifest["task"] == task and manifest["input"]["shape"] == ["batch", 3, IMAGE, IMAGE]
    assert any(":int8:" in k or ":uint8:" in k for k in manifest["layers"])
    assert "verification" in manifest

    (record,) = read_records(run / "results.json")
    recipe = load_recipe(run / "recipe.yaml")
    engine_of = engine_task(recipe)
    engine = OrtDenseEngine(export)
    test = engine_of.load_test(recipe, engine.adapter)
    onnx_value = engine_of.evaluate(engine, test, recipe).value
    assert onnx_value == pytest.approx(record.value, abs=0.1)

    if dense_family != "segformer":
        return  # distiq bench: timed on one family (the others export and score above)
    result = runner.invoke(app, ["bench", str(run), "--repeats", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    (benched,) = read_records(run / "results.json")
    timings = benched.extra["bench"]["dense"]
    assert timings["ort-int8"]["available"] and timings["ort-fp32"]["available"]
    assert benched.latency_backend.startswith("ort-int8") and benched.latency_ms > 0
    assert timings["ort-int8"]["max_abs_diff"] is not None


@pytest.mark.parametrize("dense_family", ["segformer"])
def test_kd_distils_a_smaller_checkpoint_through_feature_projections(
    dense_family, teacher, scenes, tmp_path, runner
):
    """A narrower SegFormer checkpoint learns from the teacher (kd): per-pixel KL and the
    stages' feature maps through learned projections (widths 8/16/32 against 16/32/64)."""
    from distiq.models import build_dense, load_dense

    _, teacher_adapter = load_dense(teacher)
    small = tmp_path / "small"
    model, adapter = build_dense(
        "segformer", num_labels=teacher_adapter.num_labels, image_size=IMAGE,
        class_names=teacher_adapter.class_names, config={"hidden_sizes": [8, 16, 32]},
    )  # fmt: skip
    model.save_pretrained(small)
    adapter.save_pretrained(small)
    run = tmp_path / "run"
    recipe = _recipe("kd", "segmentation", teacher, run, scenes)
    del recipe["quantization"]
    recipe["student"] = {"init": "checkpoint", "path": str(small)}
    recipe["objective"] = {"terms": {"task": {}, "kd": {"temperature": 2.0}, "feat": {}}}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["compress", str(recipe_file)])
    assert result.exit_code == 0, result.output
    (record,) = read_records(run / "results.json")
    assert (record.method, record.w_bits, record.params) == ("kd", 16, model.num_parameters())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"task", "kd", "feat"} <= set(next(x for x in lines if x["kind"] == "train")["terms"])


def test_shipped_dense_recipes_load_and_name_their_families():
    from distiq.models import dense_families
    from distiq.train import load_recipe
    from distiq.train.dense_teacher import load_dense_teacher_recipe

    root = Path(__file__).resolve().parents[2] / "recipes"
    families = dense_families()
    for name, task in [("segformer", "segmentation"), ("rtdetr", "detection"), ("depth", "depth")]:
        teacher = load_dense_teacher_recipe(root / f"teacher-{name}.yaml")
        assert teacher.task.name == task and families[teacher.model.family].task == task
        student = load_recipe(root / f"qad-w4a8-{name}.yaml")
        assert (student.method, student.task.name) == ("qad", task)
        assert student.train.best_metric == {"segmentation": "miou", "detection": "map"}.get(
            task, "delta1"
        )
        # both make (or reuse) the same scene set, so they run from a fresh clone in any order
        assert teacher.data.generate is not None
        assert (student.data.scenes, student.data.generate) == (
            teacher.data.scenes,
            teacher.data.generate,
        )
        activation = student.quantization.activation  # static: what the ONNX export holds
        assert (activation.bits, activation.dynamic) == (8, False)


def test_dense_recipes_refuse_what_only_vqa_has(tmp_path):
    from distiq.config import ConfigError
    from distiq.train.recipe import recipe_from_dict

    base = {"method": "qad", "task": "depth", "teacher": "t", "quantization": {"scheme": "W4A8"}}
    with pytest.raises(ConfigError, match="depth has no class distribution") as error:
        recipe_from_dict({**base, "objective": {"terms": {"task": {}, "kd": {}}}})
    assert "needs a kd or a reg term" not in str(error.value)
    with pytest.raises(ConfigError, match="needs a kd or a reg term"):
        recipe_from_dict({**base, "objective": {"terms": {"task": {}}}})
    with pytest.raises(ConfigError, match="the attn term compares VLM attention maps"):
        recipe_from_dict(
            {**base, "task": "segmentation", "objective": {"terms": {"kd": {}, "attn": {}}}}
        )
    with pytest.raises(ConfigError, match="the reg term distils dense outputs"):
        recipe_from_dict({**base, "task": "vqa", "objective": {"terms": {"kd": {}, "reg": {}}}})


def test_a_dense_teacher_recipe_generates_its_scene_set(tmp_path, runner):
    """data.generate writes the scene set into data.scenes on first use (then it is reused);
    without it a missing folder is named with the key that would make it."""
    folder = tmp_path / "data" / "edge-scenes"
    recipe = {
        "method": "teacher",
        "task": "segmentation",
        "output": str(tmp_path / "teacher"),
        "model": {"family": "segformer", "image_size": IMAGE, "config": {}},
        "data": {"scenes": str(folder), "val_images": 2, "test_images": 3},
        "train": {"steps": 1, "batch_size": 4, "warmup_steps": 0},
        "eval": {"batch_images": 4},
    }
    recipe_file = tmp_path / "teacher.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["teacher", str(recipe_file)])
    assert result.exit_code == 1 and "data.generate" in result.output
    assert not folder.exists() and not (tmp_path / "teacher").exists()
    recipe["data"]["generate"] = {"count": 30, "image_size": IMAGE}
    recipe_file.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["teacher", str(recipe_file)])
    assert result.exit_code == 0, result.output
    assert f"stage scenes (30 into {folder}): done in" in result.output
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["count"], meta["image_size"]) == (30, IMAGE)
    (record,) = read_records(tmp_path / "teacher" / "results.json")
    assert record.extra["num_images"] == 3
