"""distiq: quantization-aware distillation of vision-language and vision models for edge devices.

``import distiq`` is cheap: it imports no heavy backend and touches no device. Import the
sub-packages you need (``distiq.quant``, ``distiq.ptq``, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
