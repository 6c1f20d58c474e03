"""Quantization numerics: specs, qparams, fake quantization, packing, quantized modules."""

from distiq.quant.spec import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantConfig,
    QuantSpec,
    parse_granularity,
)

__all__ = [
    "Granularity",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QuantConfig",
    "QuantSpec",
    "parse_granularity",
]
