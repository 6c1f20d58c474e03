"""Loaders for semantic segmentation folders: a generic image + mask folder with a label map,
Cityscapes, KITTI, BDD100K, ADE20K and ScanNet-style frames.

All return a :class:`SegmentationDataset`, whose ``dataset[i]`` is the segmentation sample::

    {"image": PIL.Image (RGB), "mask": LongTensor (H, W) class index in [0, num_classes) or
     255 = ignore, "image_id": int}

Every loader pairs image files with mask files and reads the masks through a
:class:`~distiq.data.formats.LabelMap` (pixel value → class index or 255); a pixel value the map
does not know is a *label outside the map* (a bad record). Layouts and maps:

============ ============================================================ =========================
loader       layout (under ``root``)                                      mask values → classes
============ ============================================================ =========================
folder       ``image_dir/<stem>.{jpg,png,...}`` + ``mask_dir/<stem>.png``  the given label map
cityscapes   ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` +           labelIds 0..33 → the 19
             ``gtFine/{split}/{city}/*_gtFine_labelIds.png``              trainIds; others → 255
kitti        ``{split}/image_2/*.png`` + ``{split}/semantic/*.png``        as Cityscapes (labelIds)
             (KITTI semantics, ``split="training"``)
bdd100k      ``images/10k/{split}/*.jpg`` + ``labels/sem_seg/masks/        trainIds 0..18, 255
             {split}/*.png``, or the older ``seg/images/{split}`` +
             ``seg/labels/{split}/*_train_id.png``
ade20k       ``images/{split}/*.jpg`` + ``annotations/{split}/*.png``      0 → 255, k → k - 1
             (ADEChallengeData2016, ``split="training"|"validation"``)    (150 classes)
scannet      ``<scene>/color/<frame>.jpg`` + ``<scene>/label-filt/         NYU40 ids 0..40 → the
             <frame>.png`` (8 or 16-bit)                                  20 benchmark classes,
                                                                          others → 255
============ ============================================================ =========================

``image_id`` is the number at the end of the file stem when every stem ends in a distinct
number (so the synthetic scenes keep their ids), else the position in sorted order;
``dataset.records[i]["name"]`` keeps the stem. ScanNet colour frames are larger than their
labels: they are resized (bilinear) to the mask size (``resize_image_to_mask``); elsewhere an
image whose size differs from its mask is a malformed record.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distiq.data.formats import IGNORE_INDEX, LabelMap, load_label_map
from distiq.data.records import (
    LABEL_OUTSIDE_MAP,
    MALFORMED,
    MISSING_ANNOTATION,
    BadRecordError,
    RecordDataset,
    RecordPolicy,
    image_problem,
    read_image,
    read_label_image,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
# Cityscapes labelId -> trainId (cityscapesScripts labels.py); every other id 0..33 is ignored.
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
# ScanNet benchmark: NYU40 id -> name of its 20 evaluated classes (in this order).
SCANNET_NYU40_CLASSES: dict[int, str] = {
    1: "wall", 2: "floor", 3: "cabinet", 4: "bed", 5: "chair", 6: "sofa", 7: "table", 8: "door",
    9: "window", 10: "bookshelf", 11: "picture", 12: "counter", 14: "desk", 16: "curtain",
    24: "refrigerator", 28: "shower curtain", 33: "toilet", 34: "sink", 36: "bathtub",
    39: "otherfurniture",
}  # fmt: skip


def cityscapes_label_map() -> LabelMap:
    """labelIds 0..33 → the 19 trainIds (others → 255)."""
    values = {i: CITYSCAPES_TRAIN_IDS.get(i, IGNORE_INDEX) for i in range(34)}
    return LabelMap(CITYSCAPES_CLASSES, values)


def bdd100k_label_map() -> LabelMap:
    """trainIds 0..18 and 255 (ignore), the Cityscapes classes."""
    return LabelMap.identity(CITYSCAPES_CLASSES)


def ade20k_label_map() -> LabelMap:
    """0 ("other") → 255, k → k - 1 for the 150 classes (mmseg's ``reduce_zero_label``)."""
    values = {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, len(ADE20K_CLASSES) + 1)}}
    return LabelMap(ADE20K_CLASSES, values)


