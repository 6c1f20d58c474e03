"""The demo's teacher (``distiq.demo.train_teacher``) on a tiny scene set: its directory, its
heads and grounded terms, and splits loaded once for it and the runs that compress it."""

from __future__ import annotations

import pytest
import torch

from distiq.demo.recipe import load_teacher_recipe, teacher_recipe_from_dict
from distiq.demo.teacher import load_teacher_training_data, train_teacher
from distiq.models import VLMWithHeads, load
from distiq.results import read_records
from distiq.train import read_metrics, run_data
from distiq.train.recipe import recipe_from_dict

TRAIN = {"steps": 3, "batch_size": 8, "lr": 1.0e-3, "log_every": 1, "warmup_steps": 1}
W4A8 = {
    "weight": {"bits": 4},
    "activation": {"bits": 8, "symmetric": False, "granularity": "per_tensor"},
}


@pytest.fixture
def world(demo_world):
    return demo_world


def test_teacher_directory(world):
    root, _ = world
    teacher = root / "teacher"
    model, _ = load(teacher)  # a plain Hugging Face directory
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    heads = VLMWithHeads.from_pretrained(teacher)
    assert heads.detection_head is not None and heads.segmentation_head is not None
    (record,) = read_records(teacher / "results.json")
    assert record.method == "teacher" and 0 <= record.value <= 100
    assert load_teacher_recipe(teacher / "recipe.yaml").method == "teacher"  # written once
    assert record.extra["blind_baseline"]["accuracy"] >= 0
    assert set(record.extra["by_question_type"]) <= {
        "count", "color", "identity", "position", "relation", "exist", "compare",
    }  # fmt: skip
    terms = {t for line in read_metrics(teacher / "metrics.jsonl") for t in line.get("terms", {})}
    assert {"vqa", "detection", "segmentation", "grounding", "centres"} <= terms


def test_teacher_counts_weight_adds_the_scene_count_term(tiny_teacher, world):
    """``teacher.weights.counts > 0`` trains the scene-count head on the image tokens."""
    root, base = world
    recipe = teacher_recipe_from_dict(
        {
            **base,
            "method": "teacher",
            "output": str(root / "teacher-counts"),
            "teacher": {"preset": "tiny", "model": tiny_teacher, "weights": {"counts": 0.5}},
            "train": {**TRAIN, "steps": 2},
        }
    )
    run_dir = train_teacher(recipe)
    lines = [line for line in read_metrics(run_dir / "metrics.jsonl") if line.get("terms")]
    assert all(line["terms"]["counts"] > 0 for line in lines if "vqa" in line["terms"])
    assert any("vqa" in line["terms"] for line in lines)


@pytest.mark.parametrize("side_target", [False, True])
def test_teacher_side_target_reaches_the_grounding_heads(tiny_teacher, world, side_target):
    """``teacher.side_target`` (on in the shipped recipe) is what the grounding heads use."""
    from distiq.demo.teacher import _grounding_heads
    from distiq.train.prefix_engine import SharedPrefixEngine

    root, base = world
    teacher = {"preset": "tiny", "model": tiny_teacher, "side_target": side_target}
    recipe = teacher_recipe_from_dict(
        {**base, "method": "teacher", "output": str(root / "t"), "teacher": teacher}
    )
    model, adapter = load(root / "teacher")
    heads = _grounding_heads(recipe, SharedPrefixEngine(model, adapter), adapter)
    assert heads is not None and heads.side_target is side_target


def test_teacher_side_layer_trains_a_separate_side_head(tiny_teacher, world):
    """``teacher.side_layer``: the side target's own head reads that layer in a real run; a
    layer the model does not have is refused before training."""
    root, base = world
    teacher = {"preset": "tiny", "model": tiny_teacher, "side_layer": -1}
    recipe = teacher_recipe_from_dict(
        {
            **base,
            "method": "teacher",
            "output": str(root / "teacher-side"),
            "teacher": {**teacher, "vision_steps": 0},
            "train": {**TRAIN, "steps": 2},
        }
    )
    run_dir = train_teacher(recipe)
    lines = [line for line in read_metrics(run_dir / "metrics.jsonl") if line.get("terms")]
    assert lines and all(line["terms"]["grounding"] > 0 for line in lines)
    bad = teacher_recipe_from_dict(
        {
            **base,
            "method": "teacher",
            "output": str(root / "teacher-side-bad"),
            "teacher": {**teacher, "side_layer": 7},
        }
    )
    with pytest.raises(ValueError, match="teacher.side_layer 7 is out of range"):
        train_teacher(bad)
    assert not (root / "teacher-side-bad" / "checkpoints").exists()


def test_teacher_data_loaded_once_serves_teacher_and_runs(world):
    # distiq demo loads the teacher's splits before forking its processes, and hands them,
    # without the heads' targets, to the runs on that teacher: the same numbers as loading them
    root, base = world
    teacher = load_teacher_recipe(root / "teacher" / "recipe.yaml", output=str(root / "teacher-2"))
    data = load_teacher_training_data(teacher)
    assert data.train.has_detection and data.train.has_segmentation
    with pytest.raises(ValueError, match="no detection or segmentation targets"):
        train_teacher(teacher, data=data.without_heads())  # the splits of a run, not a teacher's
    assert not (root / "teacher-2" / "recipe.yaml").exists()  # refused before writing
    again = read_records(train_teacher(teacher, data=data) / "results.json")[0]
    first = read_records(root / "teacher" / "results.json")[0]
    assert (
        again.value == first.value
        and again.extra["best_val_accuracy"] == first.extra["best_val_accuracy"]
    )
    recipe = recipe_from_dict(
        {**base, "method": "rtn", "quantization": W4A8, "teacher": str(root / "teacher"),
         "output": str(root / "r")}
    )  # fmt: skip
    assert len(data.val._cache) > 0  # the teacher, trained in this process, cached its images
    shared, loaded = data.without_heads(), run_data(recipe)
    assert shared.val._cache is None  # the runs read images as run_data's splits do
    assert not shared.train.has_detection and not shared.train.has_segmentation
    assert data.train.has_detection  # the teacher's own splits keep their targets
    ours, saved = shared.train.adapter.tokenizer, loaded.train.adapter.tokenizer
    assert ours.get_vocab() == saved.get_vocab()
    assert (ours.pad_token_id, ours.eos_token_id) == (saved.pad_token_id, saved.eos_token_id)
    for split in ("train", "val", "test"):
        a, b = getattr(shared, split), getattr(loaded, split)
        assert a.images == b.images and a.rows == b.rows and a.size == b.size
        assert a.tokens.suffix == b.tokens.suffix
        assert a.tokens.prompt_lengths == b.tokens.prompt_lengths
        assert torch.equal(a.tokens.prefix_ids, b.tokens.prefix_ids)
        count = min(4, len(a))
        items = [a[i] for i in range(count)], [b[i] for i in range(count)]
        for answers in (True, False):
            x, y = (s.collate(i, with_answers=answers) for s, i in zip((a, b), items))
            assert x.keys() == y.keys()
            for key in x:
                same = torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key]
                assert same, (split, key)
