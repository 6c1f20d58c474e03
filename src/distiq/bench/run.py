"""``bench_run(run_dir)``: size, latency and memory of a run's model into its ``results.json``
(a model directory that is not a distiq run is measured but never written to).

What ``distiq bench RUN_DIR`` calls. The model is loaded with real quantized layers
(``distiq.export.load_run``), measured on every backend of ``distiq.bench.backends`` (batch 1,
threads fixed), and its sizes are taken from the formats themselves: the packed checkpoint
(``save_packed``'s ``SizeBreakdown``, quantized runs only), each ONNX export and the fp32 size.

Records: every record already in ``run_dir/results.json`` (written by training / evaluation, one
per task) gets, by name (``distiq.results.upsert_records``):

- ``size_mb``: the packed checkpoint (weights + manifest) for a quantized run, the fp32 tensors
  for a float one (MiB = 2²⁰ bytes);
- ``latency_ms`` / ``latency_backend``: the language model's median latency at batch 1 on the
  headline backend — ``ort-int8`` when the model exports to int8, else ``ort-int4``, else
  ``ort-fp32``; for a dense vision model (segmentation, detection, depth) one image through the
  whole model (``distiq.bench.dense``);
- ``extra["bench"]``: every backend and workload (median / mean / min / p90 ms, repeats, warm-up,
  peak and added memory, size on disk, parity ``max_abs_diff``), the packed size breakdown, the
  threads and the machine.

A run without records gets one, named after the directory.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch

from distiq.bench.backends import BACKENDS, BackendResult, measure_model
from distiq.results import Method, ResultRecord, read_records, upsert_records

log = logging.getLogger(__name__)

HEADLINE_ORDER = ("ort-int8", "ort-int4", "ort-fp32")


def machine() -> dict:
    """CPU model, cores, versions: what a latency number needs beside it."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):  # a shared machine's load explains noisy latencies
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def headline(results: list[BackendResult], workload: str = "language_model"):
    """The headline ``BackendResult`` (see the module docstring), or None."""
    by_name = {r.backend: r for r in results if r.workload == workload and r.timing is not None}
    for backend in HEADLINE_ORDER:
        if backend in by_name:
            return by_name[backend]
    return next(iter(by_name.values()), None)


def _bits(modules: dict) -> tuple[int, int, int | None]:
    """(w_bits, a_bits, group_size) summarised from quantization.json entries."""
    from distiq.quant import QuantSpec

    w_bits, a_bits, groups = [], [], []
    for entry in modules.values():
        if entry.get("weight"):
            spec = QuantSpec.from_dict(entry["weight"])
            w_bits.append(spec.bits)
            groups.append(spec.group_size)
        if entry.get("activation"):
            a_bits.append(QuantSpec.from_dict(entry["activation"]).bits)
    group = groups[0] if groups and all(g == groups[0] for g in groups) else None
    return (min(w_bits) if w_bits else 16), (min(a_bits) if a_bits else 16), group


