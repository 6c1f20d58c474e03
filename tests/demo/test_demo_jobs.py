"""``distiq.demo.jobs.run_distributed``: one job as forked data-parallel processes that find
each other the way the training loop's accelerate path does (launcher variables, gloo), and a
failing process stops the run with its own error instead of leaving the others waiting."""

import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from distiq.demo.jobs import Job, data_parallel_size, run_distributed

needs_fork = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork"
)


def test_data_parallel_size():
    assert data_parallel_size(32, 1) == 1
    assert data_parallel_size(32, 2) == 2
    assert data_parallel_size(32, 3) == 2  # 32 does not split in 3
    assert data_parallel_size(32, 16) == 4  # at least 8 items per process
    assert data_parallel_size(12, 2) == 1  # 6 per process is too few
    assert data_parallel_size(12, 2, min_per_process=4) == 2


def _all_reduce_job(recipe, *, overwrite, resume, on_step, on_eval, data=None):
    """What the loop does: join the process group from the launcher's variables, all-reduce."""
    import torch.distributed as dist

    from distiq.train.config import TrainConfig
    from distiq.train.distributed import setup_distributed

    ctx = setup_distributed(TrainConfig(steps=1, batch_size=2))
    value = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(value)
    if recipe["fail_rank"] == ctx.rank:
        raise ValueError(f"rank {ctx.rank} failed on purpose")
    if recipe["fail_rank"] is not None:
        dist.all_reduce(value)  # the healthy process waits here for the failed one
    if ctx.rank == 0:
        on_step(type("Info", (), {"step": 1, "steps": 1, "total": value.item()})())
        record = {"world": ctx.world_size, "sum": value.item(), "threads": torch.get_num_threads()}
        Path(recipe["out"]).write_text(json.dumps(record))


@needs_fork
def test_run_distributed_joins_one_process_group(tmp_path):
    out = tmp_path / "result.json"
    recipe = {"out": str(out), "fail_rank": None}
    seconds = run_distributed(Job("toy", _all_reduce_job, recipe, "run"), world_size=2)
    assert json.loads(out.read_text()) == {"world": 2, "sum": 3.0, "threads": 1}
    assert seconds > 0


@needs_fork
def test_run_distributed_raises_the_failing_process_error(tmp_path):
    recipe = {"out": str(tmp_path / "never.json"), "fail_rank": 1}
    with pytest.raises(ValueError, match="rank 1 failed on purpose"):
        run_distributed(Job("toy", _all_reduce_job, recipe, "run"), world_size=2)
    assert not (tmp_path / "never.json").exists()


def _overwrite_job(recipe, *, overwrite, resume, on_step, on_eval, data=None):
    """Every rank prepares the same run directory with overwrite, as ``compress`` does."""
    import torch.distributed as dist

    from distiq.train.config import TrainConfig
    from distiq.train.distributed import setup_distributed
    from distiq.train.runs import prepare_run_dir

    run_dir = Path(recipe["run_dir"])
    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    ctx = setup_distributed(TrainConfig(steps=1, batch_size=2))
    dist.barrier()
    if ctx.rank == 0:
        left = sorted(p.name for p in run_dir.parent.iterdir())
        Path(recipe["out"]).write_text(
            json.dumps({"left": left, "inside": list(run_dir.iterdir())})
        )


@needs_fork
def test_run_distributed_overwrites_a_run_directory_once(tmp_path):
    """Both ranks used to empty the directory at once, and one failed on a file the other had
    just deleted ("No such file or directory: …/checkpoints")."""
    run_dir = tmp_path / "runs" / "teacher"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("method: teacher\n")
    for i in range(300):
        (run_dir / "checkpoints" / f"step-{i}.pt").write_bytes(b"x" * 64)
    out = tmp_path / "result.json"
    recipe = {"run_dir": str(run_dir), "out": str(out)}
    run_distributed(Job("teacher", _overwrite_job, recipe, "run"), world_size=2)
    assert json.loads(out.read_text()) == {"left": ["teacher"], "inside": []}


def test_only_the_launchers_rank_0_empties_a_run_directory(tmp_path, monkeypatch):
    from distiq.train.runs import prepare_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("method: rtn\n")
    monkeypatch.setenv("RANK", "1")
    prepare_run_dir(run_dir, overwrite=True, resume=False)
    assert (run_dir / "recipe.yaml").is_file()  # rank 1 checks, rank 0 deletes
    monkeypatch.setenv("RANK", "0")
    prepare_run_dir(run_dir, overwrite=True, resume=False)
    assert list(run_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_other_ranks_see_rank_0s_fresh_recipe_as_an_empty_directory(tmp_path, monkeypatch):
    # rank 0 checks a fresh directory and writes recipe.yaml (through a temporary file) at once;
    # a slower rank 1 then finds that file or the recipe, and must not call the run a stranger's
    from distiq.train.runs import prepare_run_dir

    run_dir = tmp_path / "teacher"
    run_dir.mkdir()
    (run_dir / ".recipe.yaml.k2j9.tmp").write_text("method: te")
    for rank in ("0", "1"):  # a file being written is nobody's run
        monkeypatch.setenv("RANK", rank)
        prepare_run_dir(run_dir, overwrite=False, resume=False)
    (run_dir / ".recipe.yaml.k2j9.tmp").rename(run_dir / "recipe.yaml")
    monkeypatch.setenv("RANK", "1")
    prepare_run_dir(run_dir, overwrite=False, resume=False)
    prepare_run_dir(run_dir, overwrite=True, resume=False)
    assert (run_dir / "recipe.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.pt"):
        prepare_run_dir(run_dir, overwrite=False, resume=True)
    (run_dir / "notes.txt").write_text("someone's")
    for rank in ("0", "1"):  # every rank refuses more than a recipe
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(FileExistsError, match="already holds a run"):
            prepare_run_dir(run_dir, overwrite=False, resume=False)


def _write_job(recipe, *, overwrite, resume, on_step, on_eval, data=None):
    Path(recipe).write_text(f"{data} overwrite={overwrite}")


@needs_fork
def test_run_jobs_returns_what_after_returned(tmp_path):
    # ``after`` runs in the worker once compress is done; a job of ``after`` alone has no time
    import os

    from distiq.demo.jobs import run_jobs

    def after(name):
        return lambda: (name, (tmp_path / "run.txt").read_text(), os.getpid())

    jobs = [
        Job("run", _write_job, str(tmp_path / "run.txt"), "run", data="shared", after=after("a")),
        Job("extra", None, None, "run", after=lambda: "only after"),
    ]
    seconds, outputs = run_jobs(jobs, workers=2)
    assert set(seconds) == {"run"} and seconds["run"] >= 0
    assert outputs["extra"] == "only after"
    name, written, pid = outputs["run"]
    assert (name, written) == ("a", "shared overwrite=True") and pid != os.getpid()


def test_run_distributed_takes_compress_alone(tmp_path):
    with pytest.raises(ValueError, match="compress alone"):
        run_distributed(Job("toy", _write_job, "x", "run", after=lambda: None), world_size=2)
    with pytest.raises(ValueError, match="compress alone"):
        run_distributed(Job("toy", None, None, "run"), world_size=2)
