"""Writers for the real data-set formats, and the label-map file of generic mask folders.

VQA v2 (https://visualqa.org/download.html), as the official files are laid out:

- questions JSON: ``{"info", "task_type": "Open-Ended", "data_type", "data_subtype", "license",
  "questions": [{"image_id": int, "question": str, "question_id": int}, ...]}``
- annotations JSON: ``{"info", "license", "data_type", "data_subtype", "annotations": [
  {"question_id": int, "image_id": int, "question_type": str, "answer_type": "yes/no" | "number"
  | "other", "multiple_choice_answer": str, "answers": [{"answer": str, "answer_confidence":
  "yes" | "maybe" | "no", "answer_id": 1..10}, ...ten of them]}, ...]}``
- images: ``COCO_{data_subtype}_{image_id:012d}.jpg`` (``.png`` accepted).

COCO detection instances JSON: ``{"info", "licenses", "images": [{"id", "file_name", "width",
"height"}], "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h] (pixels,
top-left origin), "area", "iscrowd": 0 | 1, "segmentation": polygons | RLE (optional)}],
"categories": [{"id", "name", "supercategory"}]}``. Category ids need not be contiguous.

Masks: single-channel PNG, uint8 (or 16-bit), one class index per pixel, 255 = ignore.

Label map (the generic image + mask folder's description of its mask values), JSON::

    {"classes": ["background", "car", ...],          # class index -> name
     "values": {"0": 0, "7": 1, "255": 255,          # mask pixel value -> class index
                "128,64,128": 1}}                     # or "r,g,b" for colour-coded masks

``values`` maps every pixel value that may occur to a class index in ``[0, len(classes))`` or to
255 (ignore). A pixel value that is not a key is a *label outside the map* (a bad record). Without
``values`` the map is the identity on ``0 .. len(classes)-1`` plus 255 → ignore.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distiq.config import atomic_write, read_utf8

IGNORE_INDEX = 255


def vqa_image_name(data_subtype: str, image_id: int, ext: str = ".jpg") -> str:
    """The VQA v2 / COCO 2014 image file name: ``COCO_{data_subtype}_{image_id:012d}{ext}``."""
    return f"COCO_{data_subtype}_{image_id:012d}{ext}"


def vqa_annotation(
    question_id: int,
    image_id: int,
    answers: Sequence[str],
    *,
    question_type: str,
    answer_type: str,
    confidences: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One VQA v2 annotation entry; ``multiple_choice_answer`` is the most frequent answer
    (ties: the first given)."""
    if not answers:
        raise ValueError(f"question {question_id} has no answers; VQA v2 stores ten per question")
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    best = max(counts, key=lambda a: counts[a])  # dicts keep insertion order: first wins ties
    confidences = confidences or ["yes"] * len(answers)
    return {
        "question_type": question_type,
        "multiple_choice_answer": best,
        "answers": [
            {"answer": a, "answer_confidence": c, "answer_id": i + 1}
            for i, (a, c) in enumerate(zip(answers, confidences))
        ],
        "image_id": image_id,
        "answer_type": answer_type,
        "question_id": question_id,
    }


