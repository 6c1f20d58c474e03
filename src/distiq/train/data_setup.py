"""The data of a recipe: train / val / test splits prepared for one model's processing.

Sources (``recipe.data``, exactly one): a generated scene set (``scenes``), VQA v2 files
(``vqa``) or a Hugging Face ``datasets`` folder (``hf``); in Python also a list of VQA samples
(:func:`samples_split`). The images of VQA v2 and ``datasets`` splits are checked up front
(every file opens and is not too large), so a bad test image fails the run before training,
not after; a generated scene set was written and checked by distiq itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
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
    """

    train: ImageQuestions
    val: ImageQuestions
    test: ImageQuestions

    def without_heads(self) -> EngineData:
        """The splits without the train split's detection and segmentation targets and without
        image caches: what :func:`load_data` gives without ``heads`` (a model trained in this
        process may have cached its train and val images, resized the cached way, whose pixels
        can differ in the last bit from the processor's)."""
        return EngineData(
            self.train.without_heads(), self.val.without_heads(), self.test.without_heads()
        )


def check_scenes(data: Any) -> None:
    """``data.scenes`` is a generated scene set, or (with ``data.generate``) a folder one can be
    generated into: missing or empty."""
    root = Path(data.scenes)
    if (root / "meta.json").is_file():
        return
    if data.generate is not None:
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise FileExistsError(
                f"data.scenes: {root} is not a scene set (no meta.json) and not empty, so "
                "data.generate cannot write one there; point data.scenes at a new folder"
            )
        return
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.scenes: {root} does not exist; add data.generate: {{count: 3000}} to the "
            "recipe to generate a scene set there"
        )
    if not any(root.iterdir()):
        raise FileNotFoundError(
            f"data.scenes: {root} is empty; add data.generate: {{count: 3000}} to the recipe "
            "to generate a scene set there"
        )
    raise FileNotFoundError(
        f"data.scenes: {root} is not a generated scene set (no meta.json); point at the folder "
        "distiq.data.generate_scenes returned (edge-scenes-s...), or at a new folder with "
        "data.generate: {count: 3000}"
    )


def prepare_scenes(data: Any) -> None:
    """Generate the scene set ``data.generate`` asks for into ``data.scenes`` (reused when it
    is there already); nothing without ``data.generate``."""
    if data.scenes is not None and data.generate is not None:
        from distiq.data import generate_scenes_at
        from distiq.progress import stage

        spec = data.generate
        made = (Path(data.scenes) / "meta.json").is_file()  # then reused (or refused): no stage
        with nullcontext() if made else stage(f"scenes ({spec.count:,} into {data.scenes})"):
            generate_scenes_at(data.scenes, spec.count, seed=spec.seed, image_size=spec.image_size)


def check_data(data: Any) -> None:
    """Fail fast on a missing or empty data path (before any long work)."""
    if data.scenes is None and data.vqa is None and data.hf is None:
        raise ValueError(
            "the recipe names no data: set data.scenes, data.vqa or data.hf (or pass the data "
            "in memory: distiq.compress(data=...))"
        )
    if data.scenes is not None:
        check_scenes(data)
        return
    if data.hf is not None:
        if not Path(data.hf.path).is_dir():
            raise FileNotFoundError(f"data.hf.path: {data.hf.path} does not exist")
        return
    for split, files in (data.vqa or {}).items():
        for kind in ("questions", "annotations", "images"):
            path = Path(getattr(files, kind))
            if not path.exists():
                raise FileNotFoundError(f"data.vqa.{split}.{kind}: {path} does not exist")
            if path.is_dir() and not any(path.iterdir()):
                raise FileNotFoundError(f"data.vqa.{split}.{kind}: {path} is empty")


def load_split(
    data: Any, split: str, adapter: Any, *, heads: bool = False, target: str = "category"
) -> ImageQuestions:
    """One split of the recipe's data, prepared for ``adapter``."""
    if data.scenes is not None:
        return load_scene_split(
            data.scenes, split, adapter, heads=heads, segmentation_target=target
        )
    if data.hf is not None:
        from dataclasses import asdict

        from distiq.data.hf_vqa import load_hf_vqa

        records = load_hf_vqa(
            data.hf.path, split, asdict(data.hf.columns), on_bad_record=data.on_bad_record
        )
        if not records:
            raise ValueError(f"the {split!r} split of data.hf ({data.hf.path}) has no questions")
        return samples_split(records, adapter)
    files = data.vqa[split]
    dataset = load_vqa_files(
        files.questions, files.annotations, files.images, adapter, on_bad_record=data.on_bad_record
    )
    from distiq.data.records import verify_images

    verify_images(
        [path for path, _ in dataset.images],
        f"data.vqa.{split} ({files.images})",
    )
    return dataset


def samples_split(samples: Sequence[dict], adapter: Any) -> ImageQuestions:
    """A split from VQA records in memory: each a dict with ``image`` (a PIL image, a path, or
    a function returning one), ``question``, ``answers`` (human answers; or one ``answer``)
    and optionally ``answer``, ``question_id``, ``image_id``, ``question_type``. Samples that
    share an ``image_id`` are one image with several questions."""
    from distiq.data.vqa import canonical_answer

    records = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict) or "image" not in sample or "question" not in sample:
            raise ValueError(
                f"sample {index}: a VQA sample is a dict with image, question and answers"
            )
        answers = sample.get("answers") or ([sample["answer"]] if sample.get("answer") else None)
        if not answers:
            raise ValueError(f"sample {index}: no answers (give answers or answer)")
        records.append(
            {
                "question": sample["question"],
                "answers": list(answers),
                "answer": sample.get("answer") or canonical_answer(list(answers)),
                "question_type": str(sample.get("question_type", "")),
                "question_id": int(sample.get("question_id", index)),
                "image_id": int(sample.get("image_id", index)),
                "image": sample["image"],
            }
        )
    ids = [r["question_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("two samples share a question_id; ids must be unique")
    images: dict[int, Any] = {}
    for record in records:
        images.setdefault(record["image_id"], record["image"])
    return ImageQuestions([(image, i) for i, image in images.items()], records, adapter)


def load_data(recipe: Any, adapter: Any, *, heads: bool = False) -> EngineData:
    """Train / val / test of ``recipe.data`` for ``adapter`` (train with detection and
    segmentation targets when ``heads`` and the data has them)."""
    data = recipe.data
    target = getattr(recipe.teacher, "segmentation_target", "category")
    train = load_split(data, data.train_split, adapter, heads=heads, target=target)
    val = load_split(data, data.val_split, adapter).limit_questions(data.val_questions)
    test = load_split(data, data.test_split, adapter).limit_questions(data.test_questions)
    logger.info(
        "data: %d train images (%d questions), %d val / %d test questions",
        len(train),
        train.num_questions,
        val.question_count(),
        test.question_count(),
    )
    return EngineData(train, val, test)
