"""What the demo knows about its synthetic scenes: their vocabulary (the built-in VLM's words)
and the question-only ("blind") baseline its report shows beside the teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def scene_vocabulary(data: Any) -> list[str]:
    """The word list of a recipe's ``data`` (a ``DataConfig`` naming a scene set): the scene
    set's ``meta.json`` vocabulary, or the generator's default one."""
    if data.scenes is None:
        raise ValueError("the demo's vocabulary comes from a generated scene set (data.scenes)")
    meta = json.loads((Path(data.scenes) / "meta.json").read_text())
    if "vocabulary" in meta:
        return list(meta["vocabulary"])
    from distiq.data import vocabulary

    return vocabulary()


def blind_baseline(data: Any) -> dict[str, Any]:
    """``{"accuracy": %, "by_question_type": {type: %}}`` of the question-only oracle
    (``distiq.data.blind_baseline_accuracy``, fitted on the train split) on the evaluated test
    questions of ``data`` (an ``EngineData``)."""
    from distiq.data import blind_baseline_accuracy, blind_baseline_by_type

    test = data.test
    test_records = [test.questions[r] for rows in test.rows for r in rows]
    by_type = blind_baseline_by_type(data.train.questions, test_records)
    return {
        "accuracy": 100.0 * blind_baseline_accuracy(data.train.questions, test_records),
        "by_question_type": {k: 100.0 * v for k, v in by_type.items()},
    }
