"""Latency of dense vision models (segmentation, detection, depth) on the deployment backends.

The workload ``dense`` is one image at the model's fixed input size, ``pixel_values (1, 3, H,
W)`` → the model's outputs. Backends (as for VLMs in :mod:`distiq.bench.backends`):
``pytorch-fp32`` (the float twin in eager PyTorch), ``ort-fp32`` (the float twin exported with
``distiq.export.onnx_dense``), ``ort-int8`` (the model as int8 QDQ) and ``ort-int4`` (INT4
blockwise weights); a backend the model's layers do not fit is reported unavailable with the
reason. ``max_abs_diff`` compares a quantized backend's first output with the model's own
PyTorch output on the same input.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.bench.backends import BackendResult, missing_onnx_packages
from distiq.bench.timing import peak_memory, set_threads, time_interleaved

log = logging.getLogger(__name__)

DENSE_BACKENDS = ("pytorch-fp32", "ort-fp32", "ort-int8", "ort-int4")
WORKLOAD = "dense"
_PRECISION = {"ort-fp32": "fp32", "ort-int8": "int8", "ort-int4": "int4"}


def dense_exports(
    model: nn.Module, adapter: Any, root: str | Path, *, backends: tuple[str, ...] = DENSE_BACKENDS
) -> dict[str, Path | str]:
    """The ONNX exports the ``ort-*`` backends time, under ``root/onnx-<precision>``:
    ``{backend: folder}`` or ``{backend: why it cannot export}``."""
    from distiq.export.layers import float_twin
    from distiq.export.onnx_dense import export_dense_onnx
    from distiq.export.onnx_quant import plan_model

    missing = missing_onnx_packages()
    exports: dict[str, Path | str] = {}
    twin = None
    for backend in (b for b in backends if b in _PRECISION):
        if missing:
            exports[backend] = f"needs {', '.join(missing)}: pip install 'distiq[onnx]'"
            continue
        precision = _PRECISION[backend]
        if precision == "fp32":
            twin = twin if twin is not None else float_twin(model)
        source = twin if precision == "fp32" else model
        try:
            plan_model(source, precision)
        except ValueError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            exports[backend] = lines[1] if len(lines) > 1 else lines[0]
            continue
        target = Path(root) / f"onnx-{precision}"
        shutil.rmtree(target, ignore_errors=True)
        export_dense_onnx(source, target, adapter=adapter, precision=precision)
        exports[backend] = target
    return exports


def measure_dense(
    model: nn.Module,
    adapter: Any,
    *,
    backends: tuple[str, ...] = DENSE_BACKENDS,
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 30,
    int4_accuracy_level: int | None = None,
    workdir: str | Path | None = None,
) -> list[BackendResult]:
    """Measure ``backends`` on the ``dense`` workload of one model (module docstring).

    Returns:
        One ``BackendResult`` per backend, unavailable ones with their reason.
    """
    from distiq.export.layers import float_twin
    from distiq.export.onnx_dense import OrtDense

    unknown = sorted(set(backends) - set(DENSE_BACKENDS))
    if unknown:
        raise ValueError(f"unknown dense backend {unknown}; backends: {', '.join(DENSE_BACKENDS)}")
    previous = set_threads(threads)
    model.eval()
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="distiq-bench-dense-")) if own_dir else Path(workdir)
    try:
        height, width = adapter.input_size
        pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            reference = adapter.forward(model, pixels)
        first = next(t for t in (reference.logits, reference.depth) if t is not None)
        twin = float_twin(model) if "pytorch-fp32" in backends else None
        exports = dense_exports(model, adapter, root, backends=backends)
        calls: dict[str, Callable[[], Any]] = {}
        results = []
        for backend in backends:
            result = BackendResult(backend, WORKLOAD, True)
            with peak_memory() as memory:
                if backend == "pytorch-fp32":

                    def run_twin(twin=twin) -> Any:
                        with torch.inference_mode():
                            return adapter.forward(twin, pixels)

                    calls[backend] = run_twin
                    result.size_bytes = sum(
                        4 * v.numel() for v in twin.state_dict().values() if v.is_floating_point()
                    )
                elif isinstance(exports.get(backend), Path):
                    session = OrtDense(
                        exports[backend], threads, int4_accuracy_level=int4_accuracy_level,
                        spinning=False,
                    )  # fmt: skip
                    array = pixels.numpy()
                    calls[backend] = lambda session=session, array=array: session.run(array)
                    result.size_bytes = sum(
                        f.stat().st_size for f in exports[backend].glob("*.onnx")
                    )
                else:
                    result.available = False
                    result.reason = exports.get(backend, "not applicable")
                if backend in calls:
                    output = calls[backend]()  # first run: session / kernel set-up
            if backend in calls:
                result.memory = memory.to_dict()
                if backend.startswith("ort-") and backend != "ort-fp32":
                    got = torch.as_tensor(output[0]).float()
                    result.max_abs_diff = float((got - first.float()).abs().max())
            results.append(result)
        timings = time_interleaved(calls, warmup=warmup, repeats=repeats)
        for result in results:
            if result.backend in timings:
                result.timing = timings[result.backend]
        log.info("measured the dense workload on %d backend(s)", len(calls))
        return results
    finally:
        set_threads(previous)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


__all__ = ["DENSE_BACKENDS", "WORKLOAD", "dense_exports", "measure_dense"]
