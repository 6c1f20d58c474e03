"""Bad-record handling, checked image reading, and the dataset base class every loader returns.

A *record* is one loadable item found in a data set's files (one VQA question, one detection
image with its boxes, one image + mask pair). Loaders check every record when they build the
dataset; a record that is wrong in any way is *bad*:

==================== ===================================================================
reason               meaning
==================== ===================================================================
``missing image``    the image (or mask) file the record points to does not exist
``corrupt image``    the file exists but PIL cannot decode it completely
``image too large``  the image has more pixels than :data:`MAX_IMAGE_PIXELS`
``malformed``        the annotation is not what the format says (a missing key, a box
                     with non-positive size, a mask whose size differs from its image, a
                     question_id used twice, ...)
``label outside map`` a class / category / pixel value that the label map does not know
``missing annotation`` a question without an answer record (VQA v2), an image listed in a
                     split file without its XML (Pascal VOC)
==================== ===================================================================

``on_bad_record="error"`` (the default) raises :class:`BadRecordError` at the first bad record,
naming the file, the record and what is wrong. ``on_bad_record="skip"`` drops the record,
counts it by reason in the dataset's :class:`BadRecordSummary` (``dataset.summary``) and logs one
warning with the counts when loading ends. Nothing bad passes silently. In a recipe the same
choice is the key ``data.on_bad_record``.

Images are decoded completely at load time (``check_images=True``, the default), so corrupt files
are found then. With ``check_images=False`` loading only checks that files exist; a file that
turns out to be corrupt when ``dataset[i]`` decodes it raises :class:`BadRecordError` whatever the
mode (a map-style dataset cannot skip an index it already promised). :func:`verify_images`
checks a whole split's files quickly (headers, sizes, each format's own integrity check) before
a long job starts.

Every image is opened through one gate that refuses images with more than
:data:`MAX_IMAGE_PIXELS` pixels before anything is decoded (PIL itself only warns below twice its
own limit). Raise the limit by setting ``distiq.data.records.MAX_IMAGE_PIXELS`` (``None``: no
limit) or per call with ``max_pixels=``.
"""

from __future__ import annotations

import logging
import struct
import warnings
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
IMAGE_TOO_LARGE = "image too large"
MALFORMED = "malformed"
LABEL_OUTSIDE_MAP = "label outside map"
MISSING_ANNOTATION = "missing annotation"
REASONS: tuple[str, ...] = (
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    IMAGE_TOO_LARGE,
    MALFORMED,
    LABEL_OUTSIDE_MAP,
    MISSING_ANNOTATION,
)

#: The most pixels (width × height) an image may have; bigger ones are refused with an error
#: before they are decoded. The default is PIL's own warning threshold
#: (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 million: a 9459 × 9459 image). ``None``: no limit.
MAX_IMAGE_PIXELS: int | None = 89_478_485

#: How to skip bad records, as the error messages advise it.
SKIP_ADVICE = "set data.on_bad_record: skip in the recipe (on_bad_record='skip' in Python)"

# What PIL raises for a file it cannot read (struct.error / EOFError: some truncated headers).
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError)


class BadRecordError(ValueError):
    """A bad record in a data set. ``file``, ``record`` and ``reason`` say which and why."""

    def __init__(self, file: str | Path, record: str, reason: str, detail: str) -> None:
        self.file = str(file)
        self.record = record
        self.reason = reason
        self.detail = detail
        super().__init__(
            f"{self.file}: {record}: {reason}: {detail}. Fix the record, or {SKIP_ADVICE} to "
            "skip bad records (they are counted in dataset.summary)."
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
                "first bad record) or 'skip' (skip and count bad records); in a recipe this is "
                "the key data.on_bad_record"
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


# --------------------------------------------------------------------------- checked reading
class UnreadableImageError(ValueError):
    """:func:`open_image` refused a file. ``reason`` (one of ``REASONS``) and ``detail`` (which
    names the file) say why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _limit_advice(limit: int | None) -> str:
    suggested = f"{limit * 2:_}" if limit else "N"
    return (
        f"if it is meant to be this large, raise the limit: distiq.data.records.MAX_IMAGE_PIXELS "
        f"= {suggested} (None: no limit), or max_pixels= where the reading function takes it"
    )


def open_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """``PIL.Image.open(path)``: the header only, nothing decoded yet, refusing images above the
    pixel limit instead of letting PIL warn (``DecompressionBombWarning``).

    Args:
        path: the image file.
        max_pixels: the most pixels allowed; ``None`` uses :data:`MAX_IMAGE_PIXELS`.
    Returns:
        the open image; close it (``with open_image(path) as image:``).
    Raises:
        UnreadableImageError: too many pixels (``IMAGE_TOO_LARGE``, the message says how to raise
            the limit), or not an image PIL can open (``CORRUPT_IMAGE``).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # distiq's own limit below replaces PIL's warning with an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:  # above twice PIL's limit
        raise UnreadableImageError(
            IMAGE_TOO_LARGE,
            f"{path} is larger than PIL allows ({exc}); {_limit_advice(limit)}, and raise "
            "PIL.Image.MAX_IMAGE_PIXELS as well",
        ) from None
    except _READ_ERRORS as exc:
        raise UnreadableImageError(
            CORRUPT_IMAGE, f"{path} cannot be opened ({type(exc).__name__}: {exc})"
        ) from None
    width, height = image.size
    if limit is not None and width * height > limit:
        image.close()
        raise UnreadableImageError(
            IMAGE_TOO_LARGE,
            f"{path} is {width}×{height} = {width * height:_} pixels, more than the limit of "
            f"{limit:_} pixels (a decompression bomb, or an unusually large image); "
            + _limit_advice(limit),
        )
    return image


def image_problem(
    path: Path, *, decode: bool = True, max_pixels: int | None = None
) -> tuple[str, str] | None:
    """Return ``(reason, detail)`` when ``path`` is not a readable image, else ``None``.

    With ``decode`` the pixel limit is checked and the whole file is decoded (finds truncated
    files); without, only existence is checked."""
    if not path.is_file():
        return MISSING_IMAGE, f"{path} does not exist"
    if not decode:
        return None
    try:
        with open_image(path, max_pixels) as image:
            image.load()
    except UnreadableImageError as refused:
        return refused.reason, refused.detail
    except _READ_ERRORS as exc:
        return CORRUPT_IMAGE, f"{path} cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def read_image(
    path: Path, record: str, mode: str | None = "RGB", *, max_pixels: int | None = None
) -> Image.Image:
    """Decode ``path`` completely (converted to ``mode`` unless ``None``).

    Raises:
        BadRecordError: naming ``record``: the file is missing, corrupt, or has more pixels than
            ``max_pixels`` (``None``: :data:`MAX_IMAGE_PIXELS`; checked before decoding).
    """
    problem = image_problem(path, decode=False)
    if problem is not None:
        raise BadRecordError(path, record, *problem)
    try:
        with open_image(path, max_pixels) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except UnreadableImageError as refused:
        raise BadRecordError(path, record, refused.reason, refused.detail) from None
    except _READ_ERRORS as exc:
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


