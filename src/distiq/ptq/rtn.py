"""Round-to-nearest (RTN): the data-free baseline of post-training weight quantization."""

from __future__ import annotations

import time

import torch

from distiq.ptq.result import (
    PTQResult,
    check_finite,
    check_hessian,
    matrix_spec,
    reconstruction_error,
    weight_matrix,
)
from distiq.quant.functional import choose_qparams, dequantize, quantize
from distiq.quant.spec import QuantSpec


def rtn_quantize(
    weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None
) -> PTQResult:
    """Quantize ``weight`` by rounding every entry to the nearest grid point of ``spec``.

    Args:
        weight: ``(out_features, in_features)``, or a convolution weight ``(out, C, kh, kw)``
            (quantized as its ``(out, C·kh·kw)`` matrix).
        spec: the weight spec: ``PerTensor()``, ``PerChannel(0)`` or ``PerGroup(g)`` over the
            input columns; the spec's observer chooses the ranges.
        hessian: optional ``H = 2/n Σ x xᵀ`` ``(in, in)`` of the layer's inputs; when given, the
            result carries the reconstruction error.

    Returns:
        A ``PTQResult`` (see ``distiq.ptq.result`` for the shapes).
    """
    start = time.perf_counter()
    matrix = weight_matrix(weight)
    spec = matrix_spec(spec, matrix)
    check_finite(matrix, "the weight")
    if hessian is not None:
        check_hessian(hessian, matrix.shape[1])
    with torch.no_grad():
        work = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
        scale, zero_point = choose_qparams(work, spec, check_finite=False)
        codes = quantize(work, scale, zero_point, spec)
        dequantized = dequantize(codes, scale, zero_point, spec, dtype=work.dtype)
        result = PTQResult(
            weight=dequantized.reshape(weight.shape).to(weight.dtype),
            codes=codes,
            scale=scale,
            zero_point=zero_point,
            spec=spec,
        )
        if hessian is not None:
            result.error, result.relative_error = reconstruction_error(matrix, dequantized, hessian)
    result.seconds = time.perf_counter() - start
    return result
