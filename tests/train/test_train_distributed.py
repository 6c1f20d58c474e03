"""Two CPU processes (gloo, through accelerate's DDP) match one process with the same global batch,
and a distributed run killed and resumed matches the uninterrupted distributed run exactly."""

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from distiq.train import read_metrics, train

HERE = Path(__file__).parent
WORKER = HERE / "dist_worker_train.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_worker():
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location("distiq_train_dist_worker", WORKER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HERE))
    return module


def _launch(
    out: Path, world_size: int = 2, args: tuple[str, ...] = (), env: dict | None = None
) -> None:
    """Start ``world_size`` workers the way a launcher does (torchrun/accelerate set these
    variables); if one fails, stop the others at once instead of leaving them waiting."""
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        worker_env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        with open(out / f"rank{rank}.log", "w") as log:
            command = [sys.executable, str(WORKER), str(out), *args]
            procs.append(
                subprocess.Popen(command, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
            )
    deadline = time.monotonic() + 100
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [
        f"rank {rank} exited with {proc.returncode}:\n"
        + (out / f"rank{rank}.log").read_text()[-3000:]
        for rank, proc in enumerate(procs)
        if proc.returncode != 0
    ]
    if failed:
        pytest.fail("\n".join(failed))


@pytest.fixture
def private_dir():
    """A temporary folder of our own: on a shared machine, other pytest sessions prune the
    shared tmp_path base while these slower tests run."""
    with tempfile.TemporaryDirectory(prefix="distiq-train-dist-") as name:
        yield Path(name)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(private_dir):
    tmp_path = private_dir
    _launch(tmp_path)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["world_size"] == 2

    # Killed at step 3 on both processes, resumed from the step-2 checkpoint: bit-identical.
    for key, value in result["a"].items():
        assert torch.equal(result["b"][key], value), key

    # One process, same config (batch_size is the global batch): equal up to float rounding.
    # The gradients differ only in summation order (mean of two 4-sample means vs one 8-sample
    # mean), ~1e-7 relative; 6 AdamW steps keep it at ~1 ulp (6e-8 measured) under atol=1e-6 + rtol=1e-5.
    worker = _load_worker()
    train_set, val_set = worker.data()
    single = worker.toys.make_model(seed=3)
    seen: list[list[int]] = []
    single_result = train(
        single,
        worker.recording(worker.toys.plain_step, seen),
        train_set,
        config=worker.config(),
        run_dir=tmp_path / "single",
        eval_fn=worker.toys.make_eval(val_set),
    )
    # Each process got its half of every global micro-batch: rank 0 the first 4 samples of the
    # one-process batch, rank 1 the last 4.
    rank0, rank1 = result["seen"]
    assert len(rank0) == len(seen) == 12 and all(len(ids) == 4 for ids in rank0 + rank1)
    assert [a + b for a, b in zip(rank0, rank1)] == seen
    for key, value in single.state_dict().items():  # measured: max |diff| 6e-8
        torch.testing.assert_close(result["a"][key], value, rtol=1e-5, atol=1e-6)
    assert result["eval"]["accuracy"] == single_result.eval_metrics["accuracy"]
    assert result["eval"]["loss"] == pytest.approx(single_result.eval_metrics["loss"], rel=1e-5)

    # The logged losses are averaged over processes: they match the one-process log.
    multi_lines = read_metrics(tmp_path / "a" / "metrics.jsonl", "train")
    single_lines = read_metrics(tmp_path / "single" / "metrics.jsonl", "train")
    assert [line["step"] for line in multi_lines] == [line["step"] for line in single_lines]
    for multi, one in zip(multi_lines, single_lines):
        assert multi["total"] == pytest.approx(one["total"], rel=1e-5)
        assert multi["terms"] == pytest.approx(one["terms"], rel=1e-5)
    # Only the main process wrote files: one line per logged step, no duplicates.
    assert len(multi_lines) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("fsdp_version", ["1", "2"])
def test_fsdp_on_one_gpu_resumes_exactly_and_matches_a_plain_run(private_dir, fsdp_version):
    """FSDP (from accelerate's launch settings) on one GPU: full state dicts in checkpoints,
    exact resume, and the same result as a plain single-GPU run up to rounding."""
    tmp_path = private_dir
    # FSDP1 needs use_orig_params (accelerate's default is off) for per-parameter groups.
    fsdp_env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": fsdp_version,
        **({"FSDP_USE_ORIG_PARAMS": "true"} if fsdp_version == "1" else {}),
    }
    _launch(tmp_path, world_size=1, args=("cuda", "ce"), env=fsdp_env)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert "FSDP" in result["distributed_type"]
    for key, value in result["a"].items():
        assert torch.equal(result["b"][key], value), key
    worker = _load_worker()
    train_set, val_set = worker.data()
    plain = worker.toys.make_model(seed=3)
    train(
        plain,
        worker.ce_step,
        train_set,
        config=worker.config("cuda"),
        run_dir=tmp_path / "plain",
        eval_fn=worker.toys.make_eval(val_set),
    )
    assert set(result["a"]) == set(plain.state_dict())
    diffs = {
        k: float((result["a"][k] - v.cpu()).abs().max()) for k, v in plain.state_dict().items()
    }
    print(f"FSDP{fsdp_version} vs plain, max |diff| per tensor: {diffs}")
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(result["a"][key], value.cpu(), rtol=1e-4, atol=1e-5)


def test_launcher_variables_are_read_or_refused(monkeypatch):
    """RANK / WORLD_SIZE: defaults when unset; a value that is no integer is an error (every
    process believing it is rank 0 would let them all empty one run directory)."""
    from distiq.train.distributed import launched_rank, launched_world_size

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (launched_rank(), launched_world_size()) == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (launched_rank(), launched_world_size()) == (1, 2)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        launched_rank()
