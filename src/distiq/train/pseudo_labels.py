"""Training without labels (``data.labels: false``): the teacher's greedy answers stand in for
the human answers a user compressing a deployed model usually does not have.

Only images and questions are needed. Before training, the teacher answers every question of the
images the run will visit (the train split reduced to them: ``teacher_outputs.visited_images``
gives the seeded order of the labelled run, whose images are then all of the reduced split) and
of the validation split; those answers become the questions' answers, so:

- a trained method's task term is the cross-entropy against the teacher's answer (plain ``qat``
  then is sequence-level distillation, the fair label-free baseline), and token-level
  distillation terms count the positions of the teacher's answer tokens;
- validation measures agreement with the teacher (what a label-free user can measure), and picks
  the best checkpoint by it;
- the test split keeps its human answers, so the reported accuracy stays the real one.

A question the teacher answers with nothing (an immediate eos) is left out of training.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def teacher_answers(
    teacher: Any, dataset: Any, *, max_new_tokens: int, batch_images: int
) -> dict[Any, str]:
    """``{question_id: greedy answer}`` of ``teacher`` (an ``EngineModel``) for every question
    of ``dataset`` (a split prepared for the teacher's processing)."""
    from distiq.train.batches import move_to_device

    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    answers: dict[Any, str] = {}
    try:
        for start in range(0, len(dataset), batch_images):
            items = [dataset[i] for i in range(start, min(start + batch_images, len(dataset)))]
            batch = move_to_device(dataset.generation_collate(items), device)
            predictions = teacher.answers(batch, max_new_tokens=max_new_tokens)
            for question_id, answer in zip(batch["question_id"].tolist(), predictions):
                answers[question_id] = answer
    finally:
        teacher.train(was_training)
    return answers


def relabelled(dataset: Any, answers: dict[Any, str]) -> Any:
    """``dataset`` with ``answers`` as every question's answer (ten identical human answers, so
    VQA accuracy against them is agreement); questions without an answer are dropped."""
    from distiq.train.vqa_data import ImageQuestions

    kept = {q for q, a in answers.items() if a}
    records = []
    for record in dataset.questions:
        if record["question_id"] not in kept:
            continue
        answer = answers[record["question_id"]]
        records.append({**record, "answer": answer, "answers": [answer] * 10})
    if not records:
        raise ValueError(
            f"label-free training needs a teacher that answers: it left all "
            f"{dataset.question_count()} questions unanswered (an immediate end of sequence)"
        )
    image_ids = {r["image_id"] for r in records}
    images = [(source, i) for source, i in dataset.images if i in image_ids]
    dropped = dataset.question_count() - len(records)
    if dropped:
        logger.info("label-free: %d questions the teacher left unanswered are left out", dropped)
    return ImageQuestions(
        images,
        records,
        dataset.adapter,
        path=dataset.path,
        detection=dataset.detection,
        masks=dataset.masks,
        mask_lookup=dataset.mask_lookup,
        num_detection_classes=dataset.num_detection_classes,
        num_segmentation_classes=dataset.num_segmentation_classes,
    )


def teacher_labelled(recipe: Any, data: Any, teacher: Any, teacher_adapter: Any) -> Any:
    """The recipe's splits for a label-free run (see the module docstring): train reduced to the
    images the run visits and val, both answered by the teacher; test unchanged."""
    from distiq.train.engines import engine_for
    from distiq.train.teacher_outputs import visited_images

    train = data.train.subset(visited_images(data.train, recipe.train))
    splits = {}
    for name, split in (("train", train), ("val", data.val)):
        view = split.for_adapter(teacher_adapter)
        engine = engine_for(teacher, teacher_adapter, view.path)
        answers = teacher_answers(
            engine,
            view,
            max_new_tokens=recipe.eval.max_new_tokens,
            batch_images=recipe.eval.batch_images,
        )
        splits[name] = relabelled(split, answers)
    result = copy.copy(data)
    result.train, result.val = splits["train"], splits["val"]
    logger.info(
        "label-free: the teacher answered %d train and %d validation questions",
        splits["train"].question_count(),
        splits["val"].question_count(),
    )
    return result
