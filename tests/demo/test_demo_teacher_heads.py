"""The teacher builds only the heads it trains: a head whose loss weight is 0 is neither built
nor saved (it would ship untrained), and the training loop logs no term for it. The first
steps (``VISION_WARMUP`` of them) train the vision side alone."""

from __future__ import annotations

import pytest

from distiq.data import generate_scenes
from distiq.demo.recipe import teacher_recipe_from_dict
from distiq.demo.teacher import train_teacher as run_teacher
from distiq.models import VLMWithHeads
from distiq.train import read_metrics

TINY_EDGE_VLM = dict(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
    vision_intermediate_size=64, text_hidden_size=32, text_layers=2, text_heads=2,
    text_kv_heads=2, text_intermediate_size=64, max_length=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_heads")
    return generate_scenes(root / "data", count=24, image_size=32, workers=1).root


@pytest.fixture
def train_teacher(scenes):
    """``train_teacher(out, weights, steps=2, **teacher)`` -> the teacher's run directory."""
    return lambda *args, **kwargs: _teacher(scenes, TINY_EDGE_VLM, *args, **kwargs)


def _teacher(scenes, tiny, out, weights, steps=2, **teacher):
    recipe = teacher_recipe_from_dict(
        {
            "method": "teacher",
            "output": str(out),
            "data": {"scenes": str(scenes), "val_questions": 6, "test_questions": 6},
            "teacher": {"preset": "tiny", "model": tiny, "weights": weights, **teacher},
            "train": {"steps": steps, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        }
    )
    return run_teacher(recipe)


def test_zero_weight_head_is_not_built(train_teacher, tmp_path):
    run = train_teacher(tmp_path / "t", {"detection": 0.0, "segmentation": 1.0})
    model = VLMWithHeads.from_pretrained(run)
    assert model.detection_head is None and model.segmentation_head is not None
    terms = {t for line in read_metrics(run / "metrics.jsonl") for t in line.get("terms", {})}
    assert "segmentation" in terms and "detection" not in terms


def test_no_trained_head_saves_a_plain_model(train_teacher, tmp_path):
    run = train_teacher(tmp_path / "t", {"detection": 0.0, "segmentation": 0.0})
    assert not (run / "distiq_heads.json").exists()
    assert (run / "config.json").is_file()


def test_vision_warmup_steps_run_without_the_language_model(train_teacher, tmp_path):
    run = train_teacher(tmp_path / "t", {"detection": 0.0}, steps=5)  # 20 %: 1 step
    lines = [line for line in read_metrics(run / "metrics.jsonl") if line.get("kind") == "train"]
    assert [sorted(line["terms"]) for line in lines[:2]] == [
        ["centres", "segmentation"],
        ["centres", "grounding", "segmentation", "vqa"],
    ]


def test_vision_steps_set_by_the_recipe(train_teacher, tmp_path):
    run = train_teacher(tmp_path / "t", {"detection": 0.0}, steps=3, vision_steps=0)
    lines = [line for line in read_metrics(run / "metrics.jsonl") if line.get("kind") == "train"]
    assert "vqa" in lines[0]["terms"]  # no warm-up
    with pytest.raises(ValueError, match="vision_steps must be >= 0"):
        train_teacher(tmp_path / "u", {}, vision_steps=-1)
    with pytest.raises(ValueError, match="below train.steps 3"):
        train_teacher(tmp_path / "v", {"detection": 0.0}, steps=3, vision_steps=3)