def scannet_label_map() -> LabelMap:
    """NYU40 ids 0..40 → the 20 ScanNet benchmark classes (others, and 0 = unlabelled → 255)."""
    index = {nyu: i for i, nyu in enumerate(SCANNET_NYU40_CLASSES)}
    values = {i: index.get(i, IGNORE_INDEX) for i in range(41)}
    return LabelMap(tuple(SCANNET_NYU40_CLASSES.values()), values)


class _Lookup:
    """Applies a label map to raw label arrays: ``(H, W)`` ints or ``(H, W, 3)`` colours."""

    def __init__(self, label_map: LabelMap) -> None:
        self.label_map = label_map
        self.colour_coded = label_map.colour_coded
        if self.colour_coded:
            self.table = {(r << 16) | (g << 8) | b: v for (r, g, b), v in label_map.values.items()}  # type: ignore[misc]
        else:
            size = max(256, max(label_map.values, default=0) + 1)  # type: ignore[type-var]
            self.lut = np.full(size, -1, dtype=np.int64)
            for raw, index in label_map.values.items():
                self.lut[raw] = index

    def __call__(self, raw: np.ndarray) -> tuple[np.ndarray | None, str | None, list[Any]]:
        """Return ``(classes (H, W) int64, None, unknown)``; ``unknown`` lists raw values outside
        the map (their pixels are -1). A wrong kind of mask gives ``(None, problem, [])``."""
        if self.colour_coded:
            if raw.ndim != 3:
                return None, "single-channel mask, but the label map's keys are 'r,g,b' colours", []
            key = (
                (raw[..., 0].astype(np.int64) << 16)
                | (raw[..., 1].astype(np.int64) << 8)
                | raw[..., 2]
            )
            uniq, inverse = np.unique(key, return_inverse=True)
            mapped = np.array([self.table.get(int(k), -1) for k in uniq], dtype=np.int64)
            out = mapped[inverse].reshape(key.shape)
            unknown = [
                ((int(k) >> 16) & 255, (int(k) >> 8) & 255, int(k) & 255) for k in uniq[mapped < 0]
            ]
            return out, None, unknown
        if raw.ndim != 2:
            return None, "colour (RGB) mask, but the label map maps single pixel values", []
        raw = raw.astype(np.int64)
        inside = raw < len(self.lut)
        out = self.lut[np.where(inside, raw, 0)]
        out[~inside] = -1
        unknown = np.unique(raw[out < 0]).tolist() if (out < 0).any() else []
        return out, None, unknown


class SegmentationDataset(RecordDataset):
    """Segmentation samples; ``records[i]`` holds ``image_path``, ``mask_path``, ``image_id`` and
    ``name``. ``classes`` / ``num_classes`` come from the label map."""

    task = "segmentation"

    def __init__(self, records, summary, label_map: LabelMap, resize_image_to_mask: bool = False):
        super().__init__(records, summary)
        self.label_map = label_map
        self.resize_image_to_mask = resize_image_to_mask
        self._lookup = _Lookup(label_map)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.label_map.classes

    @property
    def num_classes(self) -> int:
        return len(self.label_map.classes)

    def _sample(self, record: dict[str, Any]) -> dict[str, Any]:
        import torch

        where = f"image {record['name']}"
        image = read_image(Path(record["image_path"]), where)
        mask, problem = self._mask(Path(record["mask_path"]), where)
        if problem is not None:
            raise BadRecordError(record["mask_path"], where, *problem)
        if self.resize_image_to_mask and image.size != (mask.shape[1], mask.shape[0]):
            image = image.resize((mask.shape[1], mask.shape[0]), Image.Resampling.BILINEAR)
        return {"image": image, "mask": torch.from_numpy(mask), "image_id": record["image_id"]}

    def _mask(self, path: Path, where: str) -> tuple[np.ndarray, tuple[str, str] | None]:
        raw = read_label_image(path, where)
        mask, kind_problem, unknown = self._lookup(raw)
        if kind_problem is not None:
            return raw, (MALFORMED, kind_problem)
        if unknown:
            shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
            return mask, (LABEL_OUTSIDE_MAP, f"mask values {shown} are not in the label map")
        return mask, None


