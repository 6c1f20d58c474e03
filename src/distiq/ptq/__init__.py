"""Post-training weight quantization: round-to-nearest, GPTQ, and a block-by-block calibration
driver for whole models.

    from distiq.ptq import rtn_quantize, gptq_quantize, quantize_model
"""

from distiq.ptq.calibrate import LayerReport, quantize_layer, quantize_model, select_layers
from distiq.ptq.gptq import gptq_quantize
from distiq.ptq.hessian import HessianAccumulator
from distiq.ptq.result import PTQResult, output_energy, reconstruction_error
from distiq.ptq.rtn import rtn_quantize

__all__ = [
    "HessianAccumulator",
    "LayerReport",
    "PTQResult",
    "gptq_quantize",
    "output_energy",
    "quantize_layer",
    "quantize_model",
    "reconstruction_error",
    "rtn_quantize",
    "select_layers",
]
