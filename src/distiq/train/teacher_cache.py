"""Teacher outputs cached on disk, so an expensive teacher runs once for many students.

For every sample (named by an id from the batch), the cache keeps the teacher's top-k
log-probabilities at temperature τ, ``log_softmax(logits / τ)`` over the *full* vocabulary
(descending, not renormalised over the k), and their class indices — exactly what
``distiq.distill.sparse.topk_kl_divergence`` consumes (the tail mass ``1 − Σ exp(top-k)`` stays
recoverable).

Layout of a cache folder::

    index.json                 format, top_k, temperature, dtype, vocab_size, fingerprint,
                               complete, shards: [{file, ids}]
    shard-00000.safetensors    "<j>.log_probs" (..., k) and "<j>.indices" (..., k) int32 for
    shard-00001.safetensors    the j-th id of that shard

Every shard is written to a temporary file and renamed into place, and ``index.json`` is rewritten
(atomically) after each shard, so a teacher run killed half-way keeps what it finished:
calling :func:`cache_teacher_outputs` again runs the teacher only on the samples still missing.
A complete cache with the same settings is returned without running the teacher at all.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from distiq.config import atomic_write
from distiq.train.checkpoint import default_file_mode
from distiq.util import suggest

logger = logging.getLogger(__name__)

CACHE_FORMAT = "distiq.teacher_cache/1"
INDEX_NAME = "index.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SampleId = int | str


def _normalise_id(value: Any) -> SampleId:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"sample ids must be integers or strings, got {value!r}")
    return value


def _batch_ids(batch: Any, ids: str | Callable[[Any], Sequence[Any]]) -> list[SampleId]:
    if callable(ids):
        raw = ids(batch)
    else:
        try:
            raw = batch[ids]
        except (KeyError, TypeError, IndexError):
            raise KeyError(
                f"the batch has no {ids!r} entry with the sample ids; pass ids='<key>' or "
                "ids=<function batch -> ids>"
            ) from None
    if isinstance(raw, torch.Tensor):
        raw = raw.reshape(-1).tolist()
    return [_normalise_id(v) for v in raw]


def _per_sample(output: Any, n: int) -> list[torch.Tensor]:
    """Split the teacher's output into ``n`` per-sample ``(..., V)`` logits tensors."""
    if isinstance(output, torch.Tensor):
        if output.ndim < 2 or output.shape[0] != n:
            raise ValueError(
                f"teacher_fn returned logits of shape {tuple(output.shape)}; expected (B={n}, ..., V)"
            )
        return list(output.unbind(0))
    if isinstance(output, list | tuple) and len(output) == n:
        return [torch.as_tensor(o) for o in output]
    raise TypeError(
        f"teacher_fn must return a (B, ..., V) tensor or a list of B per-sample (..., V) tensors "
        f"(B={n}); got {type(output).__name__}"
    )


