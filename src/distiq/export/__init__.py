"""Deployment: files each runtime reads, reproducing the fake-quant model exactly where the
format can hold it (docs/export.md says which runtime reads which export).

Public API::

    from distiq.export import save_packed, load_packed, export_onnx
    sizes = save_packed(model, "out/packed", adapter=adapter)   # -> SizeBreakdown (print it)
    model = load_packed("out/packed")                          # QuantizedLinear layers, exact
    export_onnx(model, "out/onnx", adapter=adapter, precision="int8" | "int4" | "fp32")
    check_parity(model, "out/onnx", samples, adapter=adapter)  # logits and answers vs PyTorch

    from distiq.export.ort import OrtVLM                       # onnxruntime-only runner
    OrtVLM("out/onnx", threads=2).answer(image, "how many red squares are there")

    from distiq.export import save_compressed_tensors          # transformers / vLLM
    save_compressed_tensors(model, "out/ct", adapter=adapter)  # (pip: distiq[compressed-tensors])
    AutoModelForImageTextToText.from_pretrained("out/ct")      # weight-only schemes: bit-exact

    from distiq.export import export_gguf                      # llama.cpp (pip: distiq[gguf])
    export_gguf(model, "out/gguf", adapter=adapter)            # model.gguf + mmproj.gguf

    from distiq.export import export_run, load_run             # run directories (the CLI's)
    export_run("runs/qad-w4", "packed" | "onnx" | "compressed-tensors")  # -> run_dir/export/...

Modules: ``packed`` / ``manifest`` / ``unpack`` (the packed format), ``compressed`` /
``compressed_plan`` (compressed-tensors), ``onnx`` / ``onnx_quant`` (graphs and QDQ forms),
``ort`` (runner), ``parity``, ``gguf*`` (llama.cpp), ``rundir`` (run directories),
``run_export`` (``export_run``), ``files`` (safe member names, replacing only distiq exports),
``layers`` (one view of every quantized layer kind; ``QuantizedConv2d``).
"""

from distiq.export.compressed import load_compressed_tensors, save_compressed_tensors
from distiq.export.files import is_distiq_export
from distiq.export.gguf import export_gguf
from distiq.export.layers import QuantizedConv2d
from distiq.export.manifest import PackedCheckpointError, read_manifest
from distiq.export.onnx import OnnxExport, export_module, export_onnx
from distiq.export.packed import SizeBreakdown, load_packed, packed_size, save_packed
from distiq.export.parity import ParityReport, check_parity
from distiq.export.run_export import export_run
from distiq.export.rundir import LoadedRun, RunDirError, load_run

__all__ = [
    "PackedCheckpointError",
    "ParityReport",
    "LoadedRun",
    "OnnxExport",
    "QuantizedConv2d",
    "RunDirError",
    "SizeBreakdown",
    "check_parity",
    "export_gguf",
    "export_module",
    "export_onnx",
    "export_run",
    "is_distiq_export",
    "load_compressed_tensors",
    "load_packed",
    "load_run",
    "packed_size",
    "read_manifest",
    "save_compressed_tensors",
    "save_packed",
]
