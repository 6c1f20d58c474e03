"""Quantization numerics: specs, qparams, fake quantization, packing, quantized modules.

``import distiq.quant`` loads torch only; bitsandbytes is never imported here (``distiq.quant.nf4``
reimplements NF4 in torch).
"""

from distiq.quant.api import ModuleChange, QuantizeReport, quantize_
from distiq.quant.functional import QParams, choose_qparams, dequantize, fake_quantize, quantize
from distiq.quant.modules import (
    FakeQuantConv2d,
    FakeQuantLinear,
    attach_token_importance,
    calibration,
    fake_quant_disabled,
    fake_quant_modules,
    reset_calibration,
    token_importance_from_attention,
)
from distiq.quant.packing import pack, unpack
from distiq.quant.quantized import QuantizedLinear
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
    "FakeQuantConv2d",
    "FakeQuantLinear",
    "Granularity",
    "ModuleChange",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QParams",
    "QuantConfig",
    "QuantSpec",
    "QuantizeReport",
    "QuantizedLinear",
    "attach_token_importance",
    "calibration",
    "choose_qparams",
    "dequantize",
    "fake_quant_disabled",
    "fake_quant_modules",
    "fake_quantize",
    "pack",
    "parse_granularity",
    "quantize",
    "quantize_",
    "reset_calibration",
    "token_importance_from_attention",
    "unpack",
]
