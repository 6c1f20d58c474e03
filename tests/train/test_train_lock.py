"""One writer per run directory: a second process is refused with a clear message (in RunLock and
in train(), for --overwrite and --resume alike), a killed holder never blocks, forked children
share their parent's lock, nested locks are re-entrant, only launcher rank 0 locks, and the ranks
of a data-parallel run fail together when the directory is in use.

Run as a script, this file is the holder / worker process of those tests:
    test_train_lock.py hold RUN_DIR            hold RunLock(RUN_DIR) until killed
    test_train_lock.py train RUN_DIR MARKER    a slow real training run; MARKER appears at step 6
    test_train_lock.py rank RUN_DIR            one rank of a data-parallel run (launcher variables)
"""

import fcntl
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _start(*args, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *map(str, args)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(condition, process=None, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the helper process ended early:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the helper process")
        time.sleep(0.05)


def _locked_elsewhere(run_dir: Path) -> bool:
    """Whether some open file other than a new one of ours holds the lock (flock locks belong to
    open files, so this probe conflicts with a lock held by this very process too)."""
    from distiq.train.lock import LOCK_FILE

    path = run_dir / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_second_process_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    from distiq.train.lock import LOCK_FILE, RunDirectoryInUse, RunLock

    run = tmp_path / "run"
    holder = _start("hold", run)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryInUse) as info:
            RunLock(run).acquire()
        message = str(info.value)
        assert message.startswith(f"{run} is in use by another distiq process (pid {holder.pid}, ")
        assert "started at 20" in message and message.endswith(
            "wait for it or choose another output"
        )
        assert info.value.holder_pid == holder.pid
        holder.send_signal(signal.SIGKILL)  # kill -9: no chance to clean up
        holder.wait()
        assert (run / LOCK_FILE).exists()  # the dead holder's file stays; its lock does not
        with RunLock(run) as lock:
            assert lock.held
            assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not (run / LOCK_FILE).exists()  # removed on release
    finally:
        _stop(holder)


@pytest.mark.slow
def test_train_refuses_overwrite_and_resume_of_a_run_being_written(toys, tmp_path):
    from distiq.train import TrainConfig, read_metrics, train
    from distiq.train.lock import RunDirectoryInUse

    run, marker = tmp_path / "run", tmp_path / "step6"
    holder = _start("train", run, marker)
    config = TrainConfig(steps=30, batch_size=8, checkpoint_every=5, log_every=1, device="cpu")
    try:
        _wait_for(marker.exists, holder)
        for options in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(RunDirectoryInUse, match=f"pid {holder.pid}"):
                train(
                    toys.make_model(),
                    toys.plain_step,
                    toys.ToyData(16),
                    config=config,
                    run_dir=run,
                    **options,
                )
        assert holder.wait(timeout=120) == 0, holder.stdout.read()
    finally:
        _stop(holder)
    # the holder's run went on undisturbed: every step logged once, its last checkpoint final
    steps = [line["step"] for line in read_metrics(run / "metrics.jsonl", "train")]
    assert steps == list(range(1, 31))
    result = train(
        toys.make_model(),
        toys.plain_step,
        toys.ToyData(16),
        config=config,
        run_dir=run,
        resume=True,
    )
    assert result.step == 30  # free again once the holder finished


def test_forked_children_share_the_lock_and_never_release_it(tmp_path):
    from distiq.train.lock import RunLock, holds_lock

    run = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child():
        with RunLock(run) as first, RunLock(run) as second:
            results.put((first.held, second.held, holds_lock(run)))

    with RunLock(run):
        for _ in range(2):
            process = context.Process(target=child)
            process.start()
            process.join(timeout=60)
            assert process.exitcode == 0
            assert results.get(timeout=5) == (True, True, True)
        assert _locked_elsewhere(run)  # the children's releases left the parent's lock alone
    assert not _locked_elsewhere(run)


def test_nested_locks_are_reentrant_and_only_rank_zero_locks(tmp_path, monkeypatch):
    from distiq.train.lock import LOCK_FILE, RunDirectoryInUse, RunLock

    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        RunLock(tmp_path / "a-file").acquire()
    run = tmp_path / "run"
    with RunLock(run):
        with RunLock(run) as inner:
            assert inner.held
        assert _locked_elsewhere(run)
    assert not _locked_elsewhere(run) and not (run / LOCK_FILE).exists()

    other = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # "another process" holds it
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setenv("RANK", "1")
        with RunLock(run) as lock:  # a data-parallel rank other than 0 does not lock
            assert not lock.held
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunDirectoryInUse, match="pid unknown"):
            RunLock(run).acquire()
    finally:
        os.close(other)


def test_replace_with_empty_dir_keeps_the_lock(tmp_path):
    from distiq.train.lock import LOCK_FILE, RunLock, holds_lock, replace_with_empty_dir

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="does not hold its RunLock"):
        replace_with_empty_dir(tmp_path)
    assert not holds_lock(run)
    with RunLock(run):
        assert holds_lock(run)
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.pt").write_bytes(b"old run")
        (run / "metrics.jsonl").write_text("{}\n")
        replace_with_empty_dir(run)
        assert [p.name for p in run.iterdir()] == [LOCK_FILE]
        assert _locked_elsewhere(run)  # never unlocked on the way
        assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left aside
        assert holds_lock(run)
    assert list(run.iterdir()) == [] and not holds_lock(run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_ranks_fail_together_on_a_directory_in_use(tmp_path):
    from distiq.train.lock import RunLock

    run, port = tmp_path / "run", str(_free_port())
    with RunLock(run):
        ranks = [
            _start(
                "rank",
                run,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
            )
            for rank in range(2)
        ]
        try:
            outputs = [process.communicate(timeout=100)[0] for process in ranks]
        finally:
            for process in ranks:
                _stop(process)
    assert [process.returncode for process in ranks] == [3, 3], outputs
    assert f"RunDirectoryInUse: {run} is in use by another distiq process" in outputs[0]
    assert "RuntimeError: the main process of this run could not lock" in outputs[1]
    assert not (run / "metrics.jsonl").exists()


def _main(mode: str, run_dir: str, *rest: str) -> None:
    sys.path.insert(0, str(HERE))
    if mode == "hold":
        from distiq.train.lock import RunLock

        with RunLock(run_dir):
            print("locked", flush=True)
            time.sleep(600)
        return
    import train_toys as toys

    from distiq.train import TrainConfig, train

    if mode == "train":
        marker = Path(rest[0])

        def slow_step(model, batch, step):
            time.sleep(0.05)
            return toys.plain_step(model, batch, step)

        config = TrainConfig(steps=30, batch_size=8, checkpoint_every=5, log_every=1, device="cpu")
        train(
            toys.make_model(),
            slow_step,
            toys.ToyData(16),
            config=config,
            run_dir=run_dir,
            on_step=lambda info: info.step == 6 and marker.touch(),
        )
        return
    config = TrainConfig(steps=2, batch_size=8, device="cpu", distributed="accelerate")
    try:
        train(toys.make_model(), toys.plain_step, toys.ToyData(16), config=config, run_dir=run_dir)
    except Exception as exc:  # the test reads which error each rank gave
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    _main(*sys.argv[1:])
