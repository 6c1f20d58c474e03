"""Atomic checkpoint files, RNG state round trips, the metrics JSONL writer."""

import json
import random

import numpy as np
import pytest
import torch

from distiq.train import MetricsWriter, load_checkpoint, read_metrics
from distiq.train.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    capture_rng_state,
    restore_rng_state,
)


def test_a_crash_while_saving_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, fh):  # writes half a file, then the process "dies"
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_foreign_files_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a distiq.train.checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(4), random.random(), np.random.standard_normal(3))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(4), random.random(), np.random.standard_normal(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])


def test_metrics_writer_appends_and_cuts_back_on_resume(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write(
                {"kind": "train", "step": step, "total": float(step), "terms": {"kd": float("nan")}}
            )
        writer.write({"kind": "eval", "step": 3, "metrics": {"acc": 1.0}})
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 3]
    assert lines[0]["terms"]["kd"] == "nan"  # strict JSON: non-finite floats become strings
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')  # a line torn by a crash
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4
    with MetricsWriter(tmp_path, resume_step=2) as writer:  # resumed from the step-2 checkpoint
        writer.write({"kind": "train", "step": 3, "total": 30.0})
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [(line["step"], line.get("total")) for line in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    for raw in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(raw)  # every line is valid JSON again
    silent = MetricsWriter(tmp_path / "other", enabled=False)
    silent.write({"kind": "train", "step": 1})
    assert not (tmp_path / "other").exists()


def test_tensorboard_is_optional(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install 'distiq\\[tensorboard\\]'"):
            MetricsWriter(tmp_path, tensorboard=True)
        return
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        writer.write({"kind": "train", "step": 1, "total": 1.0, "terms": {"kd": 0.5}})
    assert any((tmp_path / "tensorboard").iterdir())
