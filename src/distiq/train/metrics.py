"""Metrics of a run: one JSON object per line in ``RUN/metrics.jsonl``, optional TensorBoard.

Line kinds (``kind``):

- ``train`` — ``step`` (optimizer steps done), ``epoch``, ``lr`` (of the first parameter group),
  ``total``, ``terms`` (``{name: value}``, every term returned by the step function),
  ``grad_norm`` (global L2 norm before clipping), ``seconds`` (wall time per step) — all averaged
  over the ``log_every`` steps since the previous line (and over processes);
- ``eval`` — ``step``, ``metrics`` (``{name: value}``), ``best`` (whether it is the best so far),
  ``seconds`` (wall time of the evaluation).

Lines are appended and flushed one at a time, so a killed run leaves every line it wrote. On
resume the file is cut back to the checkpoint's step (lines written after it are dropped, with
any torn last line), so a resumed run's file reads like an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from distiq.config import atomic_write

logger = logging.getLogger(__name__)


def _finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no nan/inf


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Parse a metrics JSONL file (skipping a torn last line); keep only ``kind`` lines if given."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if kind is None or record.get("kind") == kind:
            lines.append(record)
    return lines


class MetricsWriter:
    """Appends metric lines to ``RUN/metrics.jsonl`` (and TensorBoard events) on the main process.

    Args:
        run_dir: the run directory.
        enabled: ``False`` on non-main processes: every call is a no-op.
        resume_step: when resuming, drop lines with ``step > resume_step`` first.
        tensorboard: also write events to ``RUN/tensorboard`` (imports tensorboard lazily).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = False,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            self._fh = None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")
        if tensorboard:
            self._tb = _tensorboard_writer(self.path.parent / "tensorboard", resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        """Append one line (floats that are not finite become the strings "nan"/"inf")."""
        if not self.enabled or self._fh is None:
            return
        clean = _clean(record)
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None:
            self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        kind = record.get("kind", "train")
        flat: dict[str, float] = {}
        for key, value in record.items():
            if key in ("step", "kind", "epoch", "best"):
                continue
            if isinstance(value, dict):
                flat.update({f"{key}/{k}": v for k, v in value.items()})
            elif isinstance(value, int | float):
                flat[key] = value
        for key, value in flat.items():
            self._tb.add_scalar(f"{kind}/{key}", float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return _finite_or_str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def check_tensorboard() -> None:
    """Raise a clear error if TensorBoard logging cannot work here."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "tensorboard: true needs the tensorboard package; install it with "
            "pip install 'distiq[tensorboard]' or set tensorboard: false"
        ) from exc


def _tensorboard_writer(log_dir: Path, resume_step: int | None) -> Any:
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events after the resumed step, as the JSONL file is cut back.
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
