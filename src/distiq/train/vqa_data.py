"""VQA training data for the compression engine: questions grouped by image, tokenized once.

A VQA split has several questions per image (three per synthetic scene). The engine's forward
(:mod:`distiq.train.vlm`) runs the vision tower and the image prefix of the language model once
per *image* and only the question suffix once per question, so the data is organised by image:

- :func:`load_split` reads a split (synthetic scenes or real VQA v2 files, see
  :class:`distiq.train.recipe.DataConfig`) into an :class:`ImageQuestions` dataset whose item ``i``
  is one image with all its questions, plus its detection boxes and segmentation mask when the
  data has them (the synthetic scenes do; real VQA v2 does not).
- Every question is tokenized once, when the dataset is built, with the model adapter's own
  prompt format (``adapter.format_prompt`` + ``distiq.models.inputs``), so the token ids are
  exactly those ``adapter.build_inputs`` would produce; the shared image prefix (``<s>`` and the
  image tokens, for the built-in edge VLM) is split off once.
- :meth:`ImageQuestions.collate` turns a list of items into a batch dict (see its docstring for
  every key and shape); it is the ``collate_fn`` of the training loop.

Pixel values are normalised exactly as the adapter's image processor does (a fast path for
images already at the model's resolution, checked against the processor in the tests; other
images go through the processor).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distiq.models.inputs import IGNORE_INDEX, tokenize_prompts_and_answers

logger = logging.getLogger(__name__)

_TOKENIZE_CHUNK = 2048


@dataclass
class QuestionTokens:
    """Token ids of every question of a split, split into the shared prefix and a suffix.

    Attributes:
        prefix_ids: ``(P,)`` the tokens every prompt starts with, up to and including the last
            image token (``<s> <image> x N`` for the built-in edge VLM).
        image_positions: ``(P,)`` bool, True where ``prefix_ids`` holds an image token.
        suffix: per question, the token ids after the prefix: question prompt, answer tokens,
            eos (the answer and eos only when the split has answers).
        prompt_lengths: per question, how many of its ``suffix`` ids are the prompt (the rest
            is answer + eos).
    """

    prefix_ids: torch.Tensor
    image_positions: torch.Tensor
    suffix: list[list[int]]
    prompt_lengths: list[int]


def image_expansion(adapter: Any) -> str:
    """The text that replaces the image placeholder for one image at the model's resolution."""
    from PIL import Image

    size = image_size(adapter)
    _, expansions = adapter.image_inputs([Image.new("RGB", (size[1], size[0]))])
    return expansions[0]


def image_size(adapter: Any) -> tuple[int, int]:
    """``(H, W)`` the adapter's image processor resizes images to."""
    size = getattr(adapter.image_processor, "size", None) or {}
    height = getattr(size, "height", None) or (size.get("height") if hasattr(size, "get") else None)
    width = getattr(size, "width", None) or (size.get("width") if hasattr(size, "get") else None)
    if not height or not width:
        raise ValueError(
            "the engine's VQA data path needs an image processor with a fixed size "
            f"(height, width); {type(adapter.image_processor).__name__} has {size!r}"
        )
    return int(height), int(width)


def tokenize_questions(
    adapter: Any, questions: Sequence[str], answers: Sequence[str] | None
) -> QuestionTokens:
    """Tokenize every question (with its answer when given) in the adapter's prompt format and
    split off the prefix shared by all prompts (see :class:`QuestionTokens`). Each distinct
    (question, answer) text is tokenized once (VQA questions repeat a lot).

    Raises:
        ValueError: the prompts do not share a prefix that ends with the image tokens (a prompt
            format that puts text before the image differently per question).
    """
    if not questions:
        raise ValueError("no questions to tokenize: the split is empty")
    keys = list(zip(questions, answers)) if answers is not None else [(q, None) for q in questions]
    unique = list(dict.fromkeys(keys))
    expansion = image_expansion(adapter)
    image_token = adapter.image_token_id
    suffix_of: dict[tuple[str, str | None], tuple[list[int], int]] = {}
    prefix: list[int] | None = None
    for start in range(0, len(unique), _TOKENIZE_CHUNK):
        chunk = unique[start : start + _TOKENIZE_CHUNK]
        prompts = [
            adapter.format_prompt(q).replace(adapter.image_placeholder, expansion, 1)
            for q, _ in chunk
        ]
        tokens = tokenize_prompts_and_answers(
            adapter.tokenizer,
            prompts,
            None if answers is None else [a for _, a in chunk],
            answer_separator=adapter.answer_separator,
            add_special_tokens=adapter.add_special_tokens,
            max_length=adapter.max_length,
        )
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        left = answers is None  # prompts alone are left-padded
        for row, (key, length, prompt_length) in enumerate(
            zip(chunk, lengths, tokens.prompt_lengths)
        ):
            ids = tokens.input_ids[row]
            ids = (ids[ids.shape[0] - length :] if left else ids[:length]).tolist()
            if prefix is None:
                image_at = [i for i, t in enumerate(ids) if t == image_token]
                if not image_at:
                    raise ValueError("the tokenized prompt holds no image token")
                prefix = ids[: image_at[-1] + 1]
            if ids[: len(prefix)] != prefix:
                raise ValueError(
                    f"the prompts of this model do not share their image prefix ({key[0]!r}); "
                    "the engine's shared-prefix forward needs the image first"
                )
            suffix_of[key] = (ids[len(prefix) :], prompt_length - len(prefix))
    assert prefix is not None
    prefix_ids = torch.tensor(prefix, dtype=torch.long)
    suffixes = [suffix_of[k][0] for k in keys]
    prompt_lengths = [suffix_of[k][1] for k in keys]
    return QuestionTokens(prefix_ids, prefix_ids == image_token, suffixes, prompt_lengths)


