"""The teacher's side of a distillation step when it does not see the student's batch: a teacher
with other processing (another family or image processor, the same tokenizer), or a teacher run
once ahead from a cache of its outputs.

Both are compared with the student at the positions that predict answer tokens (the positions
the token-level terms count by default): position ``t`` of a row predicts ``labels[t + 1]``, so
the answer positions are those whose next label is not ``-100``. With the same tokenizer, a
question's answer tokens are the same for teacher and student, so the ``n`` answer positions of
a teacher row map one to one onto the ``n`` answer positions of the student row; whatever lies
elsewhere is never read by those terms and is left zero.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from distiq.models.inputs import IGNORE_INDEX

logger = logging.getLogger(__name__)


def answer_positions(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row of ``labels`` (Q, S), the positions ``t`` whose next label ``labels[t + 1]`` is
    an answer (or eos) token: the positions whose logits predict the answer."""
    following = labels[:, 1:] != IGNORE_INDEX  # (Q, S - 1)
    return [row.nonzero().flatten() for row in following]


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logits at its answer positions: Q tensors ``(n_q, V)``."""
    return [logits[q, positions] for q, positions in enumerate(answer_positions(labels))]


def _targets(labels: torch.Tensor) -> list[list[int]]:
    return [
        labels[q, positions + 1].tolist() for q, positions in enumerate(answer_positions(labels))
    ]


def place(
    rows: Sequence[torch.Tensor], labels: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Q per-row tensors ``(n_q, X)`` placed at the answer positions of ``labels`` (Q, S):
    ``(Q, S, X)``, zero elsewhere.

    Raises:
        ValueError: a row has another number of answer positions than ``labels`` has.
    """
    positions = answer_positions(labels)
    width = rows[0].shape[-1]
    out = torch.zeros((*labels.shape, width), dtype=dtype or rows[0].dtype, device=rows[0].device)
    for q, (row, where) in enumerate(zip(rows, positions)):
        if row.shape[0] != where.numel():
            raise ValueError(
                f"question {q}: the teacher predicts {row.shape[0]} answer tokens, the student "
                f"{where.numel()}; teacher and student must tokenize answers alike"
            )
        out[q, where.to(out.device)] = row.to(out.dtype)
    return out


def aligned_teacher_logits(
    teacher_logits: torch.Tensor, teacher_labels: torch.Tensor, student_labels: torch.Tensor
) -> torch.Tensor:
    """The teacher's answer-position logits laid out like the student's (Q, S_student, V).

    Raises:
        ValueError: the two tokenize some answer differently, or the vocabularies differ.
    """
    if _targets(teacher_labels) != _targets(student_labels.to(teacher_labels.device)):
        raise ValueError(
            "teacher and student tokenize the answers differently (another tokenizer or "
            "answer format); distillation compares them token by token"
        )
    return place(answer_logits(teacher_logits, teacher_labels), student_labels)


def processing_view(dataset: Any, adapter: Any) -> Any:
    """What ``GenericEngine.collate`` needs to batch ``dataset``'s questions for another
    model's ``adapter``."""
    return SimpleNamespace(questions=dataset.questions, adapter=adapter)


# ---------------------------------------------------------------------- cached teacher
def visited_images(dataset: Any, config: Any) -> list[int]:
    """The dataset indices a training run with ``config`` (TrainConfig) visits, in order
    (``steps * grad_accum`` batches of ``batch_size`` images in the seeded order of
    ``ResumableBatches``), each once."""
    from distiq.train.batches import ResumableBatches

    stream = ResumableBatches(dataset, config.batch_size, seed=config.seed)
    per_epoch = stream.batches_per_epoch
    seen: dict[int, None] = {}
    total = config.steps * config.grad_accum
    for epoch in range(-(-total // per_epoch)):
        order = stream.epoch_order(epoch).tolist()
        batches = min(per_epoch, total - epoch * per_epoch)
        seen.update(dict.fromkeys(order[: batches * config.batch_size]))
    return list(seen)


def teacher_fingerprint(teacher_dir: Path | None, question_ids: Sequence[int], extra: str) -> str:
    """A name for the teacher, the questions and the settings a cache was made with: the
    teacher directory's weight files (name, size, modification time), the question ids and
    ``extra``."""
    digest = hashlib.sha256()
    if teacher_dir is not None:
        for path in sorted(Path(teacher_dir).glob("*.safetensors")):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update(",".join(map(str, question_ids)).encode())
    digest.update(extra.encode())
    return digest.hexdigest()[:32]


def build_teacher_cache(
    teacher: Any,
    dataset: Any,
    indices: Sequence[int],
    path: Path,
    *,
    top_k: int,
    temperature: float,
    batch_images: int,
    fingerprint: str,
    collate: Any,
) -> Any:
    """Run ``teacher`` (an ``EngineModel``) over the images ``indices`` of ``dataset`` and keep
    each question's top-k answer-position log-probabilities (``distiq.train.TeacherCache``);
    an existing cache with the same fingerprint and settings is reused as it is.

    Args:
        collate: ``items -> batch`` for the teacher (its own processing).
    """
    from distiq.train.teacher_cache import TeacherCache, cache_teacher_outputs

    overwrite = False
    try:
        existing = TeacherCache(path)
        overwrite = existing.fingerprint != fingerprint or existing.top_k != top_k
        if overwrite:
            logger.info("teacher cache %s was made for another teacher or data: rebuilding", path)
    except (FileNotFoundError, ValueError):
        overwrite = (path / "index.json").exists()

    def batches():
        for start in range(0, len(indices), batch_images):
            yield collate([dataset[i] for i in indices[start : start + batch_images]])

    def teacher_fn(batch: dict) -> list[torch.Tensor]:
        out = teacher(batch, heads=False)
        return answer_logits(out.logits, out.labels)

    was_training = teacher.training
    teacher.eval()
    try:
        return cache_teacher_outputs(
            teacher_fn,
            batches(),
            path,
            top_k=top_k,
            ids="question_id",
            temperature=temperature,
            fingerprint=fingerprint,
            overwrite=overwrite,
        )
    finally:
        teacher.train(was_training)


def cached_topk(cache: Any, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher's ``(log_probs, indices)`` for the batch's questions, each
    ``(Q, S, k)`` at the student's answer positions (zero elsewhere)."""
    pairs = [cache.get(int(i)) for i in batch["question_id"].reshape(-1).tolist()]
    device = labels.device
    log_probs = place([p.to(device) for p, _ in pairs], labels, dtype=torch.float32)
    indices = place([i.to(device) for _, i in pairs], labels, dtype=torch.long)
    return log_probs, indices
