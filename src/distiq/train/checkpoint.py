"""Atomic, resumable checkpoints and RNG state.

A run directory holds ``checkpoints/last.pt`` (everything needed to continue: model, optimizer,
LR scheduler, step, data position, RNG states of every process, best-so-far, logging window,
extra ``stateful`` objects) and, with a ``best_metric``, ``checkpoints/best.pt`` (the model
weights and the validation metrics of the best evaluation). Both are written to a temporary file
in the same folder, flushed to disk, then renamed over the old one (``os.replace``), so a crash
at any moment leaves either the old or the new checkpoint, never half of one.

Checkpoints hold only tensors and plain Python values (RNG states are converted), so they load
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = "distiq.train.checkpoint/1"
BEST_FORMAT = "distiq.train.best/1"


def default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open()`` would give a new file
    (``tempfile.mkstemp`` makes private ``0o600`` files, which is not wanted for results)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, default_file_mode())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def load_checkpoint(path: str | os.PathLike, *, expect: str = CHECKPOINT_FORMAT) -> dict[str, Any]:
    """Load a checkpoint written by the loop (on CPU), checking its format tag."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which one
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
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
