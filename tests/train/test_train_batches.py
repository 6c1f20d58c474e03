"""Resumable, seeded, shardable batch order; replayed ready-made batches; moving batches."""

from collections import namedtuple
from dataclasses import dataclass
from itertools import islice

import pytest
import torch
from torch.utils.data import TensorDataset

from distiq.train import ReplayBatches, ResumableBatches, move_to_device
from distiq.train.batches import as_batch_source


def _ids(batch):
    return batch[0].tolist()


def _dataset(n=10):
    return TensorDataset(torch.arange(n))


def test_epochs_are_permutations_seeded_by_seed_and_epoch():
    source = ResumableBatches(_dataset(), 3, seed=4)
    batches = [_ids(b) for b in islice(iter(source), 9)]  # 3 batches per epoch, 1 sample dropped
    epochs = [[i for batch in batches[k : k + 3] for i in batch] for k in (0, 3, 6)]
    for epoch in epochs:
        assert len(set(epoch)) == 9 and set(epoch) <= set(range(10))
    assert epochs[0] != epochs[1]  # a fresh permutation every epoch
    again = ResumableBatches(_dataset(), 3, seed=4)
    assert [_ids(b) for b in islice(iter(again), 9)] == batches  # deterministic
    other = ResumableBatches(_dataset(), 3, seed=5)
    assert [_ids(b) for b in islice(iter(other), 9)] != batches
    assert [_ids(b) for b in islice(iter(ResumableBatches(_dataset(), 3, shuffle=False)), 2)] == [
        [0, 1, 2],
        [3, 4, 5],
    ]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resuming_from_a_state_continues_the_same_stream(num_workers):
    full = [_ids(b) for b in islice(iter(ResumableBatches(_dataset(), 3, seed=1)), 10)]
    first = ResumableBatches(_dataset(), 3, seed=1, num_workers=num_workers)
    stream = iter(first)
    head = [_ids(next(stream)) for _ in range(4)]
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 1, "seed": 1}
    second = ResumableBatches(_dataset(), 3, seed=1, num_workers=num_workers)
    second.load_state_dict(state)
    tail = [_ids(b) for b in islice(iter(second), 6)]
    assert head + tail == full
    with pytest.raises(ValueError, match="same seed"):
        ResumableBatches(_dataset(), 3, seed=2).load_state_dict(state)


def test_processes_split_every_global_batch():
    whole = [_ids(b) for b in islice(iter(ResumableBatches(_dataset(12), 4, seed=3)), 6)]
    parts = [
        [
            _ids(b)
            for b in islice(
                iter(ResumableBatches(_dataset(12), 4, seed=3, rank=r, world_size=2)), 6
            )
        ]
        for r in range(2)
    ]
    assert [a + b for a, b in zip(*parts)] == whole
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        ResumableBatches(_dataset(12), 4, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableBatches(_dataset(3), 4)


def test_replayed_batches_cycle_and_resume_by_skipping():
    batches = [[i] for i in range(4)]
    source = ReplayBatches(batches)
    stream = iter(source)
    seen = [next(stream) for _ in range(6)]
    assert seen == [[0], [1], [2], [3], [0], [1]]
    resumed = ReplayBatches(batches)
    resumed.load_state_dict(source.state_dict())
    assert list(islice(iter(resumed), 3)) == [[2], [3], [0]]
    single_use = iter(ReplayBatches(iter(batches)))
    with pytest.raises(RuntimeError, match="single-use iterator"):
        list(islice(single_use, 5))


def test_as_batch_source_dispatch():
    data = _dataset()
    assert isinstance(
        as_batch_source(
            data,
            batch_size=2,
            seed=0,
            collate_fn=None,
            shuffle=True,
            rank=0,
            world_size=1,
            num_workers=0,
        ),
        ResumableBatches,
    )
    ready = ResumableBatches(data, 2)
    assert (
        as_batch_source(
            ready,
            batch_size=5,
            seed=9,
            collate_fn=None,
            shuffle=True,
            rank=0,
            world_size=1,
            num_workers=0,
        )
        is ready
    )
    assert isinstance(
        as_batch_source(
            [1, 2],
            batch_size=2,
            seed=0,
            collate_fn=None,
            shuffle=True,
            rank=0,
            world_size=1,
            num_workers=0,
        ),
        ReplayBatches,
    )
    with pytest.raises(ValueError, match="collate_fn applies to a dataset"):
        as_batch_source(
            [1, 2],
            batch_size=2,
            seed=0,
            collate_fn=list,
            shuffle=True,
            rank=0,
            world_size=1,
            num_workers=0,
        )
    with pytest.raises(TypeError, match="not supported"):
        as_batch_source(
            3,
            batch_size=2,
            seed=0,
            collate_fn=None,
            shuffle=True,
            rank=0,
            world_size=1,
            num_workers=0,
        )


def test_move_to_device_walks_nested_batches():
    Pair = namedtuple("Pair", "a b")

    @dataclass
    class Inputs:
        pixels: torch.Tensor
        name: str

    batch = {
        "x": torch.ones(2),
        "list": [torch.zeros(1), 3],
        "pair": Pair(torch.ones(1), "s"),
        "inputs": Inputs(torch.ones(1), "n"),
    }
    moved = move_to_device(batch, torch.device("meta"))
    assert (
        moved["x"].device.type == "meta"
        and moved["list"][0].device.type == "meta"
        and moved["list"][1] == 3
    )
    assert (
        isinstance(moved["pair"], Pair)
        and moved["pair"].a.device.type == "meta"
        and moved["pair"].b == "s"
    )
    assert isinstance(moved["inputs"], Inputs) and moved["inputs"].pixels.device.type == "meta"
