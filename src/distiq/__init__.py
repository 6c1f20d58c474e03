"""distiq: quantization-aware distillation of vision-language and vision models for edge devices.

``import distiq`` is cheap: it imports no heavy backend and touches no device. Import the
sub-packages you need (``distiq.quant``, ``distiq.ptq``, ...); ``distiq.compress`` (imported
on first use) compresses a model held in memory or named by a recipe
(:mod:`distiq.train.api`).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``distiq.compress`` / ``distiq.CompressResult``, imported on first use (the engine lives
    in ``distiq.train``; every layer below it imports this package for ``__version__``)."""
    if name in ("compress", "CompressResult"):
        import importlib

        return getattr(importlib.import_module("distiq.train.api"), name)
    raise AttributeError(f"module 'distiq' has no attribute {name!r}")


__all__ = ["CompressResult", "__version__", "compress"]