def teacher_topk(
    logits: torch.Tensor, top_k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, indices)``, both ``(..., k)``: top-k of ``log_softmax(logits / τ)`` over the
    last dimension (float32, descending) and their int64 class indices."""
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must lie in [1, {logits.shape[-1]}] (the vocabulary), got {top_k}")
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.topk(top_k, dim=-1)


def _read_index(path: Path) -> dict[str, Any] | None:
    index_path = path / INDEX_NAME
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{index_path} is not a distiq teacher cache (format {index.get('format')!r})"
        )
    return index


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, default_file_mode())
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_teacher_outputs(
    teacher_fn: Callable[[Any], Any],
    batches: Iterable[Any],
    path: str | os.PathLike,
    *,
    top_k: int,
    ids: str | Callable[[Any], Sequence[Any]] = "ids",
    temperature: float = 1.0,
    dtype: str = "float32",
    samples_per_shard: int = 4096,
    fingerprint: str | None = None,
    overwrite: bool = False,
) -> TeacherCache:
    """Run ``teacher_fn`` over ``batches`` and store its top-k log-probabilities per sample.

    Args:
        teacher_fn: ``batch -> logits``, a ``(B, ..., V)`` tensor or a list of ``B`` per-sample
            ``(..., V)`` tensors (slice to the positions that matter, e.g. answer tokens, to keep
            the cache small). Called under ``torch.inference_mode()``.
        batches: iterable of batches (each holding the sample ids).
        path: cache folder (created).
        top_k: entries kept per position.
        ids: batch key of the sample ids (a list or 1-D tensor of ints/strings), or a function
            ``batch -> ids``. Ids must be unique.
        temperature: τ of the stored log-probabilities (the distillation temperature).
        dtype: storage dtype of the log-probabilities: ``float32``, ``float16`` or ``bfloat16``.
        samples_per_shard: samples per safetensors file.
        fingerprint: any string naming the teacher (e.g. a checkpoint hash); an existing cache
            with another fingerprint is refused.
        overwrite: discard an existing cache at ``path`` first.

    Returns:
        A :class:`TeacherCache` reading the folder.
    """
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported{suggest(dtype, list(DTYPES))}; use one of {', '.join(DTYPES)}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    settings = {
        "top_k": top_k,
        "temperature": float(temperature),
        "dtype": dtype,
        "fingerprint": fingerprint,
    }
    index = _read_index(path)
    if index is not None and overwrite:
        for shard in index["shards"]:
            (path / shard["file"]).unlink(missing_ok=True)
        (path / INDEX_NAME).unlink()
        index = None
    if index is not None:
        mismatched = {k: (index.get(k), v) for k, v in settings.items() if index.get(k) != v}
        if mismatched:
            diffs = "; ".join(f"{k}: cached {a!r}, asked {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(
                f"the teacher cache at {path} was made with other settings ({diffs}); pass overwrite=True to rebuild it or use another path"
            )
        if index["complete"]:
            logger.info(
                "teacher cache %s is complete (%d samples): the teacher is not run",
                path,
                sum(len(s["ids"]) for s in index["shards"]),
            )
            return TeacherCache(path)
    else:
        index = {
            "format": CACHE_FORMAT,
            **settings,
            "vocab_size": None,
            "complete": False,
            "shards": [],
        }

    done = {_normalise_id(i) for shard in index["shards"] for i in shard["ids"]}
    seen: set[SampleId] = set()
    pending: dict[str, torch.Tensor] = {}
    pending_ids: list[SampleId] = []

    def flush() -> None:
        if not pending_ids:
            return
        name = f"shard-{len(index['shards']):05d}.safetensors"
        _save_shard(pending, path / name)
        index["shards"].append({"file": name, "ids": list(pending_ids)})
        atomic_write(path / INDEX_NAME, json.dumps(index))
        pending.clear()
        pending_ids.clear()

    computed = 0
    for batch in batches:
        batch_ids = _batch_ids(batch, ids)
        for sample_id in batch_ids:
            if sample_id in seen:
                raise ValueError(f"sample id {sample_id!r} occurs twice; ids must be unique")
            seen.add(sample_id)
        todo = [i for i, sample_id in enumerate(batch_ids) if sample_id not in done]
        if not todo:
            continue
        with torch.inference_mode():
            logits = _per_sample(teacher_fn(batch), len(batch_ids))
            for i in todo:
                vocab = logits[i].shape[-1]
                if index["vocab_size"] is None:
                    index["vocab_size"] = int(vocab)
                elif vocab != index["vocab_size"]:
                    raise ValueError(
                        f"sample {batch_ids[i]!r} has a vocabulary of {vocab}, earlier samples {index['vocab_size']}"
                    )
                values, indices = teacher_topk(logits[i], top_k, temperature)
                j = len(pending_ids)
                pending[f"{j}.log_probs"] = values.to(DTYPES[dtype]).cpu().contiguous()
                pending[f"{j}.indices"] = indices.to(torch.int32).cpu().contiguous()
                pending_ids.append(batch_ids[i])
                done.add(batch_ids[i])
                computed += 1
                if len(pending_ids) >= samples_per_shard:
                    flush()
    flush()
    index["complete"] = True
    atomic_write(path / INDEX_NAME, json.dumps(index))
    logger.info("teacher cache %s: %d samples computed, %d in all", path, computed, len(done))
    return TeacherCache(path)


class TeacherCache:
    """Reads a folder written by :func:`cache_teacher_outputs`.

    Args:
        path: the cache folder.
        allow_incomplete: open a cache whose teacher run did not finish (default: refuse).
        max_shards_in_memory: loaded shards kept in memory (least recently used dropped).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        allow_incomplete: bool = False,
        max_shards_in_memory: int = 4,
    ) -> None:
        self.path = Path(path)
        index = _read_index(self.path)
        if index is None:
            raise FileNotFoundError(
                f"no teacher cache at {self.path} ({INDEX_NAME} missing); build it with cache_teacher_outputs"
            )
        n = sum(len(s["ids"]) for s in index["shards"])
        if not index["complete"] and not allow_incomplete:
            raise ValueError(
                f"the teacher cache at {self.path} is incomplete ({n} samples so far): run cache_teacher_outputs again to finish it"
            )
        self.index = index
        self._where: dict[SampleId, tuple[int, int]] = {}
        for s, shard in enumerate(index["shards"]):
            for j, sample_id in enumerate(shard["ids"]):
                self._where[_normalise_id(sample_id)] = (s, j)
        self._shards: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._max_shards = max(1, max_shards_in_memory)

    top_k = property(lambda self: int(self.index["top_k"]))
    temperature = property(lambda self: float(self.index["temperature"]))
    vocab_size = property(lambda self: self.index["vocab_size"])
    dtype = property(lambda self: self.index["dtype"])
    fingerprint = property(lambda self: self.index["fingerprint"])
    complete = property(lambda self: bool(self.index["complete"]))

    @property
    def ids(self) -> list[SampleId]:
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self._where

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        if s in self._shards:
            self._shards.move_to_end(s)
            return self._shards[s]
        from safetensors.torch import load_file

        tensors = load_file(self.path / self.index["shards"][s]["file"])
        self._shards[s] = tensors
        if len(self._shards) > self._max_shards:
            self._shards.popitem(last=False)
        return tensors

    def get(self, sample_id: SampleId) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs float32 (..., k), indices int64 (..., k))`` of one sample."""
        key = _normalise_id(sample_id)
        if key not in self._where:
            raise KeyError(f"sample {sample_id!r} is not in the teacher cache at {self.path}")
        s, j = self._where[key]
        shard = self._shard(s)
        return shard[f"{j}.log_probs"].float(), shard[f"{j}.indices"].long()

    __getitem__ = get

    def get_batch(self, ids: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``(B, ..., k)`` log-probabilities and indices for ``ids``, in that order (all
        samples must have the same shape; use :meth:`get` per sample otherwise)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        pairs = [self.get(i) for i in ids]
        shapes = {tuple(v.shape) for v, _ in pairs}
        if len(shapes) > 1:
            raise ValueError(
                f"cached samples have different shapes {sorted(shapes)}; read them one by one with get()"
            )
        return torch.stack([v for v, _ in pairs]), torch.stack([i for _, i in pairs])
