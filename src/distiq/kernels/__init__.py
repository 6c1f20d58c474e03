"""Compute kernels for quantized inference (PyTorch's int4 kernel and Triton on CUDA, with
PyTorch fallbacks elsewhere).

Kernels know nothing about models or configs: they take packed tensors and return tensors.
Triton is optional and imported lazily.
"""

from distiq.kernels.w4a16 import W4A16Weight, dequantize_w4a16, pack_w4a16, w4a16_linear

__all__ = ["W4A16Weight", "dequantize_w4a16", "pack_w4a16", "w4a16_linear"]
