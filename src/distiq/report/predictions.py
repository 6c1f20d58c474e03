"""Per-question scores of a run, from its ``predictions.jsonl``.

Every evaluated run (and the teacher) leaves ``predictions.jsonl`` next to its ``results.json``:
one JSON object per test question, ``{"question_id": ..., "prediction": "...", "score": s}``,
sorted by question id, ``s`` the question's score in [0, 1] (VQA accuracy: 0 or 1 on the
synthetic scenes, multiples of 0.1 on VQA v2). Two runs are compared question by question
(:mod:`distiq.report.compare`) on the question ids both answered.

A file is read strictly: a line that is not a JSON object, lacks ``question_id`` or ``score``,
has a score outside [0, 1] or repeats a question id is an error naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from distiq.config import ConfigError

PREDICTIONS_FILE = "predictions.jsonl"

QuestionId = int | str


@dataclass(frozen=True)
class QuestionScores:
    """One run's score on each question it answered: ``scores[question_id]`` in [0, 1]."""

    name: str
    path: Path
    scores: dict[QuestionId, float]

    @property
    def binary(self) -> bool:
        """Whether every score is 0 or 1 (correct or not)."""
        return all(s in (0.0, 1.0) for s in self.scores.values())

    @property
    def accuracy(self) -> float:
        """Mean score in percent (what the run's record reports as ``value``)."""
        return 100.0 * math.fsum(self.scores.values()) / len(self.scores)


def read_predictions(path: str | os.PathLike, name: str) -> QuestionScores:
    """Read ``path`` (a ``predictions.jsonl``) as the scores of record ``name``.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: a bad line (see the module docstring) or no question at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    scores: dict[QuestionId, float] = {}
    fix = "re-evaluate the run with `distiq eval RUN_DIR` to write the file again"
    with path.open(encoding="utf-8") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"line {number} is not valid JSON ({exc}); {fix}", str(path)
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(f"line {number} is not a JSON object; {fix}", str(path))
            qid, score = row.get("question_id"), row.get("score")
            if isinstance(qid, bool) or not isinstance(qid, int | str):
                raise ConfigError(
                    f"line {number}: question_id must be an integer or a string, got {qid!r} (a "
                    f"paired comparison needs each question's id); {fix}",
                    str(path),
                )
            if (
                isinstance(score, bool)
                or not isinstance(score, int | float)
                or not 0.0 <= score <= 1.0
            ):
                raise ConfigError(
                    f"line {number}: score must be a number in [0, 1], got {score!r}; {fix}",
                    str(path),
                )
            if qid in scores:
                raise ConfigError(
                    f"line {number}: question_id {qid!r} appears twice; {fix}", str(path)
                )
            scores[qid] = float(score)
    if not scores:
        raise ConfigError(f"no question in the file; {fix}", str(path))
    return QuestionScores(name=name, path=path, scores=scores)
