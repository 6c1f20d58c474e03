"""Chunk worker of the scene generator (renders scenes, writes their PNGs, returns their
records) and the writer of the sets' JSON files.

Kept apart from :mod:`distiq.data.scenes` so that worker processes import only numpy and this
package's light modules (never torch).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from distiq.data._questions import ANSWER_TYPES, Balancer, QuestionObject, candidates
from distiq.data._render import render_scene
from distiq.data.blind import blind_baseline_accuracy, blind_baseline_by_type
from distiq.data.formats import (
    LabelMap,
    coco_rle,
    save_mask_png,
    save_png,
    vqa_annotation,
    vqa_image_name,
    write_coco_instances,
    write_label_map,
    write_vqa_v2,
)

DATA_TYPE = "edge_scenes"  # VQA v2 "data_type" of the synthetic sets
CHUNK_SIZE = 250  # scenes per task; question balancing is local to a chunk (fixed => deterministic)

_DIGIT_BANKS: dict[str, dict[int, np.ndarray]] = {}


@dataclass(frozen=True)
class ChunkTask:
    """Scenes ``image_ids`` of split ``split``, written under ``root``."""

    root: str
    split: str
    image_ids: tuple[int, ...]
    seed: int
    image_size: int
    config: Any  # scenes.SceneConfig (not imported here to keep the worker's imports small)
    bank: str  # "fit" (train) or "heldout" (val, test): which digit instances to draw


def init_worker(banks: dict[str, dict[int, np.ndarray]]) -> None:
    """Pool initializer: installs the digit banks in the worker process."""
    _DIGIT_BANKS.clear()
    _DIGIT_BANKS.update(banks)


def render_chunk(task: ChunkTask) -> list[dict[str, Any]]:
    """Render and write every scene of ``task``; return one record per scene:
    ``{"image_id", "file_name", "objects": [(category, colour, (x0, y0, x1, y1), area, rle)],
    "qas": [(question_type, question, answer)]}`` (``rle`` is ``None`` unless the config asks
    for instance masks)."""
    config = task.config
    size = task.image_size
    categories = config.categories
    shape_count = len(config.shapes)
    nouns = config.nouns
    # Plain string paths: pathlib costs more than the PNG encoding of a 64×64 mask.
    image_dir, mask_dir, colour_dir, depth_dir = (
        os.path.join(task.root, folder, task.split)
        for folder in ("images", "masks", "colour_masks", "depth")
    )
    bank = _DIGIT_BANKS[task.bank]
    margin = config.position_margin * size
    # Question balancing state is per chunk; its seed depends only on (seed, first image id).
    balancer = Balancer(
        config.question_types, np.random.default_rng([task.seed, task.image_ids[0], 1])
    )
    records = []
    for image_id in task.image_ids:
        rng = np.random.default_rng([task.seed, image_id])
        n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        image, instance, objects = render_scene(
            rng,
            size=size,
            n_objects=n_objects,
            categories=categories,
            shape_count=shape_count,
            colours=config.colours,
            digit_bank=bank,
            size_range=config.size_range,
            min_visible=config.min_visible,
            noise_std=config.noise_std,
            colour_jitter=config.colour_jitter,
        )
        name = vqa_image_name(task.split, image_id, ".png")
        save_png(os.path.join(image_dir, name), image)
        # Semantic masks: 0 = background, 1 + index for categories / colours (index -1 -> 0).
        category_lut = np.array([0] + [o.category + 1 for o in objects], dtype=np.uint8)
        colour_lut = np.array([0] + [o.colour + 1 for o in objects], dtype=np.uint8)
        shifted = instance + 1
        category_mask = category_lut[shifted]
        colour_mask = colour_lut[shifted]
        object_rows = []
        question_objects = []
        for index, obj in enumerate(objects):
            rle = coco_rle(instance == index) if config.instance_masks else None
            object_rows.append((obj.category, obj.colour, obj.box, obj.area, rle))
            category = categories[obj.category]
            question_objects.append(
                QuestionObject(
                    colour=config.colours[obj.colour],
                    category=category,
                    noun=category if obj.category < shape_count else "digit",
                    cx=(obj.box[0] + obj.box[2]) / 2.0,
                    cy=(obj.box[1] + obj.box[3]) / 2.0,
                )
            )
        save_mask_png(os.path.join(mask_dir, name), category_mask)
        save_mask_png(os.path.join(colour_dir, name), colour_mask)
        save_png(os.path.join(depth_dir, name), scene_depth_mm(instance, objects))
        options = candidates(
            question_objects, size=size, colours=config.colours, nouns=nouns, margin=margin
        )
        qas = balancer.choose(options, config.questions_per_image)
        records.append(
            {"image_id": image_id, "file_name": name, "objects": object_rows, "qas": qas}
        )
    return records


NEAR_DEPTH, FAR_DEPTH = 2.0, 8.0  # metres: the ground plane at the bottom and top image rows


def scene_depth_mm(instance: np.ndarray, objects: list) -> np.ndarray:
    """The scene's depth map in millimetres, uint16 ``(S, S)`` (ScanNet's depth PNG units).

    The background is a ground plane receding to the top: ``FAR_DEPTH`` metres at the top row,
    ``NEAR_DEPTH`` at the bottom, linear in the row. Each object is an upright card standing on
    that plane at the bottom row of its visible box: all its pixels at the ground's depth there,
    so it is nearer than the ground it hides. (Occlusion follows the drawing order, not depth.)
    """
    size = instance.shape[0]
    rows = (np.arange(size, dtype=np.float64) + 0.5) / size  # (S,) 0 at the top, 1 at the bottom
    ground = FAR_DEPTH - (FAR_DEPTH - NEAR_DEPTH) * rows
    depth = np.repeat(ground[:, None], instance.shape[1], axis=1)
    for index, obj in enumerate(objects):
        depth[instance == index] = ground[obj.box[3] - 1]
    return np.rint(depth * 1000.0).astype(np.uint16)


def write_annotations(
    paths: Any, by_split: Mapping[str, list[dict[str, Any]]], config: Any, size: int
) -> dict[str, Any]:
    """Write the VQA v2, COCO and label-map files of a set (``paths``: a ``scenes.ScenePaths``;
    ``config``: its ``SceneConfig``); return the split part of ``meta.json``."""
    categories = config.categories
    coco_categories = [
        {"id": i + 1, "name": name, "supercategory": "shape" if i < len(config.shapes) else "digit"}
        for i, name in enumerate(categories)
    ]
    write_label_map(paths.label_map, LabelMap.identity(("background", *categories)))
    write_label_map(paths.colour_label_map, LabelMap.identity(("background", *config.colours)))
    splits_meta: dict[str, Any] = {}
    qa_by_split: dict[str, list[dict[str, str]]] = {}
    for split in paths.splits:
        questions, annotations, images, instances = [], [], [], []
        for record in by_split.get(split, []):
            image_id = record["image_id"]
            images.append(
                {"id": image_id, "file_name": record["file_name"], "width": size, "height": size}
            )
            for category, colour, (x0, y0, x1, y1), area, rle in record["objects"]:
                entry = {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "iscrowd": 0,
                    "color": config.colours[colour],
                }
                if rle is not None:
                    entry["segmentation"] = rle
                instances.append(entry)
            for k, (qtype, text, answer) in enumerate(record["qas"]):
                question_id = image_id * 1000 + k
                questions.append(
                    {"image_id": image_id, "question": text, "question_id": question_id}
                )
                annotations.append(
                    vqa_annotation(
                        question_id,
                        image_id,
                        [answer] * 10,
                        question_type=qtype,
                        answer_type=ANSWER_TYPES[qtype],
                    )
                )
        split_paths = paths[split]
        write_vqa_v2(
            split_paths.questions,
            split_paths.annotations,
            questions,
            annotations,
            data_type=DATA_TYPE,
            data_subtype=split,
            description=f"distiq synthetic edge scenes, {split} split",
        )
        write_coco_instances(
            split_paths.instances,
            images,
            instances,
            coco_categories,
            description=f"distiq synthetic edge scenes, {split} split",
        )
        qa_by_split[split] = [
            {
                "question": q["question"],
                "answer": a["multiple_choice_answer"],
                "question_type": a["question_type"],
            }
            for q, a in zip(questions, annotations)
        ]
        splits_meta[split] = {
            "images": len(images),
            "objects": len(instances),
            "questions": len(questions),
            "question_types": dict(
                sorted(Counter(a["question_type"] for a in annotations).items())
            ),
        }
    meta: dict[str, Any] = {
        "splits": splits_meta,
        "categories": list(categories),
        "colours": list(config.colours),
    }
    if qa_by_split.get("train") and qa_by_split.get("test"):
        meta["blind_baseline"] = {
            "accuracy": blind_baseline_accuracy(qa_by_split["train"], qa_by_split["test"]),
            "by_type": blind_baseline_by_type(qa_by_split["train"], qa_by_split["test"]),
        }
    return meta
