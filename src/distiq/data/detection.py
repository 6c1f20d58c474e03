"""Loaders for object detection: COCO instances JSON and Pascal VOC XML.

Both return a :class:`DetectionDataset`, whose ``dataset[i]`` is the detection sample dict::

    {"image": PIL.Image (RGB), "boxes": FloatTensor (N, 4) xyxy in pixels (pixel-edge
     coordinates: a box covering columns 3..9 has x0 = 3, x1 = 10), "labels": LongTensor (N,)
     class index in [0, num_classes), "image_id": int}

``dataset.classes`` names the classes by index. For COCO, ``dataset.category_ids[i]`` is the
COCO category id of class ``i`` (ids sorted ascending, so COCO's sparse 1..90 become 0..79):
map predictions back with it before COCO evaluation.

COCO (layout in :mod:`distiq.data.formats`): images are ``image_dir/file_name``. Crowd boxes
(``iscrowd: 1``) are left out unless ``include_crowd``. Images without boxes are kept (they are
negatives) unless ``drop_empty``.

Pascal VOC (``root`` = ``VOCdevkit/VOC2012`` or ``VOC2007``): ``Annotations/{id}.xml``,
``JPEGImages/{filename}`` and ``ImageSets/Main/{split}.txt`` (``split=None``: every XML file).
VOC's 1-based inclusive corners become pixel-edge coordinates ``(xmin - 1, ymin - 1, xmax,
ymax)``. Objects marked ``difficult`` are left out unless ``keep_difficult``. ``image_id`` is the
position in the split; ``dataset.records[i]["name"]`` keeps VOC's id (``2008_000008``).

Bad records (see :mod:`distiq.data.records`): a box that is not four finite numbers with positive
width and height inside the image (1 px tolerance), a category / class name outside the map, an
image entry or XML that does not parse, an image whose size differs from its annotation, a
missing or corrupt image. A bad box makes its whole image a bad record, since keeping the image
without that box would teach a false negative.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from distiq.data.records import (
    CORRUPT_IMAGE,
    LABEL_OUTSIDE_MAP,
    MALFORMED,
    MISSING_ANNOTATION,
    RecordDataset,
    RecordPolicy,
    image_problem,
    read_image,
)
from distiq.data.vqa import read_json

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
BOX_TOLERANCE = 1.0  # pixels a box may reach past the image border (rounding in real data sets)


class DetectionDataset(RecordDataset):
    """Detection samples; ``records[i]`` holds ``image_path``, ``image_id``, ``boxes`` (xyxy
    lists), ``labels``, ``width``, ``height``."""

    task = "detection"

    def __init__(
        self, records, summary, classes: Sequence[str], category_ids: Sequence[int] | None = None
    ):
        super().__init__(records, summary)
        self.classes = tuple(classes)
        self.category_ids = tuple(category_ids) if category_ids is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _sample(self, record: dict[str, Any]) -> dict[str, Any]:
        import torch

        image = read_image(Path(record["image_path"]), f"image_id {record['image_id']}")
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(record["labels"], dtype=torch.long)
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": record["image_id"]}


def _box_problem(box: Sequence[float], width: float | None, height: float | None) -> str | None:
    """``box`` is xyxy; ``None`` when it is a valid box inside a ``width × height`` image."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        return f"box {list(box)} has a non-finite coordinate"
    if x1 <= x0 or y1 <= y0:
        return f"box {list(box)} (xyxy) has no positive width and height"
    if (
        width is not None
        and height is not None
        and (
            x0 < -BOX_TOLERANCE
            or y0 < -BOX_TOLERANCE
            or x1 > width + BOX_TOLERANCE
            or y1 > height + BOX_TOLERANCE
        )
    ):
        return f"box {list(box)} (xyxy) lies outside the {width:g}×{height:g} image"
    return None


