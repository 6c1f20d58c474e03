"""``compress`` end to end on a tiny edge VLM (the demo's teacher, trained for a few steps) and a
tiny scene set: every method runs, leaves a loadable run directory whose saved model *is* the
evaluated one, and records its accuracy. Every supported family: test_engine_families.py."""

from __future__ import annotations

import json

import pytest
import torch

from distiq.models import VLMWithHeads, load
from distiq.quant import FakeQuantLinear, QuantSpec, dequantize, quantize
from distiq.results import read_records
from distiq.train import read_metrics
from distiq.train.methods import compress, evaluate
from distiq.train.recipe import recipe_from_dict
from distiq.train.runs import load_compressed

TRAIN = {"steps": 3, "batch_size": 8, "lr": 1.0e-3, "log_every": 1, "warmup_steps": 1}
W4A8 = {
    "weight": {"bits": 4},
    "activation": {"bits": 8, "symmetric": False, "granularity": "per_tensor"},
}


@pytest.fixture
def world(demo_world):
    return demo_world


def _run(world, name: str, **recipe) -> tuple:
    root, base = world
    data = {
        **base,
        "teacher": str(root / "teacher"),
        "output": str(root / name),
        "train": TRAIN,
        "calibration": {"samples": 16, "batch_size": 8},
        **recipe,
    }
    run_dir = compress(recipe_from_dict(data))
    return run_dir, read_records(run_dir / "results.json")[0]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ptq_run_saves_the_evaluated_model(world, method):
    run_dir, record = _run(world, method, method=method, quantization=W4A8)
    assert (record.method, record.w_bits, record.a_bits, record.steps) == (method, 4, 8, 0)
    manifest = json.loads((run_dir / "quantization.json").read_text())["modules"]
    assert manifest and all(e["weight"] is not None for e in manifest.values())
    assert any(e["activation"] is not None for e in manifest.values())
    # The stored weights are exactly on the integer grid their stored scales describe.
    from safetensors.torch import load_file

    state = load_file(str(run_dir / "quant_state.safetensors"))
    model, _, _ = load_compressed(run_dir)
    spec = QuantSpec(bits=4)
    for name in list(manifest)[:4]:
        weight = model.get_submodule(name).weight.detach()
        scale, zero = state[f"{name}.weight_scale"], state[f"{name}.weight_zero_point"]
        codes = quantize(weight, scale, zero, spec)
        torch.testing.assert_close(dequantize(codes, scale, zero, spec), weight, atol=0, rtol=0)
    assert any(isinstance(m, FakeQuantLinear) for m in model.modules())
    # Re-evaluating the saved run gives the recorded accuracy.
    (again,) = evaluate(run_dir)
    assert again.value == pytest.approx(record.value)
    # each test question's answer and score, for comparisons question by question
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == record.extra["num_questions"]
    assert sum(r["score"] for r in rows) / len(rows) * 100 == pytest.approx(record.value)
    assert [r["question_id"] for r in rows] == sorted(r["question_id"] for r in rows)


def test_every_weight_matrix_can_be_quantized_patch_projection_and_lm_head_too(world):
    from distiq.export import QuantizedConv2d, load_run
    from distiq.models import PARTS
    from distiq.quant import QuantizedLinear

    quantization = {"weight": {"bits": 4}, "targets": list(PARTS)}
    run_dir, record = _run(world, "gptq-every", method="gptq", quantization=quantization)
    names = json.loads((run_dir / "quantization.json").read_text())["modules"]
    patch = "vlm.model.vision_tower.embeddings.patch_embedding"
    assert {patch, "vlm.lm_head"} <= set(names)
    assert names[patch]["type"] == "Conv2d" and names[patch]["weight"]["bits"] == 4
    (again,) = evaluate(run_dir)
    assert again.value == pytest.approx(record.value)
    run = load_run(run_dir)  # the export's view: real quantized layers, codes checked exact
    assert isinstance(run.model.get_submodule(patch), QuantizedConv2d)
    assert isinstance(run.model.get_submodule("vlm.lm_head"), QuantizedLinear)


def test_qat_trains_with_the_task_loss_only(world):
    run_dir, record = _run(
        world,
        "qat",
        method="qat",
        quantization={
            "weight": {"bits": 4, "learnable": True},
            "activation": {**W4A8["activation"], "learnable": True},
        },
    )
    lines = [line for line in read_metrics(run_dir / "metrics.jsonl") if line["kind"] == "train"]
    assert len(lines) == TRAIN["steps"]
    assert set(lines[0]["terms"]) == {"task"}
    assert record.steps == TRAIN["steps"]
    (again,) = evaluate(run_dir)
    assert again.value == pytest.approx(record.value)