def _image_ids(stems: list[str]) -> list[int]:
    numbers = [re.search(r"(\d+)$", s) for s in stems]
    if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(stems):  # type: ignore[union-attr]
        return [int(m.group(1)) for m in numbers]  # type: ignore[union-attr]
    return list(range(len(stems)))


def _build(
    pairs: Iterable[tuple[Path, Path, str]],
    label_map: LabelMap,
    *,
    source: Path,
    on_bad_record: str,
    check_images: bool,
    resize_image_to_mask: bool = False,
) -> SegmentationDataset:
    """Check ``(image, mask, name)`` pairs and make the dataset."""
    policy = RecordPolicy(on_bad_record, source)
    dataset = SegmentationDataset([], policy.summary, label_map, resize_image_to_mask)
    pairs = sorted(pairs, key=lambda p: str(p[0]))
    ids = _image_ids([name for _, _, name in pairs])
    records = []
    for (image_path, mask_path, name), image_id in zip(pairs, ids):
        where = f"image {name}"
        problem = image_problem(image_path, decode=check_images)
        if problem is not None:
            policy.bad(image_path, where, *problem)
            continue
        if not mask_path.is_file():
            policy.bad(mask_path, where, MISSING_ANNOTATION, f"mask {mask_path} does not exist")
            continue
        if check_images:
            try:
                mask, problem = dataset._mask(mask_path, where)
            except BadRecordError as exc:  # the mask file itself does not decode
                policy.bad(mask_path, where, exc.reason, exc.detail)
                continue
            if problem is not None:
                policy.bad(mask_path, where, *problem)
                continue
            with Image.open(image_path) as image:
                size = image.size
            if not resize_image_to_mask and size != (mask.shape[1], mask.shape[0]):
                detail = (
                    f"image is {size[0]}×{size[1]} but its mask is {mask.shape[1]}×{mask.shape[0]}"
                )
                policy.bad(mask_path, where, MALFORMED, detail)
                continue
        records.append(
            {
                "image_path": str(image_path),
                "mask_path": str(mask_path),
                "image_id": image_id,
                "name": name,
            }
        )
        policy.keep()
    dataset.records = records
    dataset.summary = policy.finish()
    return dataset


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {path} does not exist")
    return path


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _as_label_map(label_map: LabelMap | str | os.PathLike | Mapping[str, Any]) -> LabelMap:
    if isinstance(label_map, LabelMap):
        return label_map
    if isinstance(label_map, Mapping):
        return LabelMap.from_json(label_map)
    return load_label_map(label_map)


def load_segmentation_folder(
    image_dir: str | os.PathLike,
    mask_dir: str | os.PathLike,
    label_map: LabelMap | str | os.PathLike | Mapping[str, Any],
    *,
    mask_name: Callable[[str], str] | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    resize_image_to_mask: bool = False,
) -> SegmentationDataset:
    """Generic folder: every image in ``image_dir`` with the mask ``mask_dir/<stem>.png``
    (``mask_name(stem)`` gives another file name). ``label_map`` is a :class:`LabelMap`, a
    label-map JSON path or its parsed dict (format in :mod:`distiq.data.formats`)."""
    image_dir = _require_dir(Path(image_dir), "image")
    mask_dir = _require_dir(Path(mask_dir), "mask")
    name_of = mask_name or (lambda stem: f"{stem}.png")
    pairs = [(p, mask_dir / name_of(p.stem), p.stem) for p in _images_in(image_dir)]
    return _build(
        pairs, _as_label_map(label_map), source=image_dir, on_bad_record=on_bad_record,
        check_images=check_images, resize_image_to_mask=resize_image_to_mask,
    )  # fmt: skip


