"""One writer per run directory: an exclusive advisory lock held for the whole run.

``with RunLock(run_dir): ...`` takes ``fcntl.flock`` on ``run_dir/.distiq.lock`` without
waiting: a second distiq process on the same directory (``--overwrite`` into a run being
written, two ``--resume`` of one run) gets :class:`RunDirectoryInUse` at once, naming the
process that holds it, before it deletes or writes anything. The operating system releases a
``flock`` when its process dies, even by ``kill -9``: a dead run never blocks the next one. The
lock file records the holder (pid, start time, host) for that message and is removed when the
lock is released (a process that opened it just before checks, after locking, that the path
still names the file it locked, so removal cannot let two processes in).

Data-parallel runs and worker processes:

- Every process a launcher starts (``torchrun``, ``accelerate launch``: ``RANK`` is set) may
  create a ``RunLock``; only rank 0 locks, the others are no-ops (``enabled`` defaults to
  ``RANK == 0``), so the ranks of one run never lock each other out. The training loop tells all
  ranks when rank 0 could not lock, so they fail together.
- A process that holds the lock and then **forks** workers (the demo does) lets them in: a
  forked child inherits the locked file descriptor, and a ``RunLock`` on the same directory in
  the child shares it instead of locking again. Take the lock once in the launching process
  before forking, e.g. ``with RunLock(out): run_distributed(...)``; a child never unlocks its
  parent's lock. A process started with ``subprocess`` / ``spawn`` inherits nothing and is
  locked out like any other process.
- Nested ``RunLock``s on one directory in one process are re-entrant (``compress`` holds the
  lock and the training loop takes it again); the lock belongs to the process, so its threads
  share it.

Without ``fcntl`` (Windows) or on a file system that refuses ``flock``, the run goes on
unlocked with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from distiq.train.distributed import DistContext, launched_rank

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_FILE = ".distiq.lock"


class RunDirectoryInUse(RuntimeError):
    """Another distiq process holds the run directory's lock. ``holder_pid`` is its pid when
    known."""

    def __init__(self, message: str, *, run_dir: Path, holder_pid: int | None) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.holder_pid = holder_pid


@dataclass
class _Held:
    """A lock this process holds (``owner_pid`` is this pid) or inherited through ``fork``."""

    fd: int
    owner_pid: int
    depth: int = 1


# realpath of the lock file -> the lock held on it; forked children get a copy of this table
# (with the inherited descriptors), which is how they recognise their parent's lock.
_HELD: dict[str, _Held] = {}
_TABLE = threading.Lock()


class RunLock:
    """Exclusive, non-blocking lock on ``run_dir`` for as long as the context is open.

    Args:
        run_dir: the run directory (created if missing; the lock file lives inside it).
        enabled: whether this process locks; ``None``: only launcher rank 0 (``RANK``, 0 when
            not launched) does, so the ranks of one data-parallel run share the directory.

    Raises (on entering):
        RunDirectoryInUse: another process holds the lock (says which, and what to do).
        PermissionError / OSError: the directory or its lock file cannot be created.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.enabled = launched_rank() == 0 if enabled is None else bool(enabled)
        self._entry: _Held | None = None
        self._key = ""

    @property
    def held(self) -> bool:
        """Whether this object holds (or shares) the lock now."""
        return self._entry is not None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (a no-op when disabled, already held by this object, or unavailable on
        this platform). See the class doc for what it raises."""
        if not self.enabled or self._entry is not None:
            return
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"output {self.run_dir} exists and is not a directory")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise type(exc)(
                f"cannot create the run directory {self.run_dir}: {exc.strerror or exc}; choose "
                "a writable output"
            ) from None
        self._key = os.path.realpath(self.path)
        with _TABLE:
            entry = _HELD.get(self._key)
            if entry is not None and _still_held(entry, self.path):
                entry.depth += 1
                self._entry = entry
                return
            fd = self._lock_file()
            if fd is None:
                return
            self._entry = _HELD[self._key] = _Held(fd=fd, owner_pid=os.getpid())

    def release(self) -> None:
        """Give the lock back (the outermost release of the process that took it unlocks and
        removes the lock file; a forked child's release leaves its parent's lock alone)."""
        entry, self._entry = self._entry, None
        if entry is None:
            return
        with _TABLE:
            entry.depth -= 1
            if entry.depth > 0:
                return
            if _HELD.get(self._key) is entry:
                del _HELD[self._key]
            if entry.owner_pid == os.getpid():
                if _same_file(entry.fd, self.path):
                    self.path.unlink(missing_ok=True)  # before unlocking: see the module doc
                fcntl.flock(entry.fd, fcntl.LOCK_UN)
            os.close(entry.fd)

    def _lock_file(self) -> int | None:
        """Open, lock and check the lock file; its descriptor, or None when locking is not
        available here."""
        if fcntl is None:
            logger.warning(
                "cannot lock %s on this platform: make sure no other distiq process writes it",
                self.run_dir,
            )
            return None
        for _ in range(20):  # the file may be removed between open and flock: retry
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise type(exc)(
                    f"cannot create the lock file {self.path}: {exc.strerror or exc}; choose a "
                    "writable output"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._in_use() from None
                logger.warning(
                    "cannot lock %s (%s): make sure no other distiq process writes it",
                    self.run_dir,
                    exc.strerror or exc,
                )
                return None
            if _same_file(fd, self.path):
                _write_holder(fd)
                return fd
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        raise RuntimeError(f"could not lock {self.run_dir}: its lock file keeps changing")

    def _in_use(self) -> RunDirectoryInUse:
        pid, started, host = None, "an unknown time", ""
        try:
            info = json.loads(self.path.read_text() or "{}")
            pid = int(info["pid"])
            started = str(info.get("started", started))
            if info.get("host") and info["host"] != socket.gethostname():
                host = f" on {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # being written this instant, or not ours: report what is known
        who = f"pid {pid}" if pid is not None else "pid unknown"
        return RunDirectoryInUse(
            f"{self.run_dir} is in use by another distiq process ({who}{host}, started at "
            f"{started}); wait for it or choose another output",
            run_dir=self.run_dir,
            holder_pid=pid,
        )


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike, ctx: DistContext) -> Iterator[RunLock]:
    """:class:`RunLock` on ``run_dir`` for every process of a (data-parallel) run: the main
    process locks; when it cannot, every process raises (collectively, so none is left waiting
    for the others): the main one the lock's own error, the others a ``RuntimeError``."""
    lock = RunLock(run_dir, enabled=ctx.is_main)
    failure: Exception | None = None
    try:
        lock.acquire()
    except Exception as exc:
        failure = exc
    if ctx.any_true(failure is not None):
        if failure is not None:
            raise failure
        raise RuntimeError(f"the main process of this run could not lock {run_dir}: see its error")
    try:
        yield lock
    finally:
        lock.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _still_held(entry: _Held, path: Path) -> bool:
    """Whether ``entry`` (this process's, or one a fork copied from its parent) still locks the
    file at ``path``: the descriptor names that file and ``flock`` on it succeeds (which it
    does for the open file that holds the lock, and for no other)."""
    if fcntl is None or not _same_file(entry.fd, path):
        return False
    try:
        fcntl.flock(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    info = {"pid": os.getpid(), "started": started, "host": socket.gethostname()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def holds_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds ``run_dir``'s :class:`RunLock` now (taken here, or shared
    from the parent that forked it)."""
    path = Path(run_dir) / LOCK_FILE
    entry = _HELD.get(os.path.realpath(path))
    return entry is not None and _same_file(entry.fd, path)


def replace_with_empty_dir(run_dir: str | os.PathLike) -> None:
    """Empty ``run_dir`` (whose :class:`RunLock` this process holds) without ever letting the
    lock go: the lock file is hard-linked into a fresh sibling folder, the old folder is renamed
    aside, the new one renamed into place, and the old one deleted. Another process sees either
    the old directory whole or the new one holding only the (still locked) lock file.

    Raises:
        RuntimeError: this process does not hold ``run_dir``'s lock.
        RunDirectoryInUse: another process created ``run_dir`` anew in the moment it was away.
    """
    import shutil
    import tempfile

    run_dir = Path(run_dir)
    lock_path = run_dir / LOCK_FILE
    if not holds_lock(run_dir):
        raise RuntimeError(
            f"replace_with_empty_dir({run_dir}): this process does not hold its RunLock"
        )
    fresh = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.new-", dir=run_dir.parent))
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    try:
        os.chmod(fresh, 0o777 & ~_umask())
        os.link(lock_path, fresh / LOCK_FILE)
        run_dir.rename(aside)
        try:
            fresh.rename(run_dir)
        except OSError:  # another process made run_dir in the moment it was away
            try:
                aside.rename(run_dir)
                where = f"{run_dir} is as it was"
            except OSError:
                where = f"the old run was moved to {aside}"
            raise RunDirectoryInUse(
                f"another process started using {run_dir} while it was being emptied ({where}); "
                "wait for it or choose another output",
                run_dir=run_dir,
                holder_pid=None,
            ) from None
    finally:
        if fresh.exists():
            shutil.rmtree(fresh, ignore_errors=True)
    shutil.rmtree(aside)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