def _image_size_problem(path: Path, check: bool, width: Any, height: Any) -> tuple[str, str] | None:
    """Missing / corrupt image, or (when the annotation states a size) a size mismatch."""
    problem = image_problem(path, decode=check)
    if problem is not None or not check or width is None or height is None:
        return problem
    try:
        with Image.open(path) as image:
            size = image.size
    except OSError as exc:  # decodable a moment ago; treat a race as corruption
        return CORRUPT_IMAGE, f"{path} cannot be opened ({exc})"
    if size != (int(width), int(height)):
        return MALFORMED, f"annotation says {width}×{height} but the image is {size[0]}×{size[1]}"
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_coco_detection(
    instances_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
    include_crowd: bool = False,
    drop_empty: bool = False,
) -> DetectionDataset:
    """Load a COCO detection instances JSON and its image folder."""
    path, image_dir = Path(instances_json), Path(image_dir)
    policy = RecordPolicy(on_bad_record, path)
    doc = read_json(path, "COCO instances JSON")
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise ValueError(
            f"{path}: a COCO instances file needs 'images', 'annotations' and 'categories' lists"
        )
    names: dict[int, str] = {}
    for i, category in enumerate(doc["categories"]):
        if (
            not isinstance(category, dict)
            or not isinstance(category.get("id"), int)
            or "name" not in category
        ):
            raise ValueError(
                f"{path}: category #{i} needs an integer 'id' and a 'name' (the label map cannot be built)"
            )
        names[category["id"]] = str(category["name"])
    category_ids = sorted(names)
    index_of = {cid: i for i, cid in enumerate(category_ids)}

    by_image: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int):
            policy.bad(path, f"annotation #{i}", MALFORMED, "no integer 'image_id'")
            continue
        by_image[ann["image_id"]].append(ann)
    known_ids = {e.get("id") for e in doc["images"] if isinstance(e, dict)}
    for image_id in sorted(set(by_image) - known_ids):
        policy.bad(
            path,
            f"annotations of image_id {image_id}",
            MALFORMED,
            "no entry in 'images' has this id",
        )

    records, seen = [], set()
    for i, entry in enumerate(doc["images"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int)
            or not isinstance(entry.get("file_name"), str)
        ):
            policy.bad(
                path, f"image #{i}", MALFORMED, "needs an integer 'id' and a string 'file_name'"
            )
            continue
        image_id = entry["id"]
        where = f"image_id {image_id}"
        if image_id in seen:
            policy.bad(path, where, MALFORMED, "appears twice in 'images'")
            continue
        seen.add(image_id)
        width, height = entry.get("width"), entry.get("height")
        boxes, labels, problem = [], [], None
        for ann in by_image.get(image_id, []):
            bbox = ann.get("bbox")
            if ann.get("category_id") not in index_of:
                problem = (
                    LABEL_OUTSIDE_MAP,
                    f"annotation {ann.get('id')}: category_id {ann.get('category_id')!r} is not in 'categories'",
                )
                break
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
                problem = (
                    MALFORMED,
                    f"annotation {ann.get('id')}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}",
                )
                break
            x, y, w, h = (float(v) for v in bbox)
            box_bad = _box_problem((x, y, x + w, y + h), width, height)
            if box_bad:
                problem = (MALFORMED, f"annotation {ann.get('id')}: {box_bad}")
                break
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(index_of[ann["category_id"]])
        if problem is not None:
            policy.bad(path, where, *problem)
            continue
        if drop_empty and not boxes:
            continue
        image_path = image_dir / entry["file_name"]
        image_bad = _image_size_problem(image_path, check_images, width, height)
        if image_bad is not None:
            policy.bad(image_path, where, *image_bad)
            continue
        records.append(
            {"image_path": str(image_path), "image_id": image_id, "boxes": boxes, "labels": labels,
             "width": width, "height": height}
        )  # fmt: skip
        policy.keep()
    return DetectionDataset(
        records, policy.finish(), [names[c] for c in category_ids], category_ids
    )


def _voc_ids(root: Path, split: str | None) -> list[str]:
    if split is None:
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(
            f"Pascal VOC split file {split_file} does not exist; pass split='train', 'val', "
            "'trainval', 'test' (whichever your VOC copy has) or split=None for every XML file"
        )
    return [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]


def _voc_objects(tree: ET.Element, classes: dict[str, int], keep_difficult: bool, width, height):
    """Boxes and labels of one VOC XML; raises ``ValueError((reason, detail))`` on a bad object."""
    boxes, labels = [], []
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise ValueError(
                (
                    LABEL_OUTSIDE_MAP,
                    f"object #{k}: class {name!r} is not one of the {len(classes)} classes",
                )
            )
        bndbox = obj.find("bndbox")
        no_box = (MALFORMED, f"object #{k} ({name}): no numeric bndbox xmin/ymin/xmax/ymax")
        if bndbox is None:
            raise ValueError(no_box)
        try:
            xmin, ymin, xmax, ymax = (
                float(bndbox.findtext(t) or "nan") for t in ("xmin", "ymin", "xmax", "ymax")
            )
        except ValueError:
            raise ValueError(no_box) from None
        box = (xmin - 1.0, ymin - 1.0, xmax, ymax)
        problem = _box_problem(box, width, height)
        if problem:
            raise ValueError((MALFORMED, f"object #{k} ({name}): {problem}"))
        if (obj.findtext("difficult") or "0").strip() == "1" and not keep_difficult:
            continue
        boxes.append(list(box))
        labels.append(classes[name])
    return boxes, labels


def load_pascal_voc(
    root: str | os.PathLike,
    split: str | None = "trainval",
    *,
    classes: Sequence[str] = VOC_CLASSES,
    keep_difficult: bool = False,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> DetectionDataset:
    """Load Pascal VOC detection annotations (``root`` holds ``Annotations/``, ``JPEGImages/``
    and ``ImageSets/Main/``)."""
    root = Path(root)
    if not (root / "Annotations").is_dir():
        raise FileNotFoundError(
            f"{root} has no Annotations/ folder; pass the VOC2007/VOC2012 folder"
        )
    policy = RecordPolicy(on_bad_record, root)
    index_of = {name: i for i, name in enumerate(classes)}
    records = []
    for position, name in enumerate(_voc_ids(root, split)):
        xml_path = root / "Annotations" / f"{name}.xml"
        where = f"image {name}"
        if not xml_path.is_file():
            policy.bad(
                xml_path,
                where,
                MISSING_ANNOTATION,
                "the split lists it but the XML file is missing",
            )
            continue
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            policy.bad(xml_path, where, MALFORMED, f"XML does not parse ({exc})")
            continue
        try:
            width = float(tree.findtext("size/width") or "nan")
            height = float(tree.findtext("size/height") or "nan")
        except ValueError:
            width = height = math.nan
        if not (math.isfinite(width) and math.isfinite(height)):
            width = height = None  # VOC always states it; tolerate its absence (no bounds check)
        try:
            boxes, labels = _voc_objects(tree, index_of, keep_difficult, width, height)
        except ValueError as exc:
            policy.bad(xml_path, where, *exc.args[0])
            continue
        image_path = (
            root / "JPEGImages" / ((tree.findtext("filename") or "").strip() or f"{name}.jpg")
        )
        image_bad = _image_size_problem(image_path, check_images, width, height)
        if image_bad is not None:
            policy.bad(image_path, where, *image_bad)
            continue
        records.append(
            {"image_path": str(image_path), "image_id": position, "name": name, "boxes": boxes,
             "labels": labels, "width": width, "height": height}
        )  # fmt: skip
        policy.keep()
    return DetectionDataset(records, policy.finish(), classes)
