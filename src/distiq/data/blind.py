"""The question-only ("blind") baseline of a VQA data set: how well the answer can be guessed
from the question text alone.

The oracle learns, on the training split, the most frequent answer of every exact question text
(ties: alphabetically first) and answers each test question with it; a text never seen in
training gets its question type's most frequent answer, then the overall one. Accuracy is the
exact match with the canonical answer. A model that beats this number is using the image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


def _qa_items(data: Any) -> list[Mapping[str, Any]]:
    """The ``{"question", "answer", "question_type"}`` mappings of a loaded dataset (its
    ``records``, without decoding images) or of any iterable of such mappings."""
    items = getattr(data, "records", data)
    if not isinstance(items, Iterable):
        raise TypeError("pass a VQA dataset or an iterable of {'question', 'answer', ...} dicts")
    return list(items)


def _blind_predictions(train: Any, test: Any) -> list[tuple[str, bool]]:
    by_text: defaultdict[str, Counter[str]] = defaultdict(Counter)
    by_type: defaultdict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for item in _qa_items(train):
        by_text[item["question"]][item["answer"]] += 1
        by_type[item.get("question_type", "")][item["answer"]] += 1
        overall[item["answer"]] += 1
    if not overall:
        raise ValueError("blind baseline: the training set has no questions")

    def best(counts: Counter[str]) -> str:  # most frequent; ties: alphabetically first
        return min(counts, key=lambda a: (-counts[a], a))

    out = []
    for item in _qa_items(test):
        qtype = item.get("question_type", "")
        counts = by_text.get(item["question"]) or by_type.get(qtype) or overall
        out.append((qtype, best(counts) == item["answer"]))
    if not out:
        raise ValueError("blind baseline: the test set has no questions")
    return out


def blind_baseline_accuracy(train: Any, test: Any) -> float:
    """Accuracy (0–1) of the question-only oracle: for each test question, the most frequent
    training answer of the same question text (unseen texts: of the same question type; then
    overall), scored by exact match with the canonical answer. ``train``/``test`` are VQA
    datasets or iterables of ``{"question", "answer", "question_type"}`` dicts."""
    predictions = _blind_predictions(train, test)
    return sum(hit for _, hit in predictions) / len(predictions)


def blind_baseline_by_type(train: Any, test: Any) -> dict[str, float]:
    """:func:`blind_baseline_accuracy` per question type."""
    hits: defaultdict[str, list[bool]] = defaultdict(list)
    for qtype, hit in _blind_predictions(train, test):
        hits[qtype].append(hit)
    return {t: sum(h) / len(h) for t, h in sorted(hits.items())}