def test_qat_may_start_from_gptq_and_runs_may_share_loaded_data(world):
    # qat from a GPTQ solution (the same start qad may take) with splits loaded beforehand,
    # as distiq demo hands them to its workers: the same result as loading them in the run.
    from distiq.train import run_data

    root, base = world
    quantization = {"weight": {"bits": 4, "learnable": True}}
    plain_dir, plain = _run(world, "qat-gptq", method="qat", init="gptq", quantization=quantization)
    recipe = recipe_from_dict(
        {
            **base,
            "method": "qat",
            "init": "gptq",
            "teacher": str(root / "teacher"),
            "output": str(root / "qat-gptq-shared"),
            "train": TRAIN,
            "calibration": {"samples": 16, "batch_size": 8},
            "quantization": quantization,
        }
    )
    data = run_data(recipe)
    shared = read_records(compress(recipe, data=data) / "results.json")[0]
    assert shared.value == plain.value and shared.steps == plain.steps == TRAIN["steps"]
    lines = [line for line in read_metrics(plain_dir / "metrics.jsonl") if line["kind"] == "train"]
    assert set(lines[0]["terms"]) == {"task"}


def test_qad_with_gptq_init_logs_every_term(world):
    run_dir, record = _run(
        world,
        "qad",
        method="qad",
        init="gptq",
        quantization={
            "weight": {
                "bits": 2,
                "symmetric": False,
                "granularity": "per_group(32)",
                "learnable": True,
            }
        },
        objective={
            "terms": {
                "task": {},
                "kd": {"temperature": 2.0},
                "pd": {"weight": 0.5},
                "rounding": {"weight": 1.0e-3},
            }
        },
    )
    lines = [line for line in read_metrics(run_dir / "metrics.jsonl") if line["kind"] == "train"]
    assert set(lines[-1]["terms"]) == {"task", "kd", "pd", "rounding"}
    assert (record.w_bits, record.a_bits, record.group_size) == (2, 16, 32)
    model, _, manifest = load_compressed(run_dir)
    assert all(e["activation"] is None for e in manifest["modules"].values())
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


def test_selective_qad_freezes_all_but_the_sensitive_layers(world):
    root, _ = world
    run_dir, record = _run(
        world,
        "qad-selective",
        method="qad",
        quantization={"weight": {"bits": 4, "learnable": True}},
        objective={"terms": {"task": {}, "kd": {}}},
        selective={"fraction": 0.25, "samples": 8},
    )
    selected = record.extra["selective_layers"]
    manifest = json.loads((run_dir / "quantization.json").read_text())["modules"]
    assert 0 < len(selected) < len(manifest)
    # A frozen layer's latent weight stayed the teacher's: its stored weight is the teacher's
    # weight quantized with the (learned) scale.
    teacher = VLMWithHeads.from_pretrained(root / "teacher")
    student, _, _ = load_compressed(run_dir)
    from safetensors.torch import load_file

    state = load_file(str(run_dir / "quant_state.safetensors"))
    frozen = next(n for n in manifest if n not in selected)
    original = teacher.get_submodule(frozen).weight.detach()
    stored = student.get_submodule(frozen).weight.detach()
    scale, zero = state[f"{frozen}.weight_scale"], state[f"{frozen}.weight_zero_point"]
    spec = QuantSpec(bits=4)
    expected = dequantize(quantize(original, scale, zero, spec), scale, zero, spec)
    torch.testing.assert_close(stored, expected, atol=1e-6, rtol=1e-6)
    trained = selected[0]
    moved = student.get_submodule(trained).weight.detach()
    scale, zero = state[f"{trained}.weight_scale"], state[f"{trained}.weight_zero_point"]
    original = teacher.get_submodule(trained).weight.detach()
    assert not torch.equal(
        moved, dequantize(quantize(original, scale, zero, spec), scale, zero, spec)
    )


def test_kd_student_is_smaller_and_full_precision(world):
    run_dir, record = _run(
        world,
        "kd",
        method="kd",
        student={"init": "preset", "model": {"text_layers": 1}},
        objective={"terms": {"task": {}, "kd": {"temperature": 2.0}}},
    )
    model, _ = load(run_dir)
    assert model.config.text_config.num_hidden_layers == 1
    assert (record.w_bits, record.a_bits) == (16, 16)
    teacher_params = read_records(world[0] / "teacher" / "results.json")[0].params
    assert record.params < teacher_params


