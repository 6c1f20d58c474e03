"""Visual question answering: answer-token loss, distillation view and the official VQA accuracy.

``vqa_accuracy`` reproduces the official VQA evaluation (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, its current version) question by question:

1. every answer, predicted and human, has its newlines and tabs turned into spaces and its ends
   stripped;
2. when the human answers (so stripped) are *not* all identical, every answer, the prediction
   included, is normalised by ``process_punctuation`` then ``process_digit_article``
   (``normalize_answer`` does both); when they are all identical nothing is normalised, so a
   prediction ``"Yes"`` scores 0 against ten ``"yes"`` (an official quirk, kept);
3. accuracy = the mean, over the n leave-one-out subsets of the n human answers, of
   ``min(1, matches in the subset / 3)``, summed in the official order so that the float is the
   official one bit for bit. The official script reports ``round(100 * accuracy, 2)``;
   distiq keeps the unrounded fraction in [0, 1] (reports multiply by 100).

Per question type and per answer type, ``VQAAccuracy`` averages the same per-question values as
the official per-type tables (with ``math.fsum``, which can differ from the official plain sum
in the last bit only).

Where distiq differs, on purpose: with a single human answer (Visual Genome) the official
leave-one-out subset is empty and always scores 0, so ``vqa_accuracy`` scores exact match of the
two ``normalize_answer``-ed answers instead. And the official script runs under Python 2, whose
Unicode tables are older than Python 3's: the two lower-case and split some rare characters
differently (U+0130, Greek final sigma, U+180E, letters added to Unicode after 5.2), so answers
containing those can score differently. ASCII and the common Latin, Greek and Cyrillic letters
behave alike (``tests/tasks/data/vqa_official_cases.json``, made by
``scripts/vqa_official_cases.py``, holds the official scores of generated cases).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from distiq.tasks._vqa_tables import (
    ARTICLES,
    COMMA_STRIP,
    CONTRACTIONS,
    NUMBER_WORDS,
    PERIOD_STRIP,
    PERIOD_STRIP_COUNT,
    PUNCTUATION,
)
from distiq.tasks.base import DistillView, Task, TaskLoss, check_problems, logits_of, require

log = logging.getLogger(__name__)

__all__ = [
    "VQAAccuracy",
    "VQATask",
    "answer_token_loss",
    "answer_token_mask",
    "infer_answer_type",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "strip_whitespace",
    "vqa_accuracy",
]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- normalisation
def strip_whitespace(text: str) -> str:
    """The official first step, applied to every answer: newlines and tabs become spaces, then
    whitespace is stripped from both ends (inner runs of spaces stay)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each mark in ``PUNCTUATION`` is deleted when it touches a space anywhere in ``text`` (``"yes ,
    sir"``) or when ``text`` contains a comma between two digits (``"1,000"``; then *every* mark
    is deleted), and replaced by a space otherwise (``"Yes!"`` -> ``"Yes "``, ``"red/blue"`` ->
    ``"red blue"``). Then periods not followed by a digit are removed (at most 32 of them;
    ``"3.5"`` keeps its point). Case and other marks (``'``, ``:``, ``#``, ...) are unchanged.
    """
    out = text
    delete_all = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        # the official test looks at the *original* text, whatever earlier marks became
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, split on whitespace, number words -> digits
    (``"two"`` -> ``"2"``, ``"none"`` -> ``"0"``, up to ``"ten"``), drop ``a``/``an``/``the``,
    rewrite contractions (``"dont"`` -> ``"don't"``), join with single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """Normalise an answer fully, as the official VQA evaluation does to every answer of a
    question whose human answers disagree: ``strip_whitespace``, ``process_punctuation``,
    ``process_digit_article``.

    Raises:
        TypeError: ``answer`` is not a str.
    """
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__}: {answer!r}")
    return _normalize(answer)


@functools.lru_cache(maxsize=1 << 16)
def _normalize(answer: str) -> str:
    # Cached: an evaluation normalises the same few hundred answer strings again and again.
    return process_digit_article(process_punctuation(strip_whitespace(answer)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the human answers, in [0, 1].

    With n >= 2 human answers (ten in VQA v2): the official score (see the module docstring).
    Out of ten, one matching human answer gives 0.3 (nine of the ten subsets hold it, each
    scoring 1/3), two 0.6, three 0.9, four or more 1.0. Answers are normalised only when the
    human answers disagree. With one human answer: exact match after ``normalize_answer`` on
    both sides.

    Raises:
        TypeError: ``human_answers`` is not a list of str, or ``prediction`` is not a str.
        ValueError: ``human_answers`` is empty.
    """
    if isinstance(human_answers, str) or not isinstance(human_answers, Sequence):
        raise TypeError(
            "human_answers must be a list of answer strings (the ten VQA v2 answers), got "
            f"{type(human_answers).__name__}: {human_answers!r}"
        )
    if len(human_answers) == 0:
        raise ValueError("human_answers is empty: a question needs at least one human answer")
    for answer in (prediction, *human_answers):
        if not isinstance(answer, str):
            raise TypeError(f"an answer must be a str, got {type(answer).__name__}: {answer!r}")
    if len(human_answers) == 1:
        return float(_normalize(prediction) == _normalize(human_answers[0]))
    humans = [strip_whitespace(answer) for answer in human_answers]
    predicted = strip_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [_normalize(answer) for answer in humans]
        predicted = _normalize(predicted)
    matches = sum(answer == predicted for answer in humans)
    # Subset i leaves out human answer i: it holds matches - 1 matching answers if answer i
    # matched, else matches. Summed left to right like the official list of subset scores.
    subset_scores = [min(1.0, (matches - (answer == predicted)) / 3) for answer in humans]
    return sum(subset_scores) / len(subset_scores)


def infer_answer_type(human_answers: Sequence[str]) -> str:
    """VQA v2's answer type, inferred when the annotation has none: ``"yes/no"`` when the most
    common normalised human answer is yes or no, ``"number"`` when it is an integer, else
    ``"other"``."""
    common = Counter(normalize_answer(answer) for answer in human_answers).most_common(1)
    answer = common[0][0] if common else ""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer.isdigit():
        return "number"
    return "other"


# --------------------------------------------------------------------------- metric accumulator
class VQAAccuracy:
    """Accumulates VQA accuracy over questions, overall and per question / answer type.

    ``update(predictions, batch)``: ``predictions`` a list of B answer strings; ``batch["answers"]``
    a list of B lists of human answers; optional ``batch["question_type"]`` and
    ``batch["answer_type"]`` (lists of B strings; the answer type is inferred when absent).
    ``compute()`` returns ``vqa_accuracy`` (mean over questions, in [0, 1]),
    ``vqa_accuracy/question_type/<type>``, ``vqa_accuracy/answer_type/<type>`` and
    ``num_questions``; ``per_question()`` each question's prediction and score (by
    ``batch["question_id"]`` when the batch has it).
    """

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.question_types: list[str | None] = []
        self.answer_types: list[str] = []
        self.question_ids: list[Any] = []
        self.predictions: list[str] = []

    def update(self, predictions: Sequence[str], batch: Mapping[str, Any]) -> None:
        answers = require(batch, "answers", "vqa")
        if isinstance(predictions, str) or len(predictions) != len(answers):
            raise ValueError(
                f"got {1 if isinstance(predictions, str) else len(predictions)} predictions for "
                f"{len(answers)} questions; pass one answer string per question"
            )
        question_types = batch.get("question_type")
        answer_types = batch.get("answer_type")
        question_ids = batch.get("question_id")
        if question_ids is not None and hasattr(question_ids, "tolist"):
            question_ids = question_ids.tolist()
        for i, (prediction, humans) in enumerate(zip(predictions, answers)):
            self.scores.append(vqa_accuracy(prediction, humans))
            self.predictions.append(prediction)
            self.question_ids.append(None if question_ids is None else question_ids[i])
            self.question_types.append(None if question_types is None else question_types[i])
            self.answer_types.append(
                infer_answer_type(humans) if answer_types is None else answer_types[i]
            )

    def merge(self, other: VQAAccuracy) -> None:
        self.scores += other.scores
        self.question_types += other.question_types
        self.answer_types += other.answer_types
        self.question_ids += other.question_ids
        self.predictions += other.predictions

    def reset(self) -> None:
        self.scores, self.question_types, self.answer_types = [], [], []
        self.question_ids, self.predictions = [], []

    def per_question(self) -> list[dict[str, Any]]:
        """One ``{"question_id", "prediction", "score"}`` per scored question, sorted by id
        (what a paired comparison of two models on the same questions reads)."""
        rows = [
            {"question_id": q, "prediction": p, "score": s}
            for q, p, s in zip(self.question_ids, self.predictions, self.scores)
        ]
        return sorted(rows, key=lambda r: (r["question_id"] is None, r["question_id"]))

    def compute(self) -> dict[str, float]:
        if not self.scores:
            raise ValueError("no questions were scored: call update() before compute()")
        out = {
            # fsum: exactly rounded, so the result does not depend on the order of the scores
            # (merged shards of a data-parallel evaluation give the one-process value)
            "vqa_accuracy": math.fsum(self.scores) / len(self.scores),
            "num_questions": float(len(self.scores)),
        }
        for kind, types in (
            ("question_type", self.question_types),
            ("answer_type", self.answer_types),
        ):
            groups: dict[str, list[float]] = defaultdict(list)
            for score, type_ in zip(self.scores, types):
                if type_ is not None:
                    groups[type_].append(score)
            for type_ in sorted(groups):
                out[f"vqa_accuracy/{kind}/{type_}"] = math.fsum(groups[type_]) / len(groups[type_])
        return out


# --------------------------------------------------------------------------- loss
def answer_token_mask(labels: torch.Tensor, *, shift: bool = True) -> torch.Tensor:
    """``(B, T)`` bool: the logit positions that predict an answer token.

    With ``shift=True`` (Hugging Face convention: ``labels`` are aligned with ``input_ids`` and the
    logit at position t predicts token t + 1) position t is valid when ``labels[:, t+1] != -100``;
    the last position is never valid. With ``shift=False`` labels are already aligned with logits.
    """
    valid = labels != IGNORE_INDEX
    if not shift:
        return valid
    mask = torch.zeros_like(valid)
    mask[:, :-1] = valid[:, 1:]
    return mask


def answer_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of the answer tokens, averaged over answer tokens in the batch.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids, ``-100`` on every non-answer token (prompt, image, padding).
        shift: Hugging Face convention (default): the logit at t predicts ``labels[:, t+1]``.
    Returns:
        scalar: sum of per-token CE over answer tokens / number of answer tokens (a token mean,
        so it does not depend on the vocabulary size or the padding).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if not bool((labels != IGNORE_INDEX).any()):
        raise ValueError(
            "labels contain no answer token (all -100): the answer was masked or truncated; "
            "check how the batch's labels are built (answer tokens keep their ids)"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


# --------------------------------------------------------------------------- task
@dataclasses.dataclass(frozen=True)
class VQATask(Task):
    """Generative VQA.

    ``outputs``: a causal LM output (``.logits`` / ``["logits"]`` / tensor) with logits
    ``(B, T, V)``. ``batch["labels"]``: ``(B, T)``, ``-100`` on non-answer tokens (Hugging Face
    convention, shifted inside unless ``shift_labels=False``). The loss term is ``answer_ce``.
    Distillation view: ``distributions["answer_tokens"]`` = the logits with the mask of the
    positions that predict answer tokens (all positions when the batch has no labels;
    ``distill_all_tokens=True`` uses ``batch["attention_mask"]`` instead). Predictions are the
    generated answer strings (generation is model-specific and lives in ``distiq.models``).
    """

    weight: float = 1.0
    label_smoothing: float = 0.0
    shift_labels: bool = True
    distill_all_tokens: bool = False

    name = "vqa"
    primary_metric = "vqa_accuracy"

    def __post_init__(self) -> None:
        check_problems(self._validate(), "VQATask")

    def _validate(self) -> list[str]:
        problems = []
        if self.weight < 0:
            problems.append(f"weight must be >= 0, got {self.weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        return problems

    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> TaskLoss:
        labels = require(batch, "labels", self.name)
        ce = answer_token_loss(
            logits_of(outputs),
            labels,
            shift=self.shift_labels,
            label_smoothing=self.label_smoothing,
        )
        term = self.weight * ce
        tokens = int(answer_token_mask(labels, shift=self.shift_labels).sum())
        return TaskLoss(term, {"answer_ce": term}, {"answer_tokens": float(tokens)})

    def distill_view(self, outputs: Any, batch: Mapping[str, Any] | None = None) -> DistillView:
        logits = logits_of(outputs)
        mask = None
        if batch is not None:
            if self.distill_all_tokens and "attention_mask" in batch:
                mask = batch["attention_mask"].bool()
            elif not self.distill_all_tokens and "labels" in batch:
                mask = answer_token_mask(batch["labels"], shift=self.shift_labels)
        return {
            "distributions": {"answer_tokens": {"logits": logits, "mask": mask}},
            "regressions": {},
        }

    def predict(self, outputs: Any) -> list[str]:
        """``outputs``: the decoded answer strings of a batch, returned as a list."""
        if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs):
            raise TypeError(
                "VQA predictions are the generated answer strings (one per question); decode "
                "the model's generated tokens first (the model adapter does this)"
            )
        return list(outputs)

    def metric(self) -> VQAAccuracy:
        return VQAAccuracy()
