"""Loaders for monocular depth: a generic image + depth-PNG folder, ScanNet-style frames and
KITTI depth (the depth-selection layout and the annotated depth maps beside the raw drives).

All return a :class:`DepthDataset`, whose ``dataset[i]`` is the depth sample::

    {"image": PIL.Image (RGB), "depth": FloatTensor (H, W) metres, 0 = no measurement,
     "image_id": int}

Depth files are single-channel PNGs holding ``metres × depth_scale`` as integers (16-bit, or
8-bit), 0 where nothing was measured:

============ ============================================================ ============
loader       layout (under ``root``)                                      depth_scale
============ ============================================================ ============
folder       ``image_dir/<stem>.{png,jpg,...}`` + ``depth_dir/<stem>.png``  given (1000)
scannet      ``<scene>/color/<frame>.jpg`` + ``<scene>/depth/<frame>.png``  1000 (mm)
kitti        ``depth_selection/val_selection_cropped/image/*_image_0N.png``  256
             + ``.../groundtruth_depth/*_groundtruth_depth_0N.png``; or
             ``{split}/<drive>/proj_depth/groundtruth/image_0N/<f>.png``
             with the images at ``raw_root/<date>/<drive>/image_0N/data/<f>.png``
============ ============================================================ ============

ScanNet colour frames are larger than their depth maps: they are resized (bilinear) to the depth
map's size; elsewhere an image whose size differs from its depth map is a malformed record.
Bad records (:mod:`distiq.data.records`): a missing or corrupt image or depth file, a depth file
that is not single-channel, a size mismatch, a depth map without any measured pixel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distiq.data.records import (
    MALFORMED,
    MISSING_ANNOTATION,
    BadRecordError,
    RecordDataset,
    RecordPolicy,
    image_problem,
    read_image,
    read_label_image,
)
from distiq.data.segmentation import _image_ids, _images_in, _require_dir

SCANNET_DEPTH_SCALE = 1000.0  # ScanNet depth PNGs: millimetres
KITTI_DEPTH_SCALE = 256.0  # KITTI depth PNGs: metres × 256


class DepthDataset(RecordDataset):
    """Depth samples; ``records[i]`` holds ``image_path``, ``depth_path``, ``image_id``, ``name``
    and ``depth_scale`` (stored value per metre)."""

    task = "depth"

    def __init__(self, records, summary, resize_image_to_depth: bool = False):
        super().__init__(records, summary)
        self.resize_image_to_depth = resize_image_to_depth

    def _sample(self, record: dict[str, Any]) -> dict[str, Any]:
        import torch

        where = f"image {record['name']}"
        image = read_image(Path(record["image_path"]), where)
        depth, problem = read_depth(Path(record["depth_path"]), where, record["depth_scale"])
        if problem is not None:
            raise BadRecordError(record["depth_path"], where, MALFORMED, problem)
        if self.resize_image_to_depth and image.size != (depth.shape[1], depth.shape[0]):
            image = image.resize((depth.shape[1], depth.shape[0]), Image.Resampling.BILINEAR)
        return {"image": image, "depth": torch.from_numpy(depth), "image_id": record["image_id"]}


def read_depth(path: Path, where: str, depth_scale: float) -> tuple[np.ndarray, str | None]:
    """``(depth (H, W) float32 metres, problem or None)`` of a depth PNG (see the module
    docstring). Raises ``BadRecordError`` when the file is missing or does not decode."""
    raw = read_label_image(path, where)
    if raw.ndim != 2:
        return np.zeros(raw.shape[:2], np.float32), (
            f"depth file has {raw.shape[2]} channels; a depth PNG holds one (16-bit) channel"
        )
    depth = raw.astype(np.float32) / np.float32(depth_scale)
    if not bool((depth > 0).any()):
        return depth, "depth map has no measured pixel (all zero)"
    return depth, None


def _build(
    triples: Iterable[tuple[Path, Path, str]],
    *,
    depth_scale: float,
    source: Path,
    on_bad_record: str,
    check_images: bool,
    resize_image_to_depth: bool = False,
) -> DepthDataset:
    """Check ``(image, depth, name)`` triples and make the dataset."""
    if depth_scale <= 0:
        raise ValueError(f"depth_scale must be > 0 (stored value per metre), got {depth_scale}")
    policy = RecordPolicy(on_bad_record, source)
    triples = sorted(triples, key=lambda t: str(t[0]))
    ids = _image_ids([name for _, _, name in triples])
    records = []
    for (image_path, depth_path, name), image_id in zip(triples, ids):
        where = f"image {name}"
        problem = image_problem(image_path, decode=check_images)
        if problem is not None:
            policy.bad(image_path, where, *problem)
            continue
        if not depth_path.is_file():
            policy.bad(depth_path, where, MISSING_ANNOTATION, f"depth map {depth_path} is missing")
            continue
        if check_images:
            try:
                depth, detail = read_depth(depth_path, where, depth_scale)
            except BadRecordError as exc:
                policy.bad(depth_path, where, exc.reason, exc.detail)
                continue
            if detail is not None:
                policy.bad(depth_path, where, MALFORMED, detail)
                continue
            with Image.open(image_path) as image:
                size = image.size
            if not resize_image_to_depth and size != (depth.shape[1], depth.shape[0]):
                detail = f"image is {size[0]}×{size[1]} but its depth map {depth.shape[1]}×{depth.shape[0]}"
                policy.bad(depth_path, where, MALFORMED, detail)
                continue
        records.append(
            {
                "image_path": str(image_path),
                "depth_path": str(depth_path),
                "image_id": image_id,
                "name": name,
                "depth_scale": float(depth_scale),
            }
        )
        policy.keep()
    return DepthDataset(records, policy.finish(), resize_image_to_depth)


def load_depth_folder(
    image_dir: str | os.PathLike,
    depth_dir: str | os.PathLike,
    *,
    depth_scale: float = SCANNET_DEPTH_SCALE,
    depth_name: Callable[[str], str] | None = None,
    on_bad_record: str = "error",
    check_images: bool = True,
    resize_image_to_depth: bool = False,
) -> DepthDataset:
    """Generic folder: every image in ``image_dir`` with the depth PNG ``depth_dir/<stem>.png``
    (``depth_name(stem)`` gives another file name), holding ``metres × depth_scale``."""
    image_dir = _require_dir(Path(image_dir), "image")
    depth_dir = _require_dir(Path(depth_dir), "depth")
    name_of = depth_name or (lambda stem: f"{stem}.png")
    triples = [(p, depth_dir / name_of(p.stem), p.stem) for p in _images_in(image_dir)]
    return _build(
        triples, depth_scale=depth_scale, source=image_dir, on_bad_record=on_bad_record,
        check_images=check_images, resize_image_to_depth=resize_image_to_depth,
    )  # fmt: skip


def load_scannet_depth(
    root: str | os.PathLike,
    *,
    depth_dir: str = "depth",
    depth_scale: float = SCANNET_DEPTH_SCALE,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> DepthDataset:
    """ScanNet-style frames: ``root/<scene>/color/<frame>.jpg`` with ``root/<scene>/<depth_dir>/
    <frame>.png`` (millimetres). Colour frames are resized to their depth map's size."""
    root = _require_dir(Path(root), "ScanNet")
    triples = []
    for scene in sorted(p for p in root.iterdir() if (p / "color").is_dir()):
        for frame in _images_in(scene / "color"):
            triples.append(
                (frame, scene / depth_dir / f"{frame.stem}.png", f"{scene.name}/{frame.stem}")
            )
    if not triples:
        raise FileNotFoundError(f"{root} holds no <scene>/color/ frames (ScanNet layout)")
    return _build(
        triples, depth_scale=depth_scale, source=root, on_bad_record=on_bad_record,
        check_images=check_images, resize_image_to_depth=True,
    )  # fmt: skip


