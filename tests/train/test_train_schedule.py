"""LR schedules against a float64 reference written from the formulas, and scheduler state."""

import itertools
import math

import pytest
import torch

from distiq.train.schedule import LRSchedule, build_scheduler


def _reference(kind, k, total, warmup, floor):
    if k < warmup:
        return (k + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (k - warmup) / max(1, total - warmup))
    shape = (1 + math.cos(math.pi * p)) / 2 if kind == "cosine" else 1 - p
    return floor + (1 - floor) * shape


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(
    ("total", "warmup", "floor"), [(20, 0, 0.0), (20, 5, 0.1), (7, 7, 0.0), (1, 0, 0.0)]
)
def test_schedule_matches_reference(kind, total, warmup, floor):
    schedule = LRSchedule(kind, total, warmup, floor)
    for k in range(total + 3):
        assert schedule(k) == pytest.approx(_reference(kind, k, total, warmup, floor), abs=1e-15)


def test_schedule_shape():
    cosine = LRSchedule("cosine", 100, 10, 0.05)
    values = [cosine(k) for k in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0 and values[10] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))  # non-increasing after warm-up
    assert min(values) > 0.05 and cosine(100) == pytest.approx(0.05)  # reaches the floor at the end


def test_scheduler_drives_every_param_group_and_round_trips():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(
        [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}], lr=0.1
    )
    scheduler = build_scheduler(optimizer, "linear", 10, warmup_steps=2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.25])
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    other_opt = torch.optim.AdamW(
        [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}], lr=0.1
    )
    other = build_scheduler(other_opt, "linear", 10, warmup_steps=2)
    other.load_state_dict(state)
    other_opt.load_state_dict(optimizer.state_dict())
    optimizer.step(), scheduler.step(), other_opt.step(), other.step()
    assert [g["lr"] for g in other_opt.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * (1 - 3 / 8))


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        LRSchedule("cosin", 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule("linear", 10, warmup_steps=11)
