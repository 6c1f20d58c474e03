"""Size, latency and memory of deployed models, as ``distiq.results`` records.

Public API::

    from distiq.bench import bench_run, measure_model, BACKENDS
    bench_run("runs/qad-w8a8")            # what `distiq bench RUN_DIR` calls

``measure_model`` measures one in-memory model on the backends of ``distiq.bench.backends``
(PyTorch fp32, PyTorch W8A8 int8 matmul, onnxruntime fp32 / int8 QDQ / int4) on its workloads
(``language_model``: the prefill of a prompt; ``decode``: one new token with the prompt's KV
cache, ``distiq.bench.decode``; ``vision``) with warm-up,
interleaved timed runs, medians, fixed threads and per-backend peak memory
(``distiq.bench.timing``); ``bench_run`` does it for a run directory and merges the numbers into
its ``results.json``; ``bench_exports(run_dir, root)`` makes its ONNX exports ahead of it
(``bench_run(run_dir, exports=...)``). The CUDA kernels benchmark is ``benchmarks/cuda_kernels.py``;
``benchmarks/deploy.py`` is the CPU deployment benchmark of the demo model.
"""

from distiq.bench.backends import (
    BACKENDS,
    WORKLOAD_NAMES,
    WORKLOADS,
    BackendResult,
    export_backends,
    measure_model,
    w8a8_model,
)
from distiq.bench.decode import OrtDecodeStep, TorchDecodeStep
from distiq.bench.run import bench_exports, bench_run, headline, machine
from distiq.bench.timing import PeakMemory, Timing, peak_memory, time_interleaved

__all__ = [
    "BACKENDS",
    "WORKLOADS",
    "WORKLOAD_NAMES",
    "BackendResult",
    "OrtDecodeStep",
    "PeakMemory",
    "Timing",
    "TorchDecodeStep",
    "bench_exports",
    "bench_run",
    "export_backends",
    "headline",
    "machine",
    "measure_model",
    "peak_memory",
    "time_interleaved",
    "w8a8_model",
]