def load_kitti_depth(
    root: str | os.PathLike,
    split: str = "val",
    *,
    raw_root: str | os.PathLike | None = None,
    camera: str = "image_02",
    on_bad_record: str = "error",
    check_images: bool = True,
) -> DepthDataset:
    """KITTI depth maps (metres × 256, 0 = no LiDAR point).

    With ``raw_root`` None: the depth-selection layout (``root`` is the KITTI depth folder
    holding ``depth_selection/``, or ``val_selection_cropped`` itself). With ``raw_root``: the
    annotated maps ``root/{split}/<drive>/proj_depth/groundtruth/<camera>/<frame>.png`` beside
    the raw drives ``raw_root/<date>/<drive>/<camera>/data/<frame>.png``."""
    root = Path(root)
    triples = []
    if raw_root is None:
        selection = root / "depth_selection" / "val_selection_cropped"
        if not selection.is_dir():
            selection = root
        images = _require_dir(selection / "image", "KITTI depth-selection image")
        for path in _images_in(images):
            depth_name = path.name.replace("_image_", "_groundtruth_depth_", 1)
            triples.append((path, selection / "groundtruth_depth" / depth_name, path.stem))
    else:
        raw_root = Path(raw_root)
        split_dir = _require_dir(root / split, f"KITTI depth {split}")
        for drive in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            maps = drive / "proj_depth" / "groundtruth" / camera
            if not maps.is_dir():
                continue
            images = raw_root / drive.name[:10] / drive.name / camera / "data"
            for depth_path in sorted(maps.glob("*.png")):
                name = f"{drive.name}/{depth_path.stem}"
                triples.append((images / depth_path.name, depth_path, name))
    if not triples:
        raise FileNotFoundError(f"{root} holds no KITTI depth maps in the expected layout")
    return _build(
        triples, depth_scale=KITTI_DEPTH_SCALE, source=root, on_bad_record=on_bad_record,
        check_images=check_images,
    )  # fmt: skip


__all__ = [
    "KITTI_DEPTH_SCALE",
    "SCANNET_DEPTH_SCALE",
    "DepthDataset",
    "load_depth_folder",
    "load_kitti_depth",
    "load_scannet_depth",
    "read_depth",
]