class ImageQuestions(Dataset):
    """Images with their questions (map-style: ``len``, ``dataset[i]``).

    Args:
        images: per image, ``(image_path, image_id)``.
        questions: the split's question records (dicts with ``question``, ``answers``,
            ``answer``, ``question_type``, ``question_id``, ``image_id``), e.g. a
            ``VQADataset.records``.
        tokens: :func:`tokenize_questions` of those records, in the same order.
        adapter: the model adapter (image processor: size, mean, std).
        detection: ``{image_id: (boxes (N, 4) list, labels (N,) list)}`` or None.
        masks: ``{image_id: mask path}`` of class masks, or None; ``mask_lookup`` maps raw
            pixel values to class indices (256-entry array; 255 = ignore).

    Item ``i``: ``{"image": PIL RGB, "rows": question indices, "image_id": int, "boxes",
    "labels", "mask"}`` (the last three None when absent).
    """

    def __init__(
        self,
        images: list[tuple[str, int]],
        questions: list[dict[str, Any]],
        tokens: QuestionTokens,
        adapter: Any,
        *,
        detection: dict[int, tuple[list, list]] | None = None,
        masks: dict[int, str] | None = None,
        mask_lookup: np.ndarray | None = None,
        num_detection_classes: int | None = None,
        num_segmentation_classes: int | None = None,
    ) -> None:
        self.images = images
        self.questions = questions
        self.tokens = tokens
        self.adapter = adapter
        self.detection = detection
        self.masks = masks
        self.mask_lookup = mask_lookup
        self.num_detection_classes = num_detection_classes
        self.num_segmentation_classes = num_segmentation_classes
        rows: defaultdict[int, list[int]] = defaultdict(list)
        for row, record in enumerate(questions):
            rows[int(record["image_id"])].append(row)
        self.rows = [rows[image_id] for _, image_id in images]
        self.size = image_size(adapter)
        processor = adapter.image_processor
        self._mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        self._cache: dict[int, tuple[Any, tuple[int, int], np.ndarray | None]] | None = None

    def cache_images(self, enabled: bool = True) -> ImageQuestions:
        """Keep each image (resized to the model's resolution) and its mask in memory after
        its first read, so later epochs skip decoding and resizing (a 48 px scene: ~7 KB of
        image and 2 KB of mask per item; collate of 32 scenes: 72 ms -> ~5 ms, measured on
        one thread). Shared by :meth:`subset` views; each DataLoader worker fills its own.
        Returns ``self``."""
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

        path, image_id = self.images[index]
        target_h, target_w = self.size
        cached = self._cache.get(image_id) if self._cache is not None else None
        if cached is not None:
            image, (width, height), mask = cached
        else:
            image = read_image(Path(path), f"image {image_id}")
            width, height = image.size
            mask = None
            if self.masks is not None:
                mask = self._read_mask(image_id, (target_h, target_w))
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
    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """``(B, 3, H, W)`` float32 pixel values as the adapter's image processor makes them."""
        height, width = self.size
        if all(im.mode == "RGB" and im.size == (width, height) for im in images):
            array = np.stack([np.asarray(im) for im in images])  # (B, H, W, 3) uint8
            x = torch.from_numpy(array).permute(0, 3, 1, 2).float()
            return (x * self._rescale - self._mean) / self._std
        inputs, _ = self.adapter.image_inputs(list(images))
        return inputs["pixel_values"]

    def collate(self, items: Sequence[dict[str, Any]], *, with_answers: bool = True) -> dict:
        """Items -> one batch (``B`` images, ``Q`` questions over them).

        Keys:
            ``pixel_values`` (B, 3, H, W); ``prefix_ids`` (P,) shared by every prompt and
            ``image_positions`` (P,) bool; ``question_image`` (Q,) long: the image (row of
            ``pixel_values``) of each question; ``image_id`` (B,) long.
            With answers (training): ``suffix_ids`` (Q, S) right-padded, ``suffix_mask`` (Q, S),
            ``labels`` (Q, S): answer and eos ids, -100 elsewhere (Hugging Face convention,
            aligned with ``suffix_ids``).
            Without answers (generation): ``suffix_ids`` / ``suffix_mask`` hold the prompts
            only, left-padded.
            ``answers`` (list of Q lists of human answers), ``question_type`` (list of Q str),
            ``question_id`` (Q,) long; ``boxes`` / ``labels_det`` (lists of B tensors) and
            ``mask`` (B, H, W) long when the data has them.
        """
        if not items:
            raise ValueError("collate: empty batch")
        tokens = self.tokens
        rows = [row for item in items for row in item["rows"]]
        question_image = [b for b, item in enumerate(items) for _ in item["rows"]]
        if with_answers:
            sequences = [tokens.suffix[r] for r in rows]
        else:
            sequences = [tokens.suffix[r][: tokens.prompt_lengths[r]] for r in rows]
        length = max(len(s) for s in sequences)
        pad_id = self.adapter.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else self.adapter.tokenizer.eos_token_id
        count = len(sequences)
        suffix_ids = torch.full((count, length), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((count, length), dtype=torch.long)
        labels = torch.full((count, length), IGNORE_INDEX, dtype=torch.long)
        for q, (row, seq) in enumerate(zip(rows, sequences)):
            ids = torch.tensor(seq, dtype=torch.long)
            start = 0 if with_answers else length - len(seq)
            suffix_ids[q, start : start + len(seq)] = ids
            suffix_mask[q, start : start + len(seq)] = 1
            if with_answers:
                answer_from = tokens.prompt_lengths[row]
                labels[q, answer_from : len(seq)] = ids[answer_from:]
        batch: dict[str, Any] = {
            "pixel_values": self.pixel_values([item["image"] for item in items]),
            "prefix_ids": tokens.prefix_ids,
            "image_positions": tokens.image_positions,
            "question_image": torch.tensor(question_image, dtype=torch.long),
            "image_id": torch.tensor([int(item["image_id"]) for item in items], dtype=torch.long),
            "suffix_ids": suffix_ids,
            "suffix_mask": suffix_mask,
            "answers": [list(self.questions[r]["answers"]) for r in rows],
            "question_type": [str(self.questions[r].get("question_type", "")) for r in rows],
            "question_id": torch.tensor(
                [int(self.questions[r]["question_id"]) for r in rows], dtype=torch.long
            ),
        }
        if with_answers:
            if not bool((labels != IGNORE_INDEX).any()):
                raise ValueError("the batch has no answer tokens: does the split have answers?")
            batch["labels"] = labels
        if items[0]["boxes"] is not None:
            batch["boxes"] = [item["boxes"] for item in items]
            batch["labels_det"] = [item["labels"] for item in items]
        if items[0]["mask"] is not None:
            batch["mask"] = torch.stack([item["mask"] for item in items])
        return batch

    def generation_collate(self, items: Sequence[dict[str, Any]]) -> dict:
        """:meth:`collate` without answers (left-padded prompts, for greedy decoding)."""
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
    questions: str | Path, annotations: str | Path, images: str | Path, adapter: Any
) -> ImageQuestions:
    """A real VQA v2 split (questions JSON, annotations JSON, image folder) for ``adapter``."""
    from distiq.data.vqa import load_vqa_v2

    vqa = load_vqa_v2(questions, annotations, images, check_images=False)
    if len(vqa) == 0:
        raise ValueError(f"{questions} holds no questions")
    return _build(vqa, adapter, None, None, None, None, None)


def _build(vqa, adapter, detection, masks, lookup, num_det, num_seg) -> ImageQuestions:
    records = list(vqa.records)
    answers = [r["answer"] for r in records]
    with_answers = all(isinstance(a, str) and a for a in answers)
    tokens = tokenize_questions(
        adapter, [r["question"] for r in records], answers if with_answers else None
    )
    images: dict[int, str] = {}
    for r in records:
        images.setdefault(int(r["image_id"]), r["image_path"])
    logger.info("%d questions on %d images", len(records), len(images))
    return ImageQuestions(
        [(path, image_id) for image_id, path in images.items()],
        records,
        tokens,
        adapter,
        detection=detection,
        masks=masks,
        mask_lookup=lookup,
        num_detection_classes=num_det,
        num_segmentation_classes=num_seg,
    )
