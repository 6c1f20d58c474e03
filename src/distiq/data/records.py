"""Bad-record handling and the dataset base class that every loader returns.

A *record* is one loadable item found in a data set's files (one VQA question, one detection
image with its boxes, one image + mask pair). Loaders check every record when they build the
dataset; a record that is wrong in any way is *bad*:

==================== ===================================================================
reason               meaning
==================== ===================================================================
``missing image``    the image (or mask) file the record points to does not exist
``corrupt image``    the file exists but PIL cannot decode it completely
``malformed``        the annotation is not what the format says (a missing key, a box
                     with non-positive size, a mask whose size differs from its image, ...)
``label outside map`` a class / category / pixel value that the label map does not know
``missing annotation`` a question without an answer record (VQA v2), an image listed in a
                     split file without its XML (Pascal VOC)
==================== ===================================================================

``on_bad_record="error"`` (the default) raises :class:`BadRecordError` at the first bad record,
naming the file, the record and what is wrong. ``on_bad_record="skip"`` drops the record,
counts it by reason in the dataset's :class:`BadRecordSummary` (``dataset.summary``) and logs one
warning with the counts when loading ends. Nothing bad passes silently.

Images are decoded completely at load time (``check_images=True``, the default), so corrupt files
are found then. With ``check_images=False`` loading only checks that files exist; a file that
turns out to be corrupt when ``dataset[i]`` decodes it raises :class:`BadRecordError` whatever the
mode (a map-style dataset cannot skip an index it already promised).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

BadRecordMode = Literal["error", "skip"]
BAD_RECORD_MODES: tuple[str, ...] = ("error", "skip")

MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"
MALFORMED = "malformed"
LABEL_OUTSIDE_MAP = "label outside map"
MISSING_ANNOTATION = "missing annotation"
REASONS: tuple[str, ...] = (
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    MALFORMED,
    LABEL_OUTSIDE_MAP,
    MISSING_ANNOTATION,
)


class BadRecordError(ValueError):
    """A bad record in a data set. ``file``, ``record`` and ``reason`` say which and why."""

    def __init__(self, file: str | Path, record: str, reason: str, detail: str) -> None:
        self.file = str(file)
        self.record = record
        self.reason = reason
        self.detail = detail
        super().__init__(
            f"{self.file}: {record}: {reason}: {detail}. Fix the record, or pass "
            "on_bad_record='skip' to skip bad records (they are counted in dataset.summary)."
        )


@dataclass
class BadRecordSummary:
    """What a loader kept and skipped. ``by_reason`` counts skipped records per reason;
    ``examples`` keeps the first few messages (file, record, reason, detail)."""

    source: str
    loaded: int = 0
    skipped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    max_examples = 10

    def __str__(self) -> str:
        if not self.skipped:
            return f"{self.source}: {self.loaded} records loaded, none skipped"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.by_reason.items()))
        return f"{self.source}: {self.loaded} records loaded, {self.skipped} skipped ({reasons})"


class RecordPolicy:
    """Applies ``on_bad_record`` while a loader walks its records.

    Call :meth:`bad` for each bad record (it raises in ``"error"`` mode and counts in ``"skip"``
    mode), :meth:`keep` for each record kept, and :meth:`finish` once at the end.
    """

    def __init__(self, on_bad_record: str, source: str | Path) -> None:
        if on_bad_record not in BAD_RECORD_MODES:
            raise ValueError(
                f"on_bad_record={on_bad_record!r} is not supported; choose 'error' (raise at the "
                "first bad record) or 'skip' (skip and count bad records)"
            )
        self.mode = on_bad_record
        self.summary = BadRecordSummary(source=str(source))
        self._counts: Counter[str] = Counter()

    def bad(self, file: str | Path, record: str, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        error = BadRecordError(file, record, reason, detail)
        if self.mode == "error":
            raise error
        self._counts[reason] += 1
        self.summary.skipped += 1
        if len(self.summary.examples) < BadRecordSummary.max_examples:
            self.summary.examples.append(f"{error.file}: {record}: {reason}: {detail}")

    def keep(self, n: int = 1) -> None:
        self.summary.loaded += n

    def finish(self) -> BadRecordSummary:
        self.summary.by_reason = dict(sorted(self._counts.items()))
        if self.summary.skipped:
            logger.warning("%s", self.summary)
        else:
            logger.info("%s", self.summary)
        return self.summary


def image_problem(path: Path, *, decode: bool = True) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when ``path`` is not a readable image, else ``None``.

    With ``decode`` the whole file is decoded (finds truncated files); without, only existence
    is checked."""
    if not path.is_file():
        return MISSING_IMAGE, f"{path} does not exist"
    if not decode:
        return None
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return CORRUPT_IMAGE, f"{path} cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def read_image(path: Path, record: str, mode: str | None = "RGB") -> Image.Image:
    """Decode ``path`` completely (converted to ``mode`` unless ``None``); a missing or corrupt
    file raises :class:`BadRecordError` naming ``record``."""
    problem = image_problem(path, decode=False)
    if problem is not None:
        raise BadRecordError(path, record, *problem)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadRecordError(
            path, record, CORRUPT_IMAGE, f"cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc


def read_label_image(path: Path, record: str) -> np.ndarray:
    """Decode a label PNG into an integer array: ``(H, W)`` for 8/16-bit single-channel files,
    ``(H, W, 3)`` uint8 for colour-coded (RGB / palette-free colour) files. Palette (``P``)
    images give their palette *indices*, as Pascal VOC / Cityscapes masks intend."""
    image = read_image(path, record, mode=None)
    if image.mode in ("RGB", "RGBA"):
        return np.asarray(image.convert("RGB"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).astype(np.int64)
    if image.mode in ("L", "P"):
        return np.asarray(image)
    return np.asarray(image.convert("L"))


class RecordDataset(Sequence):
    """A map-style dataset (``len``, ``dataset[i]``, usable by ``torch.utils.data.DataLoader``)
    over checked records. ``records`` holds the plain per-item metadata (paths, ids, questions,
    boxes) and never images, so it is cheap to scan; ``dataset[i]`` decodes the image(s) and
    returns the task's sample dict. ``summary`` is the loader's :class:`BadRecordSummary`."""

    task = "generic"

    def __init__(self, records: list[dict[str, Any]], summary: BadRecordSummary) -> None:
        self.records = records
        self.summary = summary

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(
                f"dataset indices are integers, got {type(index).__name__}; "
                "use dataset.select(indices) for a subset"
            )
        return self._sample(self.records[int(index)])

    def _sample(self, record: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError  # each task's dataset defines how a record becomes a sample

    def _copy_with(self, records: list[dict[str, Any]]) -> RecordDataset:
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.records = records
        return other

    def select(self, indices: Iterable[int]) -> RecordDataset:
        """A dataset of the same kind over ``records[i]`` for ``i`` in ``indices`` (in order)."""
        picked = [self.records[int(i)] for i in indices]
        return self._copy_with(picked)

    def filter(self, keep: Callable[[dict[str, Any]], bool]) -> RecordDataset:
        """A dataset of the same kind over the records for which ``keep(record)`` is true."""
        return self._copy_with([r for r in self.records if keep(r)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} records; {self.summary})"
