"""VQA splits from a Hugging Face ``datasets`` folder (written by ``save_to_disk``).

A table with an image column (``datasets.Image``), a question column and an answers column
(a list of human answers — strings, or VQA v2's ``{"answer": ...}`` dicts — or one string)
becomes the same records as :func:`distiq.data.load_vqa_v2`'s: ``question``, ``answers``,
``answer`` (a column of its own, or the most frequent human answer), ``question_type``,
``question_id`` and ``image_id`` (columns, or the row number), plus ``image``: a function that
decodes the row's image when called (images stay in the Arrow file until used).

Bad rows (an empty question, no answers, an image that does not open or is too large) follow
``on_bad_record`` (:mod:`distiq.data.records`). Needs the ``datasets`` package
(``pip install 'distiq[hf-data]'``).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distiq.data.records import (
    CORRUPT_IMAGE,
    IMAGE_TOO_LARGE,
    MALFORMED,
    MAX_IMAGE_PIXELS,
    RecordPolicy,
)
from distiq.data.vqa import canonical_answer

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = {
    "image": "image",
    "question": "question",
    "answers": "answers",
    "answer": None,
    "question_id": None,
    "image_id": None,
    "question_type": None,
}


def open_hf_split(path: str | os.PathLike, split: str) -> Any:
    """The ``split`` of the ``datasets`` folder ``path`` (a ``DatasetDict``'s split; a single
    ``Dataset`` serves every split name)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "reading a datasets folder needs the datasets package: pip install 'distiq[hf-data]'",
            name="datasets",
        ) from exc
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"data.hf.path: {path} is not a directory (save_to_disk's output)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(
            f"data.hf.path: {path} is not a folder written by save_to_disk ({exc})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"data.hf.path: {path} has no split {split!r}; it has {', '.join(loaded)} "
                "(set data.train_split / val_split / test_split)"
            )
        return loaded[split]
    return loaded


def _answers(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value] if value.strip() else None
    if isinstance(value, list | tuple) and value:
        out = []
        for item in value:
            if isinstance(item, Mapping):
                item = item.get("answer")
            if not isinstance(item, str):
                return None
            out.append(item)
        return out if any(a.strip() for a in out) else None
    return None


def _decode(table: Any, row: int, column: str) -> Any:
    """The RGB image of ``row`` (``ImageQuestions`` calls this when it needs the pixels)."""
    from PIL import Image

    cell = table[row][column]
    if isinstance(cell, Image.Image):
        return cell
    return Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])


def _image_problem(cell: Any) -> tuple[str, str] | None:
    """Why an undecoded image cell (``{"bytes", "path"}``) cannot be used, or None."""
    from PIL import Image

    if not isinstance(cell, Mapping) or not (cell.get("bytes") or cell.get("path")):
        return MALFORMED, "no image"
    try:
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
        with Image.open(source) as image:
            if MAX_IMAGE_PIXELS is not None and image.width * image.height > MAX_IMAGE_PIXELS:
                return IMAGE_TOO_LARGE, (
                    f"{image.width}x{image.height} pixels is above the limit of "
                    f"{MAX_IMAGE_PIXELS:,} (distiq.data.records.MAX_IMAGE_PIXELS)"
                )
            image.verify()
    except Exception as exc:  # PIL raises many types for damaged files
        return CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}"
    return None


def load_hf_vqa(
    path: str | os.PathLike,
    split: str,
    columns: Mapping[str, str | None] | None = None,
    *,
    on_bad_record: str = "error",
) -> list[dict[str, Any]]:
    """The records of ``split`` (see the module docstring).

    Args:
        path: a folder written by ``save_to_disk``.
        split: the split name (ignored for a folder holding one ``Dataset``).
        columns: column names (keys of :data:`DEFAULT_COLUMNS`); None for a key means "not in
            the table".
        on_bad_record: ``error`` | ``skip``.

    Raises:
        BadRecordError: a bad row with ``on_bad_record="error"``.
        ValueError: a named column is missing (with the columns there are).
    """
    import datasets

    names = {**DEFAULT_COLUMNS, **dict(columns or {})}
    table = open_hf_split(path, split)
    for key, column in names.items():
        if column is not None and column not in table.column_names:
            raise ValueError(
                f"data.hf.columns.{key}: the {split!r} split of {path} has no column {column!r}; "
                f"it has {', '.join(table.column_names)}"
            )
    source = f"{path}[{split}]"
    policy = RecordPolicy(on_bad_record, source)
    raw_images = table.cast_column(names["image"], datasets.Image(decode=False))
    decoded = table.cast_column(names["image"], datasets.Image(decode=True))
    text_columns = [c for k, c in names.items() if c is not None and k != "image"]
    rows = table.select_columns(text_columns).to_list()
    records = []
    image_ids: dict[Any, int] = {}  # image ids as integers (a batch holds them in a tensor)
    for index, row in enumerate(rows):
        question_id = row[names["question_id"]] if names["question_id"] else index
        if not isinstance(question_id, int) or isinstance(question_id, bool):
            policy.bad(
                source, f"row {index}", MALFORMED, f"question_id {question_id!r} is no integer"
            )
            continue
        where = f"row {index} (question_id {question_id})"
        question = row[names["question"]]
        answers = _answers(row[names["answers"]])
        if not isinstance(question, str) or not question.strip():
            policy.bad(source, where, MALFORMED, "empty or missing question")
            continue
        if answers is None:
            policy.bad(source, where, MALFORMED, "no human answers (a string or a list of them)")
            continue
        problem = _image_problem(raw_images[index][names["image"]])
        if problem is not None:
            policy.bad(source, where, *problem)
            continue
        answer = row[names["answer"]] if names["answer"] else canonical_answer(answers)
        records.append(
            {
                "question": question,
                "answers": answers,
                "answer": answer,
                "question_type": str(row[names["question_type"]]) if names["question_type"] else "",
                "question_id": question_id,
                "image_id": image_ids.setdefault(
                    row[names["image_id"]] if names["image_id"] else ("row", index), len(image_ids)
                ),
                "image": functools.partial(_decode, decoded, index, names["image"]),
            }
        )
        policy.keep()
    policy.finish()
    _check_unique(records, source)
    return records


def _check_unique(records: list[dict], source: str) -> None:
    seen: set = set()
    for record in records:
        key = record["question_id"]
        if key in seen:
            raise ValueError(
                f"{source}: question_id {key!r} is used by two rows; ids must be unique "
                "(leave data.hf.columns.question_id out to number the rows)"
            )
        seen.add(key)
