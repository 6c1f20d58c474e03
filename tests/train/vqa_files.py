"""Test data for the engine as a user runs it: tiny checkpoints of every family
(tests/models/conftest.py) and VQA v2 files of a few dozen questions on generated scenes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch


def family_models():
    name = "distiq_family_test_models"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "models" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


QUESTIONS = [
    ("how many red squares are there?", "3"),
    ("what colour is the shape?", "blue"),
    ("how many circles?", "2"),
]


def write_split(root: Path, split: str, images: int, first_id: int) -> dict:
    """A VQA v2 split of ``images`` scenes with two questions each."""
    models = family_models()
    folder = root / split
    folder.mkdir(parents=True)
    questions, annotations = [], []
    for i in range(images):
        image_id = first_id + i
        models.scene(image_id, size=40).save(folder / f"{image_id:012d}.png")
        for j in range(2):
            question, answer = QUESTIONS[(i + j) % len(QUESTIONS)]
            qid = image_id * 10 + j
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": question.split()[0],
                    "answer_type": "other",
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)],
                }
            )
    (root / f"{split}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return {
        "questions": str(root / f"{split}_questions.json"),
        "annotations": str(root / f"{split}_annotations.json"),
        "images": str(folder),
    }


def write_splits(root: Path) -> dict:
    """A recipe ``data`` section with VQA v2 train (12 images), val (3) and test (4) splits."""
    return {
        "vqa": {
            "train": write_split(root, "train", 12, 100),
            "val": write_split(root, "val", 3, 200),
            "test": write_split(root, "test", 4, 300),
        }
    }


def save_family(family: str, path: Path, **changes) -> Path:
    """The family's tiny model saved (with tokenizer and processor) in ``path``; ``changes``
    edit its config before the model is built (e.g. another width)."""
    torch.manual_seed(0)
    model, tokenizer, processor = family_models().build_family(family, **changes)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path