def write_vqa_v2(
    questions_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    questions: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    *,
    data_type: str,
    data_subtype: str,
    description: str = "",
) -> tuple[Path, Path]:
    """Write the questions and annotations JSON of one VQA v2 split (atomically)."""
    info = {"description": description, "version": "2.0", "year": 2017}
    licence = {"name": "Creative Commons Attribution 4.0 International License", "url": ""}
    questions_doc = {
        "info": info,
        "task_type": "Open-Ended",
        "data_type": data_type,
        "license": licence,
        "data_subtype": data_subtype,
        "questions": questions,
    }
    annotations_doc = {
        "info": info,
        "license": licence,
        "data_type": data_type,
        "data_subtype": data_subtype,
        "annotations": annotations,
    }
    return (
        atomic_write(questions_path, json.dumps(questions_doc, separators=(",", ":"))),
        atomic_write(annotations_path, json.dumps(annotations_doc, separators=(",", ":"))),
    )


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a boolean ``(H, W)`` mask: ``{"counts": [...], "size": [H, W]}``,
    runs over the column-major (Fortran-order) pixels, starting with a run of zeros — what
    ``pycocotools.mask.frPyObjects`` reads."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_coco_instances(
    path: str | os.PathLike,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    *,
    description: str = "",
) -> Path:
    """Write a COCO detection instances JSON (atomically)."""
    doc = {
        "info": {"description": description, "version": "1.0", "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return atomic_write(path, json.dumps(doc, separators=(",", ":")))


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of an 8-bit ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 array, or a 16-bit
    ``(H, W)`` grey uint16 array (depth maps), no interlace, row filter 0. A direct zlib writer:
    several times faster than PIL's for small images, and any PNG reader (PIL included) decodes
    it."""
    grey16 = array.dtype == np.uint16 and array.ndim == 2
    if not grey16 and (
        array.dtype != np.uint8
        or array.ndim not in (2, 3)
        or (array.ndim == 3 and array.shape[2] != 3)
    ):
        raise ValueError(
            "encode_png takes (H, W) or (H, W, 3) uint8, or (H, W) uint16, got "
            f"{array.dtype} {array.shape}"
        )
    height, width = array.shape[:2]
    colour_type = 0 if array.ndim == 2 else 2
    data = array.astype(">u2").view(np.uint8) if grey16 else array  # PNG samples are big-endian
    rows = np.zeros((height, 1 + data[0].size), dtype=np.uint8)  # filter byte 0 per row
    rows[:, 1:] = data.reshape(height, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16 if grey16 else 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level))
        + chunk(b"IEND", b"")
    )


def save_png(path: str | os.PathLike, array: np.ndarray, compress_level: int = 1) -> None:
    """Save a uint8 ``(H, W)`` or ``(H, W, 3)`` array, or a uint16 ``(H, W)`` one, as PNG (see
    :func:`encode_png`)."""
    with open(path, "wb") as fh:
        fh.write(encode_png(array, compress_level))


def save_mask_png(path: str | os.PathLike, mask: np.ndarray, compress_level: int = 1) -> None:
    """Save an ``(H, W)`` uint8 class-index mask as a single-channel 8-bit PNG."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a mask PNG holds an (H, W) uint8 array, got {mask.dtype} {mask.shape}")
    save_png(path, mask, compress_level)


@dataclass(frozen=True)
class LabelMap:
    """Mask pixel value (an int, or an ``(r, g, b)`` tuple for colour-coded masks) → class index
    (``0 .. len(classes)-1``, or 255 = ignore)."""

    classes: tuple[str, ...]
    values: Mapping[int | tuple[int, int, int], int]

    def __post_init__(self) -> None:
        problems = [
            f"{key!r} -> {index}"
            for key, index in self.values.items()
            if not (0 <= index < len(self.classes) or index == IGNORE_INDEX)
        ]
        if problems:
            raise ValueError(
                f"label map values must map to a class index in [0, {len(self.classes)}) or to "
                f"{IGNORE_INDEX} (ignore); wrong: {', '.join(problems[:5])}"
            )
        kinds = {isinstance(key, tuple) for key in self.values}
        if len(kinds) > 1:
            raise ValueError("a label map's keys are all pixel values or all 'r,g,b' colours")

    @property
    def colour_coded(self) -> bool:
        return any(isinstance(key, tuple) for key in self.values)

    @classmethod
    def identity(cls, classes: Sequence[str]) -> LabelMap:
        values: dict[int | tuple[int, int, int], int] = {i: i for i in range(len(classes))}
        values[IGNORE_INDEX] = IGNORE_INDEX
        return cls(tuple(classes), values)

    def to_json(self) -> dict[str, Any]:
        def key(k: int | tuple[int, int, int]) -> str:
            return ",".join(map(str, k)) if isinstance(k, tuple) else str(k)

        return {
            "classes": list(self.classes),
            "values": {key(k): v for k, v in self.values.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "label map") -> LabelMap:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("classes"), list):
            raise ValueError(
                f"{source}: a label map is a JSON object with a 'classes' list (and optionally "
                "'values': {pixel value or 'r,g,b': class index})"
            )
        classes = tuple(str(c) for c in doc["classes"])
        if "values" not in doc:
            return cls.identity(classes)
        values: dict[int | tuple[int, int, int], int] = {}
        for raw, index in dict(doc["values"]).items():
            try:
                parts = [int(p) for p in str(raw).split(",")]
            except ValueError:
                raise ValueError(
                    f"{source}: label map key {raw!r} is neither a pixel value nor 'r,g,b'"
                ) from None
            if len(parts) not in (1, 3):
                raise ValueError(f"{source}: label map key {raw!r} is neither a value nor 'r,g,b'")
            values[parts[0] if len(parts) == 1 else (parts[0], parts[1], parts[2])] = int(index)
        try:
            return cls(classes, values)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def write_label_map(path: str | os.PathLike, label_map: LabelMap) -> Path:
    return atomic_write(path, json.dumps(label_map.to_json(), indent=1))


def load_label_map(path: str | os.PathLike) -> LabelMap:
    """Read a label-map JSON file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} does not exist")
    try:
        doc = json.loads(read_utf8(path, "label map"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return LabelMap.from_json(doc, source=str(path))
