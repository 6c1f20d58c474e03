"""Detection loaders for the driving data sets: KITTI object detection and BDD100K boxes.

Both return a :class:`~distiq.data.detection.DetectionDataset` (samples ``{"image", "boxes"
(N, 4) xyxy pixels, "labels" (N,), "image_id"}``), with the same bad-record rules as the COCO
and VOC loaders (:mod:`distiq.data.detection`).

KITTI (``root`` = the ``training`` folder of the object benchmark, or any folder with the same
layout): ``image_2/<id>.png`` and ``label_2/<id>.txt``, one object a line — ``type truncated
occluded alpha left top right bottom h w l x y z rotation_y``; the 2-D box is ``left top right
bottom`` in pixels. ``DontCare`` regions are left out (they mark unlabelled areas, not
objects), as are classes outside ``classes`` when ``drop_other_classes`` (default: ``Misc`` and
``Person_sitting`` are kept as classes of their own). KITTI ships no validation split: pass
``ids`` (or an ``ImageSets``-style ``split_file`` of ids) to pick one.

BDD100K (``labels``: a detection labels JSON — the ``det_20`` files or the older
``bdd100k_labels_images_{split}.json``; ``image_dir``: ``images/100k/{split}``): a list of
frames ``{"name": file, "labels": [{"category", "box2d": {"x1", "y1", "x2", "y2"}}, ...]}``;
labels without ``box2d`` (lanes, drivable area) are not boxes and are left out. The older files'
category names (``person``, ``bike``, ``motor``) are mapped to ``det_20``'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from distiq.data.detection import DetectionDataset, _box_problem, _image_size_problem, _number
from distiq.data.records import LABEL_OUTSIDE_MAP, MALFORMED, MISSING_ANNOTATION, RecordPolicy
from distiq.data.vqa import read_json

KITTI_CLASSES: tuple[str, ...] = (
    "Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc",
)  # fmt: skip
BDD100K_DETECTION_CLASSES: tuple[str, ...] = (
    "pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    "traffic light", "traffic sign",
)  # fmt: skip
BDD100K_LEGACY_NAMES = {"person": "pedestrian", "bike": "bicycle", "motor": "motorcycle"}


def _kitti_objects(
    path: Path, index_of: dict[str, int], drop_other: bool
) -> tuple[list[list[float]], list[int], tuple[str, str] | None]:
    """Boxes and labels of one KITTI label file, or the problem that makes it a bad record."""
    boxes, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 8:
            return [], [], (MALFORMED, f"line {number + 1} has {len(fields)} fields, expected 15")
        kind = fields[0]
        if kind == "DontCare":
            continue
        if kind not in index_of:
            if drop_other:
                continue
            return [], [], (LABEL_OUTSIDE_MAP, f"line {number + 1}: class {kind!r} is unknown")
        try:
            box = [float(v) for v in fields[4:8]]
        except ValueError:
            return [], [], (MALFORMED, f"line {number + 1}: the box {fields[4:8]} is not numbers")
        boxes.append(box)
        labels.append(index_of[kind])
    return boxes, labels, None


def load_kitti_detection(
    root: str | os.PathLike,
    *,
    ids: Iterable[str] | None = None,
    split_file: str | os.PathLike | None = None,
    classes: Sequence[str] = KITTI_CLASSES,
    drop_other_classes: bool = False,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> DetectionDataset:
    """KITTI object detection (see the module docstring): every ``label_2`` file, or the ``ids``
    / ``split_file`` ones."""
    root = Path(root)
    label_dir, image_dir = root / "label_2", root / "image_2"
    if not label_dir.is_dir() or not image_dir.is_dir():
        raise FileNotFoundError(
            f"{root} has no label_2/ and image_2/ folders; pass KITTI's training folder"
        )
    if split_file is not None:
        ids = Path(split_file).read_text().split()
    names = sorted(ids) if ids is not None else sorted(p.stem for p in label_dir.glob("*.txt"))
    policy = RecordPolicy(on_bad_record, root)
    index_of = {name: i for i, name in enumerate(classes)}
    records = []
    for position, name in enumerate(names):
        where = f"image {name}"
        label_path = label_dir / f"{name}.txt"
        if not label_path.is_file():
            policy.bad(label_path, where, MISSING_ANNOTATION, "the label file is missing")
            continue
        boxes, labels, problem = _kitti_objects(label_path, index_of, drop_other_classes)
        image_path = image_dir / f"{name}.png"
        if problem is None:
            image_bad = _image_size_problem(image_path, check_images, None, None)
            if image_bad is not None:
                policy.bad(image_path, where, *image_bad)
                continue
            width = height = None
            if check_images:
                from PIL import Image

                with Image.open(image_path) as image:
                    width, height = image.size
            for box in boxes:
                box_bad = _box_problem(box, width, height)
                if box_bad:
                    problem = (MALFORMED, box_bad)
                    break
        if problem is not None:
            policy.bad(label_path, where, *problem)
            continue
        records.append(
            {"image_path": str(image_path), "image_id": position, "name": name, "boxes": boxes,
             "labels": labels, "width": None, "height": None}
        )  # fmt: skip
        policy.keep()
    return DetectionDataset(records, policy.finish(), classes)


def load_bdd100k_detection(
    labels: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    classes: Sequence[str] = BDD100K_DETECTION_CLASSES,
    drop_other_classes: bool = True,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> DetectionDataset:
    """BDD100K boxes (see the module docstring). Categories outside ``classes`` are left out
    by default (``drop_other_classes=False`` makes them bad records)."""
    path, image_dir = Path(labels), Path(image_dir)
    frames = read_json(path, "BDD100K labels JSON")
    if isinstance(frames, dict) and isinstance(frames.get("frames"), list):
        frames = frames["frames"]
    if not isinstance(frames, list):
        raise ValueError(f"{path}: a BDD100K labels file is a list of frames (name, labels)")
    policy = RecordPolicy(on_bad_record, path)
    index_of = {name: i for i, name in enumerate(classes)}
    records = []
    for position, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
            policy.bad(path, f"frame #{position}", MALFORMED, "needs a string 'name'")
            continue
        where = f"frame {frame['name']}"
        boxes, labels, problem = [], [], None
        for label in frame.get("labels") or []:
            box = label.get("box2d") if isinstance(label, dict) else None
            if box is None:
                continue
            category = BDD100K_LEGACY_NAMES.get(label.get("category"), label.get("category"))
            if category not in index_of:
                if drop_other_classes:
                    continue
                problem = (LABEL_OUTSIDE_MAP, f"category {category!r} is not a class")
                break
            corners = (
                [box.get(k) for k in ("x1", "y1", "x2", "y2")] if isinstance(box, dict) else []
            )
            if len(corners) != 4 or not all(_number(v) for v in corners):
                problem = (MALFORMED, f"box2d {box!r} needs numbers x1, y1, x2, y2")
                break
            box_bad = _box_problem(corners, None, None)
            if box_bad:
                problem = (MALFORMED, box_bad)
                break
            boxes.append([float(v) for v in corners])
            labels.append(index_of[category])
        image_path = image_dir / frame["name"]
        if problem is None:
            image_bad = _image_size_problem(image_path, check_images, None, None)
            if image_bad is not None:
                policy.bad(image_path, where, *image_bad)
                continue
        if problem is not None:
            policy.bad(path, where, *problem)
            continue
        records.append(
            {"image_path": str(image_path), "image_id": position, "name": frame["name"],
             "boxes": boxes, "labels": labels, "width": None, "height": None}
        )  # fmt: skip
        policy.keep()
    return DetectionDataset(records, policy.finish(), classes)


__all__ = [
    "BDD100K_DETECTION_CLASSES",
    "KITTI_CLASSES",
    "load_bdd100k_detection",
    "load_kitti_detection",
]
