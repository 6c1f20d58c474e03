"""Atomic checkpoint files (a full disk reported as such, temporaries of killed writes cleaned),
RNG state round trips, the metrics JSONL writer."""

import errno
import io
import json
import os
import random

import numpy as np
import pytest
import torch

from distiq.config import is_atomic_temp
from distiq.train import MetricsWriter, TrainConfig, load_checkpoint, read_metrics, train
from distiq.train.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    capture_rng_state,
    remove_stale_temporaries,
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


class FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes beyond it fail as the kernel's do."""

    def __init__(self, fd: int, room: int) -> None:
        self.fd, self.room = fd, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return os.write(self.fd, data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


@pytest.mark.parametrize("room", [0, 100, 60_000])  # fails in torch.save's first write, in its
# zip records (torch wraps the OSError in a RuntimeError), or only at the final flush
def test_a_full_disk_is_reported_clearly_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, room
):
    path = tmp_path / "checkpoints" / "last.pt"
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: io.BufferedWriter(FullDisk(fd, room)))
    with pytest.raises(OSError) as info:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": 2, "w": torch.randn(40_000)}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (
        f"[Errno {errno.ENOSPC}] no space left on device while writing {path}; the previous "
        "checkpoint is intact; free space and resume with --resume (resume=True in Python)"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__  # not buried
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_a_full_disk_stops_training_and_the_run_resumes_after(toys, tmp_path, monkeypatch):
    config = TrainConfig(steps=6, batch_size=8, checkpoint_every=2, seed=3, device="cpu")
    real_save, disk = torch.save, {"full": False}

    def save(obj, fh):  # the disk fills up while the step-4 checkpoint is written
        if disk["full"]:
            fh.write(b"PK\x03\x04 part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, fh)

    def on_step(info):
        disk["full"] = info.step == 3

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(
        OSError,
        match=r"no space left on device while writing .*last\.pt; the "
        r"previous checkpoint is intact; free space and resume with --resume",
    ):
        train(
            toys.make_model(), toys.plain_step, toys.ToyData(32), config=config,
            run_dir=tmp_path / "run", on_step=on_step,
        )  # fmt: skip
    monkeypatch.undo()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["last.pt"]
    assert load_checkpoint(folder / "last.pt")["step"] == 2
    resumed = toys.make_model(seed=5)
    train(resumed, toys.plain_step, toys.ToyData(32), config=config, run_dir=tmp_path / "run",
          resume=True)  # fmt: skip
    reference = toys.make_model()
    train(reference, toys.plain_step, toys.ToyData(32), config=config, run_dir=tmp_path / "ref")
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_temporaries_are_named_as_distiq_recognises_them(tmp_path, monkeypatch):
    names = []

    def torn_save(obj, fh):
        names.extend(path.name for path in tmp_path.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 1}, tmp_path / "last.pt")
    assert len(names) == 1 and names[0].startswith(".last.pt.") and is_atomic_temp(names[0])


def test_only_distiq_temporaries_of_the_checkpoints_folder_are_removed(toys, tmp_path):
    """A run killed while writing its first checkpoint leaves only a temporary file: the next
    start (fresh, no --overwrite needed) removes it, and nothing that is not distiq's."""
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    stale = [folder / ".last.pt.k2j4_x9.tmp", folder / ".best.pt.abc.tmp"]
    kept = [
        folder / "notes.tmp",  # not hidden: not an atomic write's name
        folder / ".last.pt.partial",
        run / ".recipe.yaml.q1w2.tmp",  # outside the checkpoints folder
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    (folder / ".a-folder.tmp").mkdir()
    train(
        toys.make_model(),
        toys.plain_step,
        toys.ToyData(16),
        config=TrainConfig(steps=2, batch_size=8, device="cpu"),
        run_dir=run,
    )
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept) and (folder / ".a-folder.tmp").is_dir()
    assert remove_stale_temporaries(tmp_path / "missing") == []


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