def test_existing_run_needs_overwrite(world):
    root, base = world
    recipe = recipe_from_dict(
        {**base, "method": "rtn", "teacher": str(root / "teacher"), "output": str(root / "rtn"),
         "quantization": W4A8, "calibration": {"samples": 8, "batch_size": 8}}
    )  # fmt: skip
    with pytest.raises(FileExistsError):
        compress(recipe)
    assert compress(recipe, overwrite=True) == root / "rtn"


def test_qlora_kd_merges_and_requantizes(world):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    run_dir, record = _run(
        world,
        "qlora",
        method="qlora-kd",
        quantization={
            "weight": {"bits": 4, "format": "nf4", "granularity": "per_group(64)"},
            "activation": None,
        },
        objective={"terms": {"task": {}, "kd": {}}},
        qlora={"rank": 4, "alpha": 8.0},
    )
    extra = record.extra
    assert extra["lora_layers"] > 0
    assert extra["merge_requantize_drop"] == pytest.approx(
        extra["qlora_unmerged_value"] - record.value
    )
    manifest = json.loads((run_dir / "quantization.json").read_text())["modules"]
    # NF4 needs 64-wide blocks: layers with 32 inputs stay in full precision.
    model, _ = load(run_dir)
    widths = {
        "vlm." + name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    assert set(manifest) == {name for name, width in widths.items() if width % 64 == 0}
    assert any(width == 32 for width in widths.values())
    assert all(e["weight"]["format"] == "nf4" for e in manifest.values())
    lines = [line for line in read_metrics(run_dir / "metrics.jsonl") if line["kind"] == "train"]
    assert set(lines[0]["terms"]) == {"task", "kd"}


def test_label_free_runs_learn_the_teachers_answers(world, monkeypatch):
    """data.labels: false: the teacher answers the visited train images and the validation
    split; qat trains on those answers, qad distils without a task term; the test split keeps
    its human answers, so the recorded accuracy is the real one. (The few-step teacher answers
    nothing, so its greedy answers are replaced by fixed ones here; teacher_answers itself is
    checked against the evaluation's answers below.)"""
    import distiq.train.pseudo_labels as pseudo
    from distiq.models import load as load_model
    from distiq.train import run_data
    from distiq.train.engines import engine_for, evaluate_vqa
    from distiq.train.teacher_outputs import visited_images

    root, base = world
    teacher, adapter = load_model(root / "teacher", attn_implementation="eager")
    quantization = {"weight": {"bits": 4, "learnable": True}}
    data = {**base["data"], "labels": False}
    recipe = recipe_from_dict(
        {**base, "method": "qat", "teacher": str(root / "teacher"), "output": str(root / "x"),
         "train": TRAIN, "quantization": quantization, "data": data}
    )  # fmt: skip
    loaded = run_data(recipe)
    answers = pseudo.teacher_answers(
        engine_for(teacher, adapter, loaded.val.path), loaded.val, max_new_tokens=4,
        batch_images=4,
    )  # fmt: skip
    rows: list = []
    evaluate_vqa(engine_for(teacher, adapter, loaded.val.path), loaded.val, per_question=rows)
    assert answers == {r["question_id"]: r["prediction"] for r in rows}
    with pytest.raises(ValueError, match="needs a teacher that answers"):
        pseudo.relabelled(loaded.val, dict.fromkeys(answers, ""))

    words = ("yes", "2", "red")
    monkeypatch.setattr(
        pseudo, "teacher_answers",
        lambda engine, dataset, **kw: {
            dataset.questions[r]["question_id"]: words[r % 3]
            for rows_ in dataset.rows for r in rows_
        },
    )  # fmt: skip
    free = pseudo.teacher_labelled(recipe, loaded, teacher, adapter)
    assert len(free.train) == len(visited_images(loaded.train, recipe.train)) < len(loaded.train)
    for record in free.val.questions:
        assert record["answer"] in words and record["answers"] == [record["answer"]] * 10
    assert free.test is loaded.test  # scored against the human answers
    _, qat = _run(world, "qat-free", method="qat", quantization=quantization, data=data)
    qad_dir, qad = _run(
        world, "qad-free", method="qad", quantization=quantization, data=data,
        objective={"terms": {"kd": {"temperature": 2.0}}},
    )  # fmt: skip
    lines = [line for line in read_metrics(qad_dir / "metrics.jsonl") if line["kind"] == "train"]
    assert set(lines[0]["terms"]) == {"kd"}
    assert qat.extra["num_questions"] == qad.extra["num_questions"]  # the same test questions