@dataclass(frozen=True)
class ImageProblem:
    """One file :func:`find_bad_images` rejects: ``path``, ``reason`` (one of ``REASONS``) and
    ``detail``."""

    path: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}: {self.detail}"


class BadImagesError(ValueError):
    """Images of a data set that cannot be used. ``problems``: every :class:`ImageProblem`."""

    def __init__(self, where: str, problems: list[ImageProblem], checked: int, listed: int):
        self.where = where
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:listed])
        more = f"\n  ... and {len(problems) - listed} more" if len(problems) > listed else ""
        super().__init__(
            f"{where}: {len(problems)} of {checked} images cannot be used:\n{shown}{more}\n"
            "Replace or remove these files (or their records), or raise the pixel limit where "
            f"it is the reason; to train without their records, {SKIP_ADVICE}."
        )


def find_bad_images(
    paths: Iterable[str | Path], *, max_pixels: int | None = None, decode: bool = False
) -> tuple[list[ImageProblem], int]:
    """Check each distinct image file once.

    Each file must exist, open (PIL reads its header), have at most ``max_pixels`` pixels
    (``None``: :data:`MAX_IMAGE_PIXELS`) and pass PIL's ``verify()``: for PNG that reads every
    chunk and checks its CRC (finds truncated and damaged files) without decompressing; for JPEG
    it checks little beyond the header. ``decode=True`` decodes every file completely instead of
    ``verify()`` (what loading with ``check_images=True`` does; several times slower), which
    also finds truncated JPEGs.

    Returns:
        ``(problems, checked)``: one :class:`ImageProblem` per bad file, in the order given, and
        the number of distinct files checked.
    """
    seen: set[str] = set()
    problems: list[ImageProblem] = []
    for raw in paths:
        key = str(raw)
        if key in seen:
            continue
        seen.add(key)
        problem = _image_file_problem(Path(key), max_pixels, decode)
        if problem is not None:
            problems.append(ImageProblem(key, *problem))
    return problems, len(seen)


def _image_file_problem(path: Path, max_pixels: int | None, decode: bool) -> tuple[str, str] | None:
    if not path.is_file():
        return MISSING_IMAGE, f"{path} does not exist"
    try:
        with open_image(path, max_pixels) as image:
            if decode:
                image.load()
            else:
                image.verify()
    except UnreadableImageError as refused:
        return refused.reason, refused.detail
    except _READ_ERRORS as exc:
        return CORRUPT_IMAGE, f"{path} is damaged ({type(exc).__name__}: {exc})"
    return None


def verify_images(
    paths: Iterable[str | Path],
    where: str,
    *,
    max_pixels: int | None = None,
    decode: bool = False,
    max_listed: int = 20,
) -> int:
    """Check every image of a split before a long job (see :func:`find_bad_images`), and fail
    once, listing the bad files, rather than one file at a time during training.

    Args:
        paths: the image files (repeats are checked once).
        where: what the files are, for the message (``"train split of recipe.yaml"``).
        max_pixels: the pixel limit; ``None``: :data:`MAX_IMAGE_PIXELS`.
        decode: decode every file completely instead of ``verify()`` (slower, finds more).
        max_listed: how many bad files the message lists (all are in ``error.problems``).
    Returns:
        the number of distinct files checked.
    Raises:
        BadImagesError: (a ``ValueError``) one or more files are missing, damaged or too large.
    """
    problems, checked = find_bad_images(paths, max_pixels=max_pixels, decode=decode)
    if problems:
        raise BadImagesError(where, problems, checked, max_listed)
    return checked


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