def load_cityscapes(
    root: str | os.PathLike,
    split: str = "train",
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> SegmentationDataset:
    """Cityscapes fine annotations (``leftImg8bit/`` and ``gtFine/`` under ``root``), labelIds
    mapped to the 19 trainIds."""
    root = Path(root)
    images = _require_dir(root / "leftImg8bit" / split, "Cityscapes image")
    pairs = []
    for path in _images_in(images, recursive=True):
        stem = path.stem.removesuffix("_leftImg8bit")
        mask = root / "gtFine" / split / path.parent.name / f"{stem}_gtFine_labelIds.png"
        pairs.append((path, mask, stem))
    return _build(
        pairs,
        cityscapes_label_map(),
        source=root,
        on_bad_record=on_bad_record,
        check_images=check_images,
    )


def load_kitti_semantic(
    root: str | os.PathLike,
    split: str = "training",
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> SegmentationDataset:
    """KITTI semantic segmentation (``{split}/image_2`` + ``{split}/semantic``, Cityscapes
    labelIds)."""
    root = Path(root)
    images = _require_dir(root / split / "image_2", "KITTI image")
    pairs = [(p, root / split / "semantic" / f"{p.stem}.png", p.stem) for p in _images_in(images)]
    return _build(
        pairs,
        cityscapes_label_map(),
        source=root,
        on_bad_record=on_bad_record,
        check_images=check_images,
    )


def load_bdd100k(
    root: str | os.PathLike,
    split: str = "train",
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> SegmentationDataset:
    """BDD100K semantic segmentation (either layout in the module docstring), trainIds."""
    root = Path(root)
    new_images = root / "images" / "10k" / split
    if new_images.is_dir():
        masks = root / "labels" / "sem_seg" / "masks" / split
        pairs = [(p, masks / f"{p.stem}.png", p.stem) for p in _images_in(new_images)]
    else:
        images = _require_dir(
            root / "seg" / "images" / split,
            "BDD100K image (images/10k/<split> or seg/images/<split>)",
        )
        masks = root / "seg" / "labels" / split
        pairs = [(p, masks / f"{p.stem}_train_id.png", p.stem) for p in _images_in(images)]
    return _build(
        pairs,
        bdd100k_label_map(),
        source=root,
        on_bad_record=on_bad_record,
        check_images=check_images,
    )


def load_ade20k(
    root: str | os.PathLike,
    split: str = "training",
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> SegmentationDataset:
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes, 0 → ignore."""
    root = Path(root)
    images = _require_dir(root / "images" / split, "ADE20K image")
    pairs = [
        (p, root / "annotations" / split / f"{p.stem}.png", p.stem) for p in _images_in(images)
    ]
    return _build(
        pairs,
        ade20k_label_map(),
        source=root,
        on_bad_record=on_bad_record,
        check_images=check_images,
    )


def load_scannet_frames(
    root: str | os.PathLike,
    *,
    label_map: LabelMap | str | os.PathLike | Mapping[str, Any] | None = None,
    label_dir: str = "label-filt",
    on_bad_record: str = "error",
    check_images: bool = True,
) -> SegmentationDataset:
    """ScanNet-style frames: ``root/<scene>/color/<frame>.jpg`` with ``root/<scene>/<label_dir>/
    <frame>.png``. Default label map: NYU40 ids → the 20 benchmark classes. Colour frames are
    resized to their label's size."""
    root = _require_dir(Path(root), "ScanNet")
    pairs = []
    for scene in sorted(p for p in root.iterdir() if (p / "color").is_dir()):
        for frame in _images_in(scene / "color"):
            pairs.append(
                (frame, scene / label_dir / f"{frame.stem}.png", f"{scene.name}/{frame.stem}")
            )
    if not pairs:
        raise FileNotFoundError(f"{root} has no <scene>/color/ folders with frames")
    lm = scannet_label_map() if label_map is None else _as_label_map(label_map)
    return _build(
        pairs,
        lm,
        source=root,
        on_bad_record=on_bad_record,
        check_images=check_images,
        resize_image_to_mask=True,
    )
