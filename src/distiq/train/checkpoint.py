"""Atomic, resumable checkpoints and RNG state.

A run directory holds ``checkpoints/last.pt`` (everything needed to continue: model, optimizer,
LR scheduler, step, data position, RNG states of every process, best-so-far, logging window,
extra ``stateful`` objects) and, with a ``best_metric``, ``checkpoints/best.pt`` (the model
weights and the validation metrics of the best evaluation). Both are written to a temporary file
in the same folder, flushed to disk, then renamed over the old one (``os.replace``), so a crash
at any moment leaves either the old or the new checkpoint, never half of one.

A write killed half-way (``kill -9``, power loss) leaves its temporary file
(``.last.pt.<random>.tmp``, the pattern :func:`distiq.config.is_atomic_temp` recognises):
:func:`remove_stale_temporaries` deletes them when the next run starts. A full disk while
writing is reported as such (:func:`atomic_torch_save`), with the previous checkpoint intact.

:class:`CheckpointTimer` tells the loop when ``checkpoint_minutes`` of wall time have passed, so
that a long run loses at most that much work.

Checkpoints hold only tensors and plain Python values (RNG states are converted), so they load
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import tempfile
from pathlib import Path
from time import monotonic
from typing import Any

import numpy as np
import torch
from torch import nn

from distiq.config import is_atomic_temp
from distiq.util import option_hint

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "distiq.train.checkpoint/1"
BEST_FORMAT = "distiq.train.best/1"


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give a new file
    (``tempfile.mkstemp`` makes private ``0o600`` files, which is not wanted for results)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    Raises:
        OSError: with ``errno`` ``ENOSPC`` (or ``EDQUOT``) when the disk (or quota) is full:
            the message names the file and says that the previous one is intact (the temporary
            file is removed). Other errors propagate unchanged, the temporary file removed too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.is_file()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, default_file_mode())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = _disk_full_errno(exc)
        if full is None:
            raise
        raise OSError(full, _disk_full_message(full, path, existed)) from None
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


_FULL = tuple(c for c in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if c is not None)


def _disk_full_errno(exc: BaseException) -> int | None:
    """``ENOSPC`` / ``EDQUOT`` when ``exc`` or an exception it was raised from or during is a
    full-disk error (``torch.save`` wraps the ``OSError`` of its writer in a ``RuntimeError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def _disk_full_message(code: int, path: Path, existed: bool) -> str:
    what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    previous = "the previous checkpoint is intact" if existed else f"no {path.name} existed before"
    if path.with_name("last.pt").is_file():
        then = f"free space and resume with {option_hint('resume')}"
    else:
        then = "free space and run again"
    return f"{what} while writing {path}; {previous}; {then}"


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed checkpoint writes left in ``folder`` (only regular
    files matching distiq's own pattern, ``.<name>.<random>.tmp``); return what was deleted.

    Call it only while no other process writes into ``folder`` (the run directory's lock held):
    a temporary file of a write in progress looks the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_atomic_temp(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info(
            "removed %d temporary file(s) of interrupted checkpoint writes in %s: %s",
            len(removed),
            folder,
            ", ".join(p.name for p in removed),
        )
    return removed


class CheckpointTimer:
    """Whether ``minutes`` of wall time have passed since the last checkpoint (``reset``).

    Measured with a monotonic clock (unaffected by changes of the system time); ``None`` never
    falls due. It only reads the clock: it touches no RNG and no training state, so writing
    checkpoints on time changes no number of the run."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else 60.0 * float(minutes)
        self.reset()

    def reset(self) -> None:
        self._since = monotonic()

    def due(self) -> bool:
        return self.seconds is not None and monotonic() - self._since >= self.seconds


def load_checkpoint(path: str | os.PathLike, *, expect: str = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Load a checkpoint written by the loop (on CPU), checking its format tag."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which one
        raise ValueError(
            f"cannot read checkpoint {path}: {exc}; the file is damaged or not a checkpoint: "
            f"restore it, or start the run anew with {option_hint('overwrite')}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != expect:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a {expect} checkpoint (found {found!r})")
    return state


def load_model_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict:
    """Load the model weights of ``last.pt`` or ``best.pt`` into ``model``; return the
    checkpoint's metadata (``step``, and ``metrics`` for a best checkpoint)."""
    path = Path(path)
    try:
        state = load_checkpoint(path, expect=BEST_FORMAT)
    except ValueError:
        state = load_checkpoint(path, expect=CHECKPOINT_FORMAT)
    model.load_state_dict(state["model"], strict=strict)
    return {k: v for k, v in state.items() if k in ("step", "metrics", "format")}


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, torch CUDA) as tensors/plain values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"the checkpoint holds CUDA RNG states of {len(state['cuda'])} devices, this "
                f"process sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(state["cuda"])
