"""Resumable batch streams: the data order of a run is a function of ``(seed, epoch, position)``.

:class:`ResumableBatches` draws, for every epoch, a permutation of a map-style dataset from a
``torch.Generator`` seeded by ``(seed, epoch)`` and walks it ``batch_size`` indices at a time
(the last incomplete batch is dropped, so every process always has the same number of batches).
Its state is ``{epoch, position}`` (batches consumed in the epoch), so a resumed run reads exactly
the batches an uninterrupted run would. With ``W`` processes, global batch ``b`` (``batch_size``
indices) is cut into ``W`` equal contiguous parts and process ``r`` takes part ``r``.

:class:`ReplayBatches` wraps any re-iterable of ready batches (a list, a DataLoader): its state is
the number of batches consumed, and resuming re-iterates and skips that many. That is exact only
if iterating is deterministic (a list, a DataLoader without shuffling or with a seeded generator
it re-seeds itself); prefer a dataset or :class:`ResumableBatches` for exact resumption.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

logger = logging.getLogger(__name__)


@runtime_checkable
class BatchSource(Protocol):
    """An endless iterable of batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s permutation: a fixed mix of the run seed and the epoch index."""
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63 - 1)


class ResumableBatches:
    """Endless, seeded, resumable batches of a map-style dataset (see the module doc).

    Args:
        dataset: anything with ``__len__`` and ``__getitem__`` (a ``torch.utils.data.Dataset``).
        batch_size: global batch size (indices per batch over all processes).
        seed: seed of the per-epoch permutations.
        collate_fn: turns a list of samples into a batch (default: torch's ``default_collate``).
        shuffle: permute every epoch; ``False`` walks the dataset in order.
        rank, world_size: this process's part of every global batch.
        num_workers: DataLoader workers that load and collate (0: in this process).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                f"ResumableBatches needs a map-style dataset (__len__ and __getitem__), "
                f"got {type(dataset).__name__}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} (global) is not divisible by the {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        if len(dataset) < batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size}; "
                "lower batch_size or add data"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate_fn = collate_fn or default_collate
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset indices of epoch ``epoch`` in visiting order, ``(N,)`` int64."""
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(len(self.dataset), generator=generator)

    def _epoch_index_lists(self, epoch: int, first: int) -> list[list[int]]:
        order = self.epoch_order(epoch)
        per_rank = self.batch_size // self.world_size
        lists = []
        for position in range(first, self.batches_per_epoch):
            start = position * self.batch_size + self.rank * per_rank
            lists.append(order[start : start + per_rank].tolist())
        return lists

    def __iter__(self) -> Iterator[Any]:
        while True:
            index_lists = self._epoch_index_lists(self.epoch, self.position)
            if self.num_workers > 0:
                loader = DataLoader(
                    self.dataset,
                    batch_sampler=index_lists,
                    collate_fn=self.collate_fn,
                    num_workers=self.num_workers,
                )
                batches: Iterable[Any] = loader
            else:
                batches = (self.collate_fn([self.dataset[i] for i in ix]) for ix in index_lists)
            for batch in batches:
                self.position += 1  # counted when handed out: the state is what was consumed
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"the checkpoint's data order used seed {state['seed']}, this run seed {self.seed}; "
                "resume with the same seed"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class ReplayBatches:
    """Endless batches from a re-iterable of ready batches; resumes by replaying (module doc)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.epoch = 0
        self.position = 0
        self._single_use = iter(batches) is batches

    def __iter__(self) -> Iterator[Any]:
        skip = self.position
        while True:
            produced = 0
            for batch in self.batches:
                if skip:
                    skip -= 1
                    continue
                self.position += 1
                produced += 1
                yield batch
            if self._single_use:
                raise RuntimeError(
                    f"the training data ran out after {self.position} batches of epoch "
                    f"{self.epoch}: it is a single-use iterator; pass a dataset, a list or a "
                    "DataLoader (re-iterable), or fewer steps"
                )
            if produced == 0 and skip == 0:
                raise RuntimeError("the training data yields no batches")
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.epoch or self.position:
            logger.info(
                "resuming ready-made batches by replay: skipping %d batches of epoch %d "
                "(exact only if iterating them is deterministic)",
                self.position,
                self.epoch,
            )


def as_batch_source(
    data: Any,
    *,
    batch_size: int,
    seed: int,
    collate_fn: Callable[[list[Any]], Any] | None,
    shuffle: bool,
    rank: int,
    world_size: int,
    num_workers: int,
) -> BatchSource:
    """Turn ``train(...)``'s training data into a :class:`BatchSource`:

    - a ``torch.utils.data.Dataset`` with ``__len__`` → :class:`ResumableBatches`;
    - an object with ``state_dict``/``load_state_dict`` and ``__iter__`` → used as it is;
    - any other iterable (a list of batches, a DataLoader) → :class:`ReplayBatches`.
    """
    if isinstance(data, BatchSource):
        return data
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return ResumableBatches(
            data,
            batch_size,
            seed=seed,
            collate_fn=collate_fn,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
        )
    if isinstance(data, Iterable):
        if collate_fn is not None:
            raise ValueError(
                "collate_fn applies to a dataset; the training data given is an iterable of "
                "ready batches (wrap samples in a torch.utils.data.Dataset to have them collated)"
            )
        return ReplayBatches(data)
    raise TypeError(
        f"training data of type {type(data).__name__} is not supported: pass a "
        "torch.utils.data.Dataset, a ResumableBatches, or an iterable of batches"
    )


_LEAVES = (str, bytes, int, float, bool, type(None))


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``: tensors, mappings, lists, tuples,
    named tuples, dataclasses; other values are returned unchanged."""
    if isinstance(batch, _LEAVES):  # first: a VQA batch of 16 images holds ~500 answers
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:  # a mapping type that cannot be built from a dict (defaultdict, ...)
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: move_to_device(getattr(batch, f.name), device)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch
