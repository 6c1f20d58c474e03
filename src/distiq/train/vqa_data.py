"""VQA data for the compression engine: questions grouped by image.

A VQA split has several questions per image (three per synthetic scene). The dataset is
organised by image, so that a forward path can process an image once for all its questions
(the shared-prefix path, :mod:`distiq.train.prefix_engine`) or once per question (the generic
path, :mod:`distiq.train.generic_engine`):

- :func:`load_split` reads a split (synthetic scenes or real VQA v2 files, see
  :class:`distiq.train.recipe.DataConfig`) into an :class:`ImageQuestions` dataset whose item ``i``
  is one image with all its questions, plus its detection boxes and segmentation mask when the
  data has them (the synthetic scenes do; real VQA v2 does not).
- The dataset belongs to one model's processing (its adapter) and forward path (``path``,
  chosen by :func:`distiq.train.engines.engine_class`); the path prepares it once when it is
  built (the shared-prefix path tokenizes every question then) and turns items into batches
  (:meth:`ImageQuestions.collate`, the training loop's ``collate_fn``).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)


class ImageQuestions(Dataset):
    """Images with their questions (map-style: ``len``, ``dataset[i]``).

    Args:
        images: per image, ``(image, image_id)``; ``image`` a file path or a PIL image.
        questions: the split's question records (dicts with ``question``, ``answers``,
            ``answer``, ``question_type``, ``question_id``, ``image_id``), e.g. a
            ``VQADataset.records``.
        adapter: the model adapter whose processing the batches are for.
        path: the forward path (an ``EngineModel`` subclass) whose batches ``collate`` makes;
            default: the first that accepts ``adapter``. It prepares the dataset here.
        detection: ``{image_id: (boxes (N, 4) list, labels (N,) list)}`` or None.
        masks: ``{image_id: mask path}`` of class masks, or None; ``mask_lookup`` maps raw
            pixel values to class indices (256-entry array; 255 = ignore).

    Item ``i``: ``{"image": PIL RGB, "rows": question indices, "image_id": int, "boxes",
    "labels", "mask"}`` (the last three None when absent). Boxes and masks follow the resize to
    the model's input, which needs an image processor with a fixed output size.
    """

    def __init__(
        self,
        images: list[tuple[Any, int]],
        questions: list[dict[str, Any]],
        adapter: Any,
        *,
        path: Any = None,
        detection: dict[int, tuple[list, list]] | None = None,
        masks: dict[int, str] | None = None,
        mask_lookup: np.ndarray | None = None,
        num_detection_classes: int | None = None,
        num_segmentation_classes: int | None = None,
    ) -> None:
        from distiq.train.engines import engine_class
        from distiq.train.prefix_engine import fixed_image_size

        self.images = images
        self.questions = questions
        self.adapter = adapter
        self.detection = detection
        self.masks = masks
        self.mask_lookup = mask_lookup
        self.num_detection_classes = num_detection_classes
        self.num_segmentation_classes = num_segmentation_classes
        rows: defaultdict[Any, list[int]] = defaultdict(list)
        for row, record in enumerate(questions):
            rows[record["image_id"]].append(row)
        self.rows = [rows[image_id] for _, image_id in images]
        self.size = fixed_image_size(adapter)
        if self.size is None and (detection is not None or masks is not None):
            raise ValueError(
                "boxes and masks follow the resize to the model's input, which needs an image "
                f"processor with a fixed output size; {type(adapter.image_processor).__name__} "
                "has none"
            )
        self._cache: dict[int, tuple[Any, tuple[int, int], np.ndarray | None]] | None = None
        self.path = path if path is not None else engine_class(adapter)
        self.path.prepare(self)

    def cache_images(self, enabled: bool = True) -> ImageQuestions:
        """Keep each image (resized to the model's resolution) and its mask in memory after
        its first read, so later epochs skip decoding and resizing (worth it for small images
        read many times, as the demo teacher's). Shared by :meth:`subset` views; each
        DataLoader worker fills its own. Returns ``self``."""
        self._cache = {} if enabled else None
        return self

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_questions(self) -> int:
        return len(self.questions)

    @property
    def has_detection(self) -> bool:
        return self.detection is not None

    @property
    def has_segmentation(self) -> bool:
        return self.masks is not None

    def __getitem__(self, index: int) -> dict[str, Any]:
        from distiq.data.records import read_image
        from distiq.models.inputs import to_rgb

        source, image_id = self.images[index]
        cached = self._cache.get(image_id) if self._cache is not None else None
        if cached is not None:
            image, (width, height), mask = cached
        else:
            if isinstance(source, str | Path):
                image = read_image(Path(source), f"image {image_id}")
            else:  # a PIL image, or a function that decodes one (a datasets row)
                image = to_rgb(source() if callable(source) else source, where=f"image {image_id}")
            width, height = image.size
            mask = None
            if self.masks is not None:
                mask = self._read_mask(image_id, self.size)
            if self._cache is not None:
                image = self._resized(image)
                self._cache[image_id] = (image, (width, height), mask)
        item: dict[str, Any] = {
            "image": image,
            "rows": self.rows[index],
            "image_id": image_id,
            "boxes": None,
            "labels": None,
            "mask": None,
        }
        # Heads see the model's input pixels: boxes and masks follow the processor's resize.
        if self.detection is not None:
            target_h, target_w = self.size
            boxes, labels = self.detection.get(image_id, ([], []))
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            if (width, height) != (target_w, target_h):
                scale = torch.tensor([target_w / width, target_h / height] * 2)
                boxes = boxes * scale
            item["boxes"] = boxes
            item["labels"] = torch.tensor(labels, dtype=torch.long)
        if mask is not None:
            item["mask"] = torch.from_numpy(mask.astype(np.int64))
        return item

    def _resized(self, image: Any) -> Any:
        """``image`` at the model's resolution, resized as the image processor resizes (PIL,
        its ``resample``), so :meth:`pixel_values` takes its fast path; unchanged when the
        processor names no PIL resample filter."""
        if self.size is None:
            return image
        height, width = self.size
        resample = getattr(self.adapter.image_processor, "resample", None)
        if image.size == (width, height) or not isinstance(resample, int):
            return image
        return image.convert("RGB").resize((width, height), resample=resample)

    def _read_mask(self, image_id: int, size: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 class indices of ``image_id``'s mask at ``size`` (nearest resize)."""
        from PIL import Image

        from distiq.data.records import read_label_image

        raw = read_label_image(Path(self.masks[image_id]), f"mask of image {image_id}")
        lookup = self.mask_lookup
        mask = np.ascontiguousarray(lookup[raw] if lookup is not None else raw)
        if mask.shape != size:
            resized = Image.fromarray(mask.astype(np.uint8)).resize(
                (size[1], size[0]), Image.Resampling.NEAREST
            )
            mask = np.asarray(resized)
        if mask.dtype != np.uint8 and mask.size and mask.min() >= 0 and mask.max() <= 255:
            mask = mask.astype(np.uint8)  # a quarter / an eighth of the memory in the cache
        return mask

    def for_adapter(self, adapter: Any) -> ImageQuestions:
        """These images and questions batched for another model's processing (``adapter``):
        the dataset itself when the processing is the same, else a view on the generic path."""
        from distiq.train.modeling import same_processing

        if same_processing(adapter, self.adapter):
            return self
        from distiq.train.generic_engine import GenericEngine

        other = copy.copy(self)
        other.adapter, other.path, other._cache = adapter, GenericEngine, None
        return other

    def without_heads(self) -> ImageQuestions:
        """These images and questions without detection boxes and segmentation masks (what
        ``load_scene_split(..., heads=False)`` gives), sharing the rest; no image cache."""
        other = copy.copy(self)
        other.detection = other.masks = other.mask_lookup = None
        other.num_detection_classes = other.num_segmentation_classes = None
        other._cache = None
        return other

    def subset(self, indices: Sequence[int]) -> ImageQuestions:
        """The images ``indices`` (with all their questions)."""
        other = copy.copy(self)  # a view: questions, tokens and the image cache are shared
        other.images = [self.images[i] for i in indices]
        other.rows = [self.rows[i] for i in indices]
        return other

    def limit_questions(self, max_questions: int | None) -> ImageQuestions:
        """The first images (in a fixed, seeded order) holding about ``max_questions``
        questions; the dataset itself when ``max_questions`` is None or not smaller."""
        if max_questions is None or max_questions >= self.num_questions:
            return self
        order = np.random.default_rng(0).permutation(len(self.images))
        picked, count = [], 0
        for index in order:
            if count >= max_questions:
                break
            picked.append(int(index))
            count += len(self.rows[index])
        return self.subset(sorted(picked))

    def question_count(self) -> int:
        """Questions over the images of this (possibly limited) dataset."""
        return sum(len(r) for r in self.rows)

    # ------------------------------------------------------------------ batching
    def collate(self, items: Sequence[dict[str, Any]], *, with_answers: bool = True) -> dict:
        """Items -> one batch of the dataset's forward path (``path.collate``; its docstring
        lists the keys)."""
        return self.path.collate(self, items, with_answers=with_answers)

    def generation_collate(self, items: Sequence[dict[str, Any]]) -> dict:
        """:meth:`collate` without answers (prompts only, for greedy decoding)."""
        return self.collate(items, with_answers=False)


# ---------------------------------------------------------------------- loading splits
def _lookup_table(label_map: Any) -> np.ndarray:
    """A 256-entry table mapping raw mask values to class indices (255 = ignore)."""
    table = np.full(256, 255, dtype=np.int64)
    for key, index in label_map.values.items():
        if isinstance(key, tuple):
            raise ValueError("colour-coded label maps are not supported by the engine's loader")
        table[int(key)] = int(index)
    return table


def load_scene_split(
    root: str | Path,
    split: str,
    adapter: Any,
    *,
    heads: bool = True,
    segmentation_target: str = "category",
) -> ImageQuestions:
    """A split of a synthetic scene set (``distiq.data.generate_scenes``'s folder) with its
    questions tokenized for ``adapter``; with ``heads`` also its detection boxes and
    ``segmentation_target`` masks (``category`` or ``colour``)."""
    from distiq.data.formats import load_label_map
    from distiq.data.scenes import ScenePaths

    paths = ScenePaths.at(root)
    if not paths.meta.is_file():
        raise FileNotFoundError(
            f"{root} is not a generated scene set (no meta.json); generate one with "
            "distiq.data.generate_scenes(out_dir) and point data.scenes at the folder it returns"
        )
    vqa = paths.vqa(split, check_images=False)
    if len(vqa) == 0:
        raise ValueError(f"the {split!r} split of {root} has no questions")
    detection = masks = lookup = None
    num_det = num_seg = None
    if heads:
        det = paths.detection(split, check_images=False)
        detection = {r["image_id"]: (r["boxes"], r["labels"]) for r in det.records}
        num_det = det.num_classes
        if segmentation_target not in ("category", "colour"):
            raise ValueError(
                f"segmentation_target {segmentation_target!r}: choose 'category' or 'colour'"
            )
        folder, map_file = (
            (paths[split].masks, paths.label_map)
            if segmentation_target == "category"
            else (paths[split].colour_masks, paths.colour_label_map)
        )
        label_map = load_label_map(map_file)
        lookup = _lookup_table(label_map)
        num_seg = len(label_map.classes)
        masks = {}
        for record in det.records:
            name = Path(record["image_path"]).name
            masks[record["image_id"]] = str(folder / name)
    return _build(vqa, adapter, detection, masks, lookup, num_det, num_seg)


def load_vqa_files(
    questions: str | Path,
    annotations: str | Path,
    images: str | Path,
    adapter: Any,
    *,
    on_bad_record: str = "error",
) -> ImageQuestions:
    """A real VQA v2 split (questions JSON, annotations JSON, image folder) for ``adapter``;
    malformed records follow ``on_bad_record`` (``error`` | ``skip``)."""
    from distiq.data.vqa import load_vqa_v2

    vqa = load_vqa_v2(
        questions, annotations, images, check_images=False, on_bad_record=on_bad_record
    )
    if len(vqa) == 0:
        raise ValueError(f"{questions} holds no questions")
    return _build(vqa, adapter, None, None, None, None, None)


def _build(vqa, adapter, detection, masks, lookup, num_det, num_seg) -> ImageQuestions:
    records = list(vqa.records)
    images: dict[Any, Any] = {}
    for r in records:
        images.setdefault(r["image_id"], r["image_path"] if "image_path" in r else r["image"])
    logger.info("%d questions on %d images", len(records), len(images))
    return ImageQuestions(
        [(path, image_id) for image_id, path in images.items()],
        records,
        adapter,
        detection=detection,
        masks=masks,
        mask_lookup=lookup,
        num_detection_classes=num_det,
        num_segmentation_classes=num_seg,
    )
