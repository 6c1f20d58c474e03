"""Loaders for visual question answering: VQA v2 and Visual Genome QA.

Both return a :class:`VQADataset`, whose ``dataset[i]`` is the VQA sample dict of the contract::

    {"image": PIL.Image (RGB), "question": str, "answers": list[str] (the human answers: ten for
     VQA v2, one for Visual Genome), "answer": str (the most frequent human answer; ties: VQA v2's
     multiple_choice_answer if tied, else the first given), "question_type": str,
     "question_id": int, "image_id": int}

VQA v2 files (https://visualqa.org/download.html): see :mod:`distiq.data.formats` for the JSON
layout. Images are found in ``image_dir`` as ``COCO_{data_subtype}_{image_id:012d}`` or
``{image_id:012d}`` (COCO 2017 names) with ``.jpg`` or ``.png``; pass ``image_name`` (a format
string with ``{image_id}`` and ``{data_subtype}``, or a function of the image id) otherwise.
Without ``annotations_json`` (test-dev) ``answers`` is ``[]`` and ``answer`` is ``""``.

Visual Genome (https://homes.cs.washington.edu/~ranjay/visualgenome/api.html):
``question_answers.json`` is ``[{"id": image_id, "qas": [{"qa_id", "image_id", "question",
"answer", "q_objects", "a_objects"}, ...]}, ...]`` and ``image_data.json`` is ``[{"image_id"
(or "id"), "url": ".../VG_100K_2/1.jpg", "width", "height", "coco_id", "flickr_id"}, ...]``.
Images are looked up as ``image_dir/<folder>/<file>`` from the URL's last two parts, then
``image_dir/<file>``. ``question_type`` is the question's first word (``what``, ``where``, ...).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distiq.config import read_utf8
from distiq.data.records import (
    MALFORMED,
    MISSING_ANNOTATION,
    MISSING_IMAGE,
    RecordDataset,
    RecordPolicy,
    image_problem,
    read_image,
)


class VQADataset(RecordDataset):
    """VQA samples; ``records[i]`` holds everything but the decoded image (``image_path``)."""

    task = "vqa"

    def _sample(self, record: dict[str, Any]) -> dict[str, Any]:
        image = read_image(Path(record["image_path"]), f"question {record['question_id']}")
        return {
            "image": image,
            "question": record["question"],
            "answers": list(record["answers"]),
            "answer": record["answer"],
            "question_type": record["question_type"],
            "question_id": record["question_id"],
            "image_id": record["image_id"],
        }


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a UTF-8 JSON file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not UTF-8 (:class:`distiq.config.NotUTF8Error`) or not JSON; the
            message names the file and ``what`` it should be.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = read_utf8(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); is this a {what}?") from None


def canonical_answer(answers: list[str], preferred: str | None = None) -> str:
    """The most frequent answer; ties go to ``preferred`` if tied, else to the first given."""
    if answers.count(answers[0]) == len(answers):  # unanimous (the common case)
        return answers[0]
    counts = Counter(answers)
    top = max(counts.values())
    tied = [a for a in counts if counts[a] == top]  # Counter keeps first-seen order
    return preferred if preferred in tied else tied[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _ImageChecker:
    """Resolves and checks each image once, however many records point to it.

    Without ``check_images`` a file's existence is looked up in one listing of its folder
    (``listing``) instead of a ``stat`` per image (``benchmarks/demo_setup_costs.py``
    measures the difference)."""

    def __init__(self, check_images: bool) -> None:
        self.check_images = check_images
        self._cache: dict[str, tuple[str, str] | None] = {}
        self._listings: dict[str, frozenset[str] | None] = {}

    def listing(self, folder: str) -> frozenset[str] | None:
        """The names of the files in ``folder`` (None if it cannot be listed)."""
        if folder not in self._listings:
            try:
                with os.scandir(folder) as entries:
                    self._listings[folder] = frozenset(e.name for e in entries if e.is_file())
            except OSError:
                self._listings[folder] = None
        return self._listings[folder]

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        names = self.listing(folder)
        return name in names if names is not None else os.path.isfile(path)

    def problem(self, path: str | Path) -> tuple[str, str] | None:
        key = str(path)
        if key not in self._cache:
            if self.check_images:
                self._cache[key] = image_problem(Path(key), decode=True)
            else:
                self._cache[key] = (
                    None if self.exists(key) else (MISSING_IMAGE, f"{key} does not exist")
                )
        return self._cache[key]


def _vqa_image_resolver(
    image_dir: Path,
    data_subtype: str,
    image_name: str | Callable[[int], str] | None,
    checker: _ImageChecker,
) -> Callable[[int], str]:
    folder = str(image_dir)
    if callable(image_name):
        return lambda image_id: os.path.join(folder, image_name(image_id))
    if isinstance(image_name, str):
        return lambda image_id: os.path.join(
            folder, image_name.format(image_id=image_id, data_subtype=data_subtype)
        )
    stems = (f"COCO_{data_subtype}_{{:012d}}", "{:012d}")

    def resolve(image_id: int) -> str:
        candidates = (
            os.path.join(folder, s.format(image_id) + e)
            for s in stems
            for e in (".jpg", ".png", ".jpeg")
        )
        first = next(candidates)
        if checker.exists(first):
            return first
        # the first existing candidate; none: the first one, reported as missing
        return next((p for p in candidates if checker.exists(p)), first)

    return resolve


def load_vqa_v2(
    questions_json: str | os.PathLike,
    annotations_json: str | os.PathLike | None,
    image_dir: str | os.PathLike,
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
    image_name: str | Callable[[int], str] | None = None,
) -> VQADataset:
    """Load a VQA v2 split (questions JSON, annotations JSON or ``None``, image folder).

    Bad records (module :mod:`distiq.data.records`): a malformed question or annotation entry,
    a question_id used by two questions (all of them are bad) or two annotations (the question
    is bad), a question without annotation, a missing, corrupt or too large image.

    Raises:
        BadRecordError: a bad record, with ``on_bad_record="error"``.
        FileNotFoundError / ValueError: a file is missing, not UTF-8, not JSON or not the format.
    """
    questions_json = Path(questions_json)
    policy = RecordPolicy(on_bad_record, questions_json)
    qdoc = read_json(questions_json, "VQA v2 questions file")
    if not isinstance(qdoc, dict) or not isinstance(qdoc.get("questions"), list):
        raise ValueError(f"{questions_json}: not a VQA v2 questions file (no 'questions' list)")
    data_subtype = str(qdoc.get("data_subtype", ""))
    checker = _ImageChecker(check_images)
    resolve = _vqa_image_resolver(Path(image_dir), data_subtype, image_name, checker)
    resolved: dict[int, str] = {}  # many questions share an image: resolve it once

    annotations: dict[int, list[tuple[int, dict[str, Any]]]] | None = None
    if annotations_json is not None:
        annotations_json = Path(annotations_json)
        annotations = _read_annotations(annotations_json, policy)
    # Answers are matched to questions by question_id: a repeated id is ambiguous.
    entries_of: dict[int, list[int]] = {}
    for i, entry in enumerate(qdoc["questions"]):
        if isinstance(entry, dict) and _is_int(entry.get("question_id")):
            entries_of.setdefault(entry["question_id"], []).append(i)

    records = []
    for i, entry in enumerate(qdoc["questions"]):
        where = f"question #{i}"
        if not isinstance(entry, dict) or not all(
            (
                _is_int(entry.get("question_id")),
                _is_int(entry.get("image_id")),
                isinstance(entry.get("question"), str),
            )
        ):
            policy.bad(
                questions_json,
                where,
                MALFORMED,
                "needs integer 'question_id' and 'image_id' and a string 'question'",
            )
            continue
        question_id, image_id = entry["question_id"], entry["image_id"]
        repeats = entries_of[question_id]
        if len(repeats) > 1:
            detail = _repeated(question_id, "questions", repeats)
            policy.bad(questions_json, where, MALFORMED, detail)
            continue
        where = f"question_id {question_id}"
        answers: list[str] = []
        answer, question_type = "", ""
        if annotations is not None:
            found = annotations.get(question_id, [])
            if not found:
                policy.bad(
                    annotations_json,
                    where,
                    MISSING_ANNOTATION,
                    "no annotation has this question_id",
                )  # type: ignore[arg-type]
                continue
            if len(found) > 1:
                detail = _repeated(question_id, "annotations", [j for j, _ in found])
                policy.bad(annotations_json, where, MALFORMED, detail)  # type: ignore[arg-type]
                continue
            annotation = found[0][1]
            problem = _annotation_problem(annotation, image_id)
            if problem:
                policy.bad(annotations_json, where, MALFORMED, problem)  # type: ignore[arg-type]
                continue
            answers = [a["answer"] for a in annotation["answers"]]
            answer = canonical_answer(answers, annotation.get("multiple_choice_answer"))
            question_type = annotation["question_type"]
        path = resolved.get(image_id)
        if path is None:
            path = resolved[image_id] = resolve(image_id)
        image_bad = checker.problem(path)
        if image_bad is not None:
            policy.bad(path, f"{where} (image_id {image_id})", *image_bad)
            continue
        records.append(
            {
                "image_path": path,
                "question": entry["question"],
                "answers": answers,
                "answer": answer,
                "question_type": question_type,
                "question_id": question_id,
                "image_id": image_id,
            }
        )
        policy.keep()
    return VQADataset(records, policy.finish())


def _read_annotations(
    path: Path, policy: RecordPolicy
) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """The annotations of a VQA v2 annotations file by question_id, each with its entry index
    (a list: a repeated question_id is reported when a question uses it)."""
    doc = read_json(path, "VQA v2 annotations file")
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{path}: not a VQA v2 annotations file (no 'annotations' list)")
    annotations: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for i, entry in enumerate(doc["annotations"]):
        if not isinstance(entry, dict) or not _is_int(entry.get("question_id")):
            policy.bad(path, f"annotation #{i}", MALFORMED, "no integer 'question_id'")
            continue
        annotations.setdefault(entry["question_id"], []).append((i, entry))
    return annotations


def _repeated(question_id: int, what: str, entries: list[int]) -> str:
    """The detail of a question_id used by several ``what`` (questions / annotations)."""
    shown = ", ".join(f"#{i}" for i in entries[:5]) + (", ..." if len(entries) > 5 else "")
    fix = (
        "give each question its own id"
        if what == "questions"
        else "keep one annotation per question"
    )
    return (
        f"question_id {question_id} is used by {len(entries)} {what} ({shown}); answers are "
        f"matched to questions by question_id, so it must be unique: {fix} (each of these "
        f"{what} is a bad record)"
    )


def _annotation_problem(annotation: dict[str, Any], image_id: int) -> str | None:
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not answers:
        return "'answers' must be a non-empty list"
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        return "each of 'answers' must be {'answer': str, ...}"
    if not isinstance(annotation.get("question_type"), str):
        return "no string 'question_type'"
    if annotation.get("image_id", image_id) != image_id:
        return f"annotation image_id {annotation.get('image_id')!r} differs from the question's {image_id}"
    return None


def _vg_image_path(image_dir: Path, entry: dict[str, Any], image_id: int) -> Path:
    url = entry.get("url")
    if isinstance(url, str) and "/" in url:
        folder, file = url.rstrip("/").split("/")[-2:]
        nested = image_dir / folder / file
        return nested if nested.is_file() or not (image_dir / file).is_file() else image_dir / file
    return image_dir / f"{image_id}.jpg"


def load_visual_genome_qa(
    question_answers_json: str | os.PathLike,
    image_data_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    on_bad_record: str = "error",
    check_images: bool = True,
) -> VQADataset:
    """Load Visual Genome QA pairs (``question_answers.json``, ``image_data.json``, image root).

    Bad records: a malformed QA entry (no string question/answer, no integer ids), an image id
    missing from ``image_data.json`` or a missing or corrupt image file."""
    qa_path, data_path, image_dir = (
        Path(question_answers_json),
        Path(image_data_json),
        Path(image_dir),
    )
    policy = RecordPolicy(on_bad_record, qa_path)
    image_data = read_json(data_path, "Visual Genome image_data.json")
    qa_doc = read_json(qa_path, "Visual Genome question_answers.json")
    if not isinstance(image_data, list) or not isinstance(qa_doc, list):
        raise ValueError(f"{qa_path} / {data_path}: Visual Genome files hold JSON lists")
    images: dict[int, Path] = {}
    for i, entry in enumerate(image_data):
        image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        if not _is_int(image_id):
            policy.bad(data_path, f"image entry #{i}", MALFORMED, "no integer 'image_id' (or 'id')")
            continue
        images[image_id] = _vg_image_path(image_dir, entry, image_id)

    checker = _ImageChecker(check_images)
    records = []
    for i, group in enumerate(qa_doc):
        if not isinstance(group, dict) or not isinstance(group.get("qas"), list):
            policy.bad(qa_path, f"entry #{i}", MALFORMED, "no 'qas' list")
            continue
        for j, qa in enumerate(group["qas"]):
            where = f"entry #{i} qa #{j}"
            ok = (
                isinstance(qa, dict)
                and _is_int(qa.get("qa_id"))
                and _is_int(qa.get("image_id", group.get("id")))
            )
            if (
                not ok
                or not isinstance(qa.get("question"), str)
                or not isinstance(qa.get("answer"), str)
            ):
                policy.bad(
                    qa_path,
                    where,
                    MALFORMED,
                    "needs integer 'qa_id'/'image_id' and string 'question'/'answer'",
                )
                continue
            image_id = qa.get("image_id", group.get("id"))
            where = f"qa_id {qa['qa_id']}"
            path = images.get(image_id)
            if path is None:
                policy.bad(
                    data_path,
                    where,
                    MISSING_IMAGE,
                    f"image_id {image_id} is not in {data_path.name}",
                )
                continue
            image_bad = checker.problem(path)
            if image_bad is not None:
                policy.bad(path, f"{where} (image_id {image_id})", *image_bad)
                continue
            question = qa["question"].strip()
            words = question.lower().split()
            answer = qa["answer"].strip()
            records.append(
                {
                    "image_path": str(path),
                    "question": question,
                    "answers": [answer],
                    "answer": answer,
                    "question_type": words[0].strip("?.,!") if words else "",
                    "question_id": qa["qa_id"],
                    "image_id": image_id,
                }
            )
            policy.keep()
    return VQADataset(records, policy.finish())