def bench_run(
    run_dir: str | os.PathLike,
    *,
    backends: tuple[str, ...] = BACKENDS,
    workloads: tuple[str, ...] = ("language_model", "vision"),
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 30,
    results: str | os.PathLike | None = None,
    int4_accuracy_level: int | None = None,
    exports: dict[str, Path | str] | None = None,
) -> list[ResultRecord]:
    """Measure a run directory's model and merge the numbers into its result records.

    Args:
        run_dir: a run directory (``distiq.export.rundir``).
        backends, workloads: what to measure (``distiq.bench.backends``).
        threads: torch and onnxruntime intra-op threads (stated in the records).
        warmup, repeats: untimed and timed runs per backend.
        results: the results file to update (default: ``run_dir/results.json`` for a distiq
            run directory (:func:`is_distiq_run`); any other model directory, e.g. a user's
            checkpoint, is never written to: the records are only returned).
        int4_accuracy_level: onnxruntime ``MatMulNBits`` accuracy level for ``ort-int4``.
        exports: the ONNX models of this run made before by :func:`bench_exports` (then the
            measurement exports nothing itself).

    Returns:
        The records written (one per record name of the run).
    """
    from distiq.export.packed import save_packed
    from distiq.export.rundir import load_run

    run = load_run(run_dir)
    if results is not None:
        results_path: Path | None = Path(results)
    elif is_distiq_run(run_dir):
        results_path = Path(run_dir) / "results.json"
    else:
        results_path = None  # a user's checkpoint: measured, not written into
    from distiq.models import is_dense_model

    dense = is_dense_model(run.adapter)
    if dense:  # segmentation, detection, depth: one image through the whole model
        from distiq.bench.dense import DENSE_BACKENDS, measure_dense

        measured = measure_dense(
            run.model, run.adapter, backends=tuple(b for b in backends if b in DENSE_BACKENDS),
            threads=threads, warmup=warmup, repeats=repeats,
            int4_accuracy_level=int4_accuracy_level,
        )  # fmt: skip
    else:
        measured = measure_model(
            run.model, run.adapter, backends=backends, workloads=workloads, threads=threads,
            warmup=warmup, repeats=repeats, int4_accuracy_level=int4_accuracy_level,
            exports=exports,
        )  # fmt: skip
    extra: dict[str, Any] = {"threads": threads, "machine": machine(), "batch_size": 1}
    for result in measured:
        extra.setdefault(result.workload, {})[result.backend] = result.to_dict()
    fp32_bytes = sum(
        4 * v.numel() for v in run.model.state_dict().values() if v.is_floating_point()
    )
    size_bytes = fp32_bytes
    if run.quantized:
        with tempfile.TemporaryDirectory(prefix="distiq-bench-packed-") as tmp:
            sizes = save_packed(run.model, Path(tmp) / "packed", adapter=run.adapter)
        extra["packed"] = sizes.to_dict()
        size_bytes, fp32_bytes = sizes.total_bytes, sizes.fp32_bytes
    extra["fp32_bytes"] = fp32_bytes
    top = headline(measured, "dense" if dense else "language_model")
    existing = read_records(results_path) if results_path is not None else []
    w_bits, a_bits, group = _bits(run.modules)
    base = dict(
        size_mb=size_bytes / 2**20,
        latency_ms=top.timing.median_ms if top is not None else None,
        latency_backend=top.backend if top is not None else None,
        extra={"bench": extra},
    )
    if existing:
        records = [
            r.replace(
                size_mb=base["size_mb"],
                latency_ms=base["latency_ms"],
                latency_backend=base["latency_backend"],
                extra={**r.extra, **base["extra"]},
            )
            for r in existing
        ]
    else:
        methods = typing.get_args(Method)
        first = next(iter(run.modules.values()), {})
        method = first.get("weights_from") if run.quantized else "teacher"
        method = method if method in methods else ("qat" if run.quantized else "teacher")
        records = [
            ResultRecord(
                name=Path(run_dir).resolve().name,
                method=method,
                w_bits=w_bits,
                a_bits=a_bits,
                group_size=group,
                params=sum(p.numel() for p in run.model.parameters()),
                **base,
            )
        ]
    if results_path is not None:
        upsert_records(results_path, records)
    log.info(
        "bench %s: %.3f MiB, %s %.3f ms", run_dir, base["size_mb"],
        base["latency_backend"], base["latency_ms"] or float("nan"),
    )  # fmt: skip
    return records


def is_distiq_run(directory: str | os.PathLike) -> bool:
    """Whether distiq wrote ``directory`` (a run: ``recipe.yaml`` or ``quantization.json``),
    as opposed to a model directory of the user's, which bench never writes into."""
    return any((Path(directory) / name).is_file() for name in ("recipe.yaml", "quantization.json"))


def bench_exports(
    run_dir: str | os.PathLike, root: str | os.PathLike, *, backends: tuple[str, ...] = BACKENDS
) -> dict[str, Path | str]:
    """Export a run directory's model for :func:`bench_run` ahead of it, under ``root``
    (``distiq.bench.backends.export_backends``): ``bench_run(run_dir, exports=...)`` then only
    measures. ``distiq demo`` calls it in the worker that trained the run, so that the exports
    (most of a measurement's time) run in the workers side by side."""
    from distiq.bench.backends import export_backends
    from distiq.export.rundir import load_run

    run = load_run(run_dir)
    run.model.eval()
    return export_backends(run.model, run.adapter, root, backends=backends)
