"""Test-wide settings: offline Hugging Face, deterministic seeds, small thread count, GPU marker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# Tests use tiny tensors, for which one thread is fastest (and robust on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def fixtures():
    """The report input builders of tests/report (report_fixtures.py)."""
    name = "distiq_report_test_fixtures"
    if name not in sys.modules:
        path = Path(__file__).parent / "report" / "report_fixtures.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


# The demo's built-in VLM at a size a test trains in seconds.
TINY_TEACHER = dict(
    image_size=32,
    patch_size=8,
    vision_hidden_size=32,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate_size=64,
    text_hidden_size=64,
    text_layers=2,
    text_heads=2,
    text_kv_heads=2,
    text_intermediate_size=128,
    max_length=64,
)
WORLD_TRAIN = {"steps": 3, "batch_size": 8, "lr": 1.0e-3, "log_every": 1, "warmup_steps": 1}


@pytest.fixture(scope="session")
def tiny_teacher():
    """EdgeVLMConfig fields of the tiny teacher ``demo_world`` trains."""
    return dict(TINY_TEACHER)


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """``(root, base)``: a tiny scene set and the demo's teacher trained on it for a few steps
    (``root / "teacher"``); ``base`` the recipes' data section."""
    from distiq.data import generate_scenes
    from distiq.demo.recipe import teacher_recipe_from_dict
    from distiq.demo.teacher import train_teacher

    root = tmp_path_factory.mktemp("demo-world")
    scenes = generate_scenes(root / "data", count=48, image_size=32, workers=1).root
    base = {"data": {"scenes": str(scenes), "val_questions": 9, "test_questions": 12}}
    teacher = teacher_recipe_from_dict(
        {
            **base,
            "method": "teacher",
            "output": str(root / "teacher"),
            "teacher": {"preset": "tiny", "model": TINY_TEACHER},
            "train": {**WORLD_TRAIN, "steps": 4, "eval_every": 2, "best_metric": "vqa_accuracy"},
        }
    )
    train_teacher(teacher)
    return root, base
