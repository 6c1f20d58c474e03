"""Synthetic "edge scenes": the embedded default's world, written in real data-set formats.

Each scene is an RGB image (default 64×64) of 1–6 objects — geometric shapes (default circle,
square, triangle) and real handwritten digits (scikit-learn's ``load_digits``, default 0, 1, 4;
train scenes draw from 4/5 of the digit instances, val/test scenes from the other 1/5) — each in
one of a few saturated colours (default red, green, blue, yellow, purple; ±20 jitter per
channel), 25–38 % of the image side large, at random positions with modest occlusion (every
object keeps ≥ 70 % of its pixels; objects of one colour never touch), on a low-contrast
textured (stripes) or noisy (smooth blobs) background, with uniform pixel noise of std 6 over
the whole image. See ``_render.py`` for the drawing and ``_questions.py`` for the templates.

Ground truth for three tasks comes from the same scene:

- VQA: ``questions_per_image`` (default 3) questions of different types among count, color,
  identity (shape / digit), position (left/right, top/bottom), relation (left of / right of),
  exist, and compare (a two-object reasoning type: "are there more circles than squares?").
  One-word answers: ``"0"``..``"6"``, colour names, shape names, digits, left/right/top/bottom,
  yes/no (the full word list is :func:`vocabulary`).
- detection: one box per object (the tight box of its visible pixels), class = shape / digit.
- segmentation: a class mask (0 = background, 1 + category index) and a colour mask
  (0 = background, 1 + colour index).
- depth: a depth map in millimetres (ScanNet's 16-bit depth PNG units): a ground plane receding
  from 2 m at the bottom row to 8 m at the top, each object an upright card standing on it at the
  bottom of its visible box (see ``_generate.scene_depth_mm``).

Answers are balanced per question text (``_questions.Balancer``) so a blind model is weak:
the question-only oracle (:func:`blind_baseline_accuracy`: the best answer of each question text
on train, evaluated on test) stays near chance for each question type's answer set.
``meta.json`` records its accuracy for every generated set.

On disk (``generate_scenes(out_dir, ...)`` writes ``out_dir/<key>/``, where ``<key>`` is
``edge-scenes-s{seed}-n{count}-{size}px-{hash}`` and ``hash`` covers the split fractions, the
:class:`SceneConfig` and the format version; an existing complete directory is reused)::

    meta.json                       parameters, split sizes, blind baseline (written last)
    label_map.json                  class-mask label map (distiq.data.formats.LabelMap)
    colour_label_map.json           colour-mask label map
    images/{split}/COCO_{split}_{image_id:012d}.png          RGB images
    masks/{split}/COCO_{split}_{image_id:012d}.png           uint8 class masks
    colour_masks/{split}/COCO_{split}_{image_id:012d}.png    uint8 colour masks
    depth/{split}/COCO_{split}_{image_id:012d}.png           uint16 depth, millimetres
    vqa/v2_OpenEnded_edge_scenes_{split}_questions.json       VQA v2 questions
    vqa/v2_edge_scenes_{split}_annotations.json               VQA v2 annotations (10 answers)
    annotations/instances_{split}.json                       COCO detection instances

Splits are ``train``, ``val``, ``test``; image ids run from 1 to ``count`` over all splits in
that order (question id = ``image_id * 1000 + k``). The VQA ``question_type`` is the type name
above; ``answer_type`` is ``number`` for count, ``yes/no`` for relation, exist and compare,
``other`` otherwise. All ten human answers equal the generated answer. COCO annotations also
carry the object's ``"color"``; category ids are ``1 + category index``; with
``SceneConfig(instance_masks=True)`` each annotation has its visible-pixel mask as uncompressed
RLE in ``"segmentation"`` (off by default: it makes the JSON several times larger).

Everything is a pure function of ``(seed, count, image_size, split_fractions, config)``: scene
``i`` uses ``numpy.random.default_rng([seed, i])`` and question balancing runs per fixed chunk
of 250 scenes, so the number of worker processes never changes the output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distiq.config import ConfigError, atomic_write
from distiq.data import _generate
from distiq.data._questions import QUESTION_TYPES, split_words, template_words
from distiq.data._render import COLOUR_RGB, SHAPES
from distiq.data.blind import blind_baseline_accuracy, blind_baseline_by_type
from distiq.util import suggest

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: depth maps
SPLITS: tuple[str, ...] = ("train", "val", "test")
DATA_TYPE = _generate.DATA_TYPE


@dataclass(frozen=True)
class SceneConfig:
    """What the scenes contain. Sizes are fractions of the image side."""

    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    digits: tuple[int, ...] = (0, 1, 4)
    min_objects: int = 1
    max_objects: int = 6
    size_range: tuple[float, float] = (0.25, 0.375)
    min_visible: float = 0.7
    questions_per_image: int = 3
    question_types: tuple[str, ...] = QUESTION_TYPES
    noise_std: float = 6.0
    colour_jitter: float = 20.0
    position_margin: float = 0.08
    instance_masks: bool = False

    def __post_init__(self) -> None:
        problems = self._validate()
        if problems:
            raise ConfigError(problems, source="SceneConfig")

    def _validate(self) -> list[str]:
        problems = []
        for field, given, known in (
            ("colours", self.colours, tuple(COLOUR_RGB)),
            ("shapes", self.shapes, SHAPES),
            ("question_types", self.question_types, QUESTION_TYPES),
        ):
            for name in given:
                if name not in known:
                    problems.append(
                        f"{field}: {name!r} is unknown{suggest(str(name), list(known))}; "
                        f"choose from {', '.join(known)}"
                    )
            if len(set(given)) != len(given) or not given:
                problems.append(f"{field}: give one or more names, each once (got {given!r})")
        if any(not (0 <= d <= 9) for d in self.digits) or len(set(self.digits)) != len(self.digits):
            problems.append(f"digits: distinct integers 0..9 (got {self.digits!r})")
        if len(self.categories) < 2:
            problems.append("shapes + digits: give at least two categories")
        if not (1 <= self.min_objects <= self.max_objects <= 9):
            problems.append(
                f"min_objects/max_objects: need 1 <= min <= max <= 9 "
                f"(got {self.min_objects}, {self.max_objects})"
            )
        lo, hi = self.size_range
        if not (0.05 <= lo <= hi <= 0.6):
            problems.append(f"size_range: need 0.05 <= low <= high <= 0.6 (got {self.size_range})")
        if not (0.0 < self.min_visible <= 1.0):
            problems.append(f"min_visible: a fraction in (0, 1] (got {self.min_visible})")
        if self.questions_per_image < 1:
            problems.append(f"questions_per_image: at least 1 (got {self.questions_per_image})")
        if self.noise_std < 0 or self.colour_jitter < 0:
            problems.append("noise_std and colour_jitter must be >= 0")
        if not (0.0 <= self.position_margin < 0.5):
            problems.append(f"position_margin: a fraction in [0, 0.5) (got {self.position_margin})")
        return problems

    @property
    def categories(self) -> tuple[str, ...]:
        """Detection classes, in order: the shapes, then the digits as strings."""
        return tuple(self.shapes) + tuple(str(d) for d in self.digits)

    @property
    def nouns(self) -> tuple[str, ...]:
        """How questions name objects: each shape, and ``"digit"`` for every digit."""
        return tuple(self.shapes) + (("digit",) if self.digits else ())

    def to_json(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def vocabulary(config: SceneConfig | None = None) -> list[str]:
    """Every lower-case word (and ``"?"``, which questions glue to their last word) that the
    scenes' questions and answers use, sorted. A word-level tokenizer built on this list with a
    pre-tokenizer that splits ``"?"`` covers every question and answer."""
    config = config or SceneConfig()
    words = template_words(config.colours, config.nouns, config.max_objects, config.categories)
    return sorted(words)


@dataclass(frozen=True)
class SplitPaths:
    """The files of one split."""

    name: str
    images: Path
    questions: Path
    annotations: Path
    instances: Path
    masks: Path
    colour_masks: Path
    depth: Path


@dataclass(frozen=True)
class ScenePaths:
    """A generated scene set: ``root``, its label maps, ``meta.json`` and each split's files.
    ``vqa(split)``, ``detection(split)``, ``segmentation(split)`` and ``depth(split)`` load a
    split with the real format loaders (keyword arguments go to the loader)."""

    root: Path
    meta: Path
    label_map: Path
    colour_label_map: Path
    splits: Mapping[str, SplitPaths]

    @classmethod
    def at(cls, root: str | os.PathLike) -> ScenePaths:
        root = Path(root)
        splits = {
            s: SplitPaths(
                name=s,
                images=root / "images" / s,
                questions=root / "vqa" / f"v2_OpenEnded_{DATA_TYPE}_{s}_questions.json",
                annotations=root / "vqa" / f"v2_{DATA_TYPE}_{s}_annotations.json",
                instances=root / "annotations" / f"instances_{s}.json",
                masks=root / "masks" / s,
                colour_masks=root / "colour_masks" / s,
                depth=root / "depth" / s,
            )
            for s in SPLITS
        }
        return cls(
            root=root,
            meta=root / "meta.json",
            label_map=root / "label_map.json",
            colour_label_map=root / "colour_label_map.json",
            splits=splits,
        )

    def __getitem__(self, split: str) -> SplitPaths:
        if split not in self.splits:
            raise KeyError(
                f"unknown split {split!r}{suggest(split, list(self.splits))}; splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())

    def vqa(self, split: str = "train", **kwargs: Any):
        from distiq.data.vqa import load_vqa_v2

        paths = self[split]
        return load_vqa_v2(paths.questions, paths.annotations, paths.images, **kwargs)

    def detection(self, split: str = "train", **kwargs: Any):
        from distiq.data.detection import load_coco_detection

        paths = self[split]
        return load_coco_detection(paths.instances, paths.images, **kwargs)

    def segmentation(self, split: str = "train", target: str = "category", **kwargs: Any):
        """``target="category"`` (background + shapes/digits) or ``"colour"`` (background +
        colours)."""
        from distiq.data.segmentation import load_segmentation_folder

        paths = self[split]
        if target not in ("category", "colour"):
            raise ValueError(f"target={target!r}: choose 'category' or 'colour'")
        masks, label_map = (
            (paths.masks, self.label_map)
            if target == "category"
            else (paths.colour_masks, self.colour_label_map)
        )
        return load_segmentation_folder(paths.images, masks, label_map, **kwargs)

    def depth(self, split: str = "train", **kwargs: Any):
        """The split's depth maps (millimetre PNGs) with ``distiq.data.depth.load_depth_folder``.

        Raises:
            FileNotFoundError: a set generated before depth maps were written (format 1):
                generate it again.
        """
        from distiq.data.depth import load_depth_folder

        paths = self[split]
        if not paths.depth.is_dir():
            raise FileNotFoundError(
                f"{self.root} has no depth maps (generated by an older distiq, format 1); "
                "generate the scenes again (distiq.data.generate_scenes) to get them"
            )
        return load_depth_folder(paths.images, paths.depth, depth_scale=1000.0, **kwargs)


def _split_sizes(count: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    n_train = round(count * fractions[0])
    n_val = min(round(count * fractions[1]), count - n_train)
    return {"train": n_train, "val": n_val, "test": count - n_train - n_val}


def _check_arguments(count: int, seed: int, image_size: int, fractions: tuple[float, ...]) -> None:
    problems = []
    if not isinstance(count, int) or count < 1:
        problems.append(f"count must be a positive integer (got {count!r})")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be a non-negative integer (got {seed!r})")
    if not isinstance(image_size, int) or not (32 <= image_size <= 1024):
        problems.append(f"image_size must be an integer in [32, 1024] pixels (got {image_size!r})")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        problems.append(
            f"split_fractions must be three non-negative fractions (train, val, test) summing to 1 "
            f"(got {fractions!r})"
        )
    elif fractions[0] <= 0:
        problems.append("split_fractions: the train fraction must be positive")
    if problems:
        raise ValueError("generate_scenes: " + "; ".join(problems))


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits`` data: images ``(1797, 8, 8)`` float32 (0..16) and targets
    ``(1797,)`` int. Read straight from the CSV that scikit-learn ships (importing
    ``sklearn.datasets`` takes seconds); falls back to ``load_digits`` if the file moved."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            with gzip.open(csv, "rt") as fh:
                data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


@functools.cache
def _digit_banks() -> dict[str, dict[int, np.ndarray]]:
    """``load_digits`` images ``(N, 8, 8)`` per digit: ``fit`` (4/5, for train scenes) and
    ``heldout`` (every fifth instance, for val/test scenes)."""
    images, targets = load_digit_images()
    index = np.arange(len(targets))
    banks: dict[str, dict[int, np.ndarray]] = {"fit": {}, "heldout": {}}
    for d in range(10):
        banks["fit"][d] = images[(targets == d) & (index % 5 != 0)]
        banks["heldout"][d] = images[(targets == d) & (index % 5 == 0)]
    return banks


def generate_scenes(
    out_dir: str | os.PathLike,
    count: int = 25_000,
    seed: int = 0,
    image_size: int = 64,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    config: SceneConfig | None = None,
    workers: int | None = None,
) -> ScenePaths:
    """Generate ``count`` scenes (over all splits; the default 25,000 gives 20,000 train scenes)
    under ``out_dir`` and return their paths.

    A complete set with the same parameters already under ``out_dir`` is reused (the cache).
    ``workers`` processes render in parallel (default: up to 2). Generation writes to a
    temporary folder renamed into place at the end, so an interrupted run leaves no half set.
    """
    config = config or SceneConfig()
    split_fractions = tuple(float(f) for f in split_fractions)  # type: ignore[assignment]
    _check_arguments(count, seed, image_size, split_fractions)
    key = json.dumps(
        {"v": FORMAT_VERSION, "fractions": split_fractions, "config": config.to_json()},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    root = Path(out_dir) / f"edge-scenes-s{seed}-n{count}-{image_size}px-{digest}"
    paths = ScenePaths.at(root)
    if paths.meta.is_file():
        logger.info("reusing the scenes in %s", root)
        return paths

    started = time.perf_counter()
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp_paths = ScenePaths.at(tmp)
    for split in SPLITS:
        for folder in (
            tmp_paths[split].images,
            tmp_paths[split].masks,
            tmp_paths[split].colour_masks,
            tmp_paths[split].depth,
        ):
            folder.mkdir(parents=True, exist_ok=True)
    sizes = _split_sizes(count, split_fractions)
    tasks, first = [], 1
    for split in SPLITS:
        ids = range(first, first + sizes[split])
        first += sizes[split]
        bank = "fit" if split == "train" else "heldout"
        for start in range(0, len(ids), _generate.CHUNK_SIZE):
            chunk = tuple(ids[start : start + _generate.CHUNK_SIZE])
            tasks.append(
                _generate.ChunkTask(str(tmp), split, chunk, seed, image_size, config, bank)
            )

    banks = _digit_banks()
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    try:
        if workers == 1 or len(tasks) == 1:
            _generate.init_worker(banks)
            results = [_generate.render_chunk(t) for t in tasks]
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(
                workers, initializer=_generate.init_worker, initargs=(banks,)
            ) as pool:
                results = pool.map(_generate.render_chunk, tasks, chunksize=1)
        by_split: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for task, records in zip(tasks, results):
            by_split[task.split].extend(records)
        meta = _generate.write_annotations(tmp_paths, by_split, config, image_size)
        meta["vocabulary"] = vocabulary(config)
        meta.update(
            generator="distiq.data.scenes",
            format_version=FORMAT_VERSION,
            seed=seed,
            count=count,
            image_size=image_size,
            split_fractions=list(split_fractions),
            config=config.to_json(),
            seconds=round(time.perf_counter() - started, 2),
        )
        atomic_write(tmp_paths.meta, json.dumps(meta, indent=1))
        if paths.meta.is_file():  # a concurrent generator finished first: keep its set
            return paths
        if root.exists():  # an incomplete set (no meta.json): replace it
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:
            if not paths.meta.is_file():  # not a concurrent generator that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated %d scenes in %s (%.1f s)", count, root, time.perf_counter() - started)
    return paths


__all__ = [
    "FORMAT_VERSION",
    "QUESTION_TYPES",
    "SPLITS",
    "SceneConfig",
    "ScenePaths",
    "SplitPaths",
    "blind_baseline_accuracy",
    "blind_baseline_by_type",
    "generate_scenes",
    "split_words",
    "vocabulary",
]
