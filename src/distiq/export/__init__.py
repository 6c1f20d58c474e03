"""Deployment: packed low-bit checkpoints and ONNX graphs that reproduce the fake-quant model.

Public API::

    from distiq.export import save_packed, load_packed, export_onnx
"""

from distiq.export.layers import QuantizedConv2d
from distiq.export.manifest import PackedCheckpointError, read_manifest
from distiq.export.onnx import OnnxExport, export_onnx
from distiq.export.packed import SizeBreakdown, load_packed, packed_size, save_packed
from distiq.export.rundir import LoadedRun, RunDirError, export_run, load_run

__all__ = [
    "PackedCheckpointError",
    "LoadedRun",
    "OnnxExport",
    "QuantizedConv2d",
    "RunDirError",
    "SizeBreakdown",
    "export_onnx",
    "export_run",
    "load_packed",
    "load_run",
    "packed_size",
    "read_manifest",
    "save_packed",
]
