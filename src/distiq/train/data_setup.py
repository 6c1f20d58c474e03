"""The data of a recipe: train / val / test splits for a model adapter, and the blind baseline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distiq.train.vqa_data import ImageQuestions, load_scene_split, load_vqa_files

logger = logging.getLogger(__name__)


@dataclass
class EngineData:
    """The splits of a recipe.

    Attributes:
        train: the training images (all of them).
        val: validation images, limited to about ``data.val_questions`` questions.
        test: test images, limited to about ``data.test_questions`` questions (all by default).
        blind_baseline: ``{"accuracy": %, "by_question_type": {type: %}}`` of the question-only
            oracle (``distiq.data.blind_baseline_accuracy``, trained on the train split) on the
            evaluated test questions.
    """

    train: ImageQuestions
    val: ImageQuestions
    test: ImageQuestions
    blind_baseline: dict[str, Any]

    def without_heads(self) -> EngineData:
        """The splits without the train split's detection and segmentation targets and without
        image caches: what :func:`load_data` gives without ``heads`` (a teacher trained in this
        process cached its train and val images, resized the cached way, whose pixels can differ
        in the last bit from the processor's)."""
        return EngineData(
            self.train.without_heads(),
            self.val.without_heads(),
            self.test.without_heads(),
            self.blind_baseline,
        )


def check_data(data: Any) -> None:
    """Fail fast on a missing or empty data path (before any long work)."""
    if data.scenes is not None:
        root = Path(data.scenes)
        if not root.is_dir():
            raise FileNotFoundError(f"data.scenes: {root} does not exist")
        if not any(root.iterdir()):
            raise FileNotFoundError(f"data.scenes: {root} is empty; generate the scenes first")
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(
                f"data.scenes: {root} is not a generated scene set (no meta.json); point at the "
                "folder distiq.data.generate_scenes returned (edge-scenes-s...)"
            )
        return
    for split, files in (data.vqa or {}).items():
        for kind in ("questions", "annotations", "images"):
            path = Path(getattr(files, kind))
            if not path.exists():
                raise FileNotFoundError(f"data.vqa.{split}.{kind}: {path} does not exist")
            if path.is_dir() and not any(path.iterdir()):
                raise FileNotFoundError(f"data.vqa.{split}.{kind}: {path} is empty")


def scene_vocabulary(data: Any) -> list[str]:
    """The word list of the recipe's data: a scene set's ``meta.json`` vocabulary, or every
    word of the VQA train questions and answers."""
    if data.scenes is not None:
        meta = json.loads((Path(data.scenes) / "meta.json").read_text())
        if "vocabulary" in meta:
            return list(meta["vocabulary"])
        from distiq.data import vocabulary

        return vocabulary()
    from distiq.data.scenes import split_words
    from distiq.data.vqa import load_vqa_v2

    files = data.vqa[data.train_split]
    dataset = load_vqa_v2(files.questions, files.annotations, files.images, check_images=False)
    words: set[str] = set()
    for record in dataset.records:
        words.update(split_words(record["question"].lower()))
        for answer in record["answers"]:
            words.update(split_words(answer.lower()))
    return sorted(words)


def load_split(
    data: Any, split: str, adapter: Any, *, heads: bool = False, target: str = "category"
) -> ImageQuestions:
    """One split of the recipe's data, tokenized for ``adapter``."""
    if data.scenes is not None:
        return load_scene_split(
            data.scenes, split, adapter, heads=heads, segmentation_target=target
        )
    files = data.vqa[split]
    return load_vqa_files(files.questions, files.annotations, files.images, adapter)


def load_data(recipe: Any, adapter: Any, *, heads: bool = False) -> EngineData:
    """Train / val / test of ``recipe.data`` for ``adapter`` (train with detection and
    segmentation targets when ``heads`` and the data has them)."""
    from distiq.data import blind_baseline_accuracy, blind_baseline_by_type

    data = recipe.data
    target = getattr(recipe.teacher, "segmentation_target", "category")
    train = load_split(data, data.train_split, adapter, heads=heads, target=target)
    val = load_split(data, data.val_split, adapter).limit_questions(data.val_questions)
    test = load_split(data, data.test_split, adapter).limit_questions(data.test_questions)
    test_records = [test.questions[r] for rows in test.rows for r in rows]
    blind = {
        "accuracy": 100.0 * blind_baseline_accuracy(train.questions, test_records),
        "by_question_type": {
            k: 100.0 * v for k, v in blind_baseline_by_type(train.questions, test_records).items()
        },
    }
    logger.info(
        "data: %d train images (%d questions), %d val / %d test questions; blind baseline %.1f %%",
        len(train),
        train.num_questions,
        val.question_count(),
        len(test_records),
        blind["accuracy"],
    )
    return EngineData(train, val, test, blind)


def load_teacher_data(recipe: Any) -> EngineData:
    """The splits ``compress(recipe)`` loads (for its teacher's adapter), read without loading
    any weights, so that several runs on the same data and teacher can share one copy:
    ``compress(recipe, data=load_teacher_data(recipe))``. ``distiq demo`` loads them once before
    its worker processes fork (each run used to re-read and tokenize the 25,000 scenes' questions:
    ``benchmarks/demo_setup_costs.py``)."""
    from distiq.models import load_adapter
    from distiq.train.modeling import resolve_model_dir

    check_data(recipe.data)
    return load_data(recipe, load_adapter(resolve_model_dir(recipe.teacher.path)))
