"""Collate functions (lists of sample dicts → batch dicts) and calibration subsets.

A batch keeps each sample key under the same name: tensors of per-sample scalars are stacked
(``image_id``, ``question_id``: LongTensor ``(B,)``), per-sample tensors of varying size stay
lists (``boxes``: ``B`` tensors ``(N_i, 4)``, ``labels``: ``B`` tensors ``(N_i,)``), masks of equal
size are stacked (``mask``: LongTensor ``(B, H, W)``), strings stay lists, and ``image`` stays a
list of PIL images. Every batch also has ``pixel_values``: FloatTensor ``(B, 3, H, W)`` with
values in [0, 1] (no normalisation: models apply their own).

Images of different sizes need ``image_size=(H, W)`` (or an int for square): images are resized
bilinearly, masks by nearest neighbour, boxes scaled. Use ``functools.partial(collate_vqa,
image_size=64)`` as a DataLoader's ``collate_fn``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def _target_size(
    images: Sequence[Image.Image], image_size: int | tuple[int, int] | None
) -> tuple[int, int]:
    """``(W, H)`` for PIL."""
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        return int(w), int(h)
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(
            f"images in the batch have different sizes {sorted(sizes)}; pass image_size=(H, W) "
            "to resize them (e.g. functools.partial(collate_fn, image_size=64))"
        )
    return next(iter(sizes))


def _pixel_values(images: Sequence[Image.Image], size: tuple[int, int]):
    import torch

    arrays = [
        np.asarray(
            im.convert("RGB")
            if im.size == size
            else im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        )
        for im in images
    ]
    batch = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3) uint8
    return batch.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]


def _check(batch: Sequence[dict[str, Any]], keys: tuple[str, ...], what: str) -> None:
    if not batch:
        raise ValueError(f"{what}: empty batch")
    missing = [k for k in keys if k not in batch[0]]
    if missing:
        raise ValueError(f"{what}: samples lack {missing}; is this the right collate function?")


def collate_vqa(
    batch: Sequence[dict[str, Any]], image_size: int | tuple[int, int] | None = None
) -> dict[str, Any]:
    """VQA samples → ``{"pixel_values" (B, 3, H, W), "image", "question", "answers", "answer",
    "question_type" (lists), "question_id", "image_id" (LongTensor (B,))}``."""
    import torch

    keys = ("image", "question", "answers", "answer", "question_type", "question_id", "image_id")
    _check(batch, keys, "collate_vqa")
    images = [s["image"] for s in batch]
    out: dict[str, Any] = {"pixel_values": _pixel_values(images, _target_size(images, image_size))}
    for key in ("image", "question", "answers", "answer", "question_type"):
        out[key] = [s[key] for s in batch]
    for key in ("question_id", "image_id"):
        out[key] = torch.tensor([s[key] for s in batch], dtype=torch.long)
    return out


def collate_detection(
    batch: Sequence[dict[str, Any]], image_size: int | tuple[int, int] | None = None
) -> dict[str, Any]:
    """Detection samples → ``{"pixel_values" (B, 3, H, W), "image" (list), "boxes" (list of
    (N_i, 4) xyxy pixels of the returned size), "labels" (list of (N_i,)), "image_id" (B,)}``."""
    import torch

    _check(batch, ("image", "boxes", "labels", "image_id"), "collate_detection")
    images = [s["image"] for s in batch]
    size = _target_size(images, image_size)
    boxes = []
    for sample in batch:
        w, h = sample["image"].size
        scale = torch.tensor([size[0] / w, size[1] / h, size[0] / w, size[1] / h])
        boxes.append(sample["boxes"] * scale if (w, h) != size else sample["boxes"])
    return {
        "pixel_values": _pixel_values(images, size),
        "image": images,
        "boxes": boxes,
        "labels": [s["labels"] for s in batch],
        "image_id": torch.tensor([s["image_id"] for s in batch], dtype=torch.long),
    }


def collate_segmentation(
    batch: Sequence[dict[str, Any]], image_size: int | tuple[int, int] | None = None
) -> dict[str, Any]:
    """Segmentation samples → ``{"pixel_values" (B, 3, H, W), "image" (list), "mask" LongTensor
    (B, H, W) (255 = ignore), "image_id" (B,)}``."""
    import torch

    _check(batch, ("image", "mask", "image_id"), "collate_segmentation")
    images = [s["image"] for s in batch]
    size = _target_size(images, image_size)
    masks = []
    for sample in batch:
        mask = sample["mask"]
        if (mask.shape[1], mask.shape[0]) != size:
            # Nearest-neighbour resize of class indices (uint8 holds 0..255 exactly).
            resized = Image.fromarray(mask.numpy().astype(np.uint8)).resize(
                size, Image.Resampling.NEAREST
            )
            mask = torch.from_numpy(np.asarray(resized).astype(np.int64))
        masks.append(mask)
    return {
        "pixel_values": _pixel_values(images, size),
        "image": images,
        "mask": torch.stack(masks),
        "image_id": torch.tensor([s["image_id"] for s in batch], dtype=torch.long),
    }


def _strata(dataset: Any, key: str) -> list[Any]:
    records = getattr(dataset, "records", None)
    if records is not None:
        return [r.get(key) for r in records]
    return [dataset[i].get(key) for i in range(len(dataset))]


def calibration_indices(
    dataset: Any, n: int, *, key: str = "question_type", seed: int = 0
) -> list[int]:
    """``n`` distinct indices of ``dataset`` stratified by ``key`` (default the question type):
    each stratum gets ``n`` × its share (largest remainders round), at least one when ``n`` is at
    least the number of strata; within a stratum the indices are a seeded random draw. Sorted.

    ``dataset`` is a loaded dataset (its ``records`` are read, images are not decoded) or any
    sequence of sample dicts."""
    total = len(dataset)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (got {n!r})")
    if n > total:
        raise ValueError(f"asked for {n} calibration samples but the dataset has only {total}")
    groups: defaultdict[Any, list[int]] = defaultdict(list)
    for index, value in enumerate(_strata(dataset, key)):
        groups[value].append(index)
    names = sorted(groups, key=str)
    sizes = Counter({g: len(groups[g]) for g in names})
    quota = {g: n * sizes[g] / total for g in names}
    take = {g: int(quota[g]) for g in names}
    if n >= len(names):  # every stratum is represented
        for g in names:
            take[g] = max(take[g], 1)
    # Hand out what is left by largest remainder (or take back the excess, smallest first).
    order = sorted(names, key=lambda g: (-(quota[g] - int(quota[g])), str(g)))
    while sum(take.values()) < n:
        for g in order:
            if sum(take.values()) < n and take[g] < sizes[g]:
                take[g] += 1
    while sum(take.values()) > n:
        for g in reversed(order):
            if sum(take.values()) > n and take[g] > 1:
                take[g] -= 1
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for g in names:
        picked.extend(rng.choice(groups[g], size=take[g], replace=False).tolist())
    return sorted(picked)


def calibration_subset(dataset: Any, n: int, *, key: str = "question_type", seed: int = 0) -> Any:
    """The :func:`calibration_indices` subset: ``dataset.select(indices)`` for loaded datasets,
    else a list of samples."""
    indices = calibration_indices(dataset, n, key=key, seed=seed)
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return [dataset[i] for i in indices]
