"""How a packed checkpoint stores a layer's scales (for :mod:`distiq.export.packed`).

By default each layer's scales are stored in its weight spec's ``scale_dtype``: a spec with
``scale_dtype="float16"`` trains with float16-representable scales, so 16 bits hold them exactly.
A scale that is not a value of its spec's dtype (set by hand) falls back to float32, with a
warning. An explicit ``scale_dtype`` stores every layer's scales in that dtype: exact when the
values fit, else rounded (relative error at most ``2⁻¹¹`` float16 / ``2⁻⁸`` bfloat16), and
refused when they are outside the dtype's normal range.
"""

from __future__ import annotations

import logging

import torch

from distiq.quant import QuantSpec
from distiq.quant.functional import SCALE_DTYPES

log = logging.getLogger(__name__)

_REL_ERROR = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def stored_scales(
    scale: torch.Tensor, spec: QuantSpec, scale_dtype: str | None, where: str
) -> tuple[torch.Tensor, str]:
    """``(scales to store, their dtype name)`` for one layer (``where`` names it in messages):
    the spec's dtype when ``scale_dtype`` is None, else ``scale_dtype``."""
    if scale_dtype is None:
        return _spec_scale(scale, spec, where)
    return _cast_scale(scale, scale_dtype, where), scale_dtype


def _representable(scale: torch.Tensor, dtype_name: str) -> torch.Tensor | None:
    """``scale`` cast to ``dtype_name`` when that is exact (every value kept), else None."""
    if dtype_name == "float32":
        return scale.to(torch.float32)
    cast = scale.to(SCALE_DTYPES[dtype_name])
    return cast if torch.equal(cast.to(scale.dtype), scale) else None


def _spec_scale(scale: torch.Tensor, spec: QuantSpec, where: str) -> tuple[torch.Tensor, str]:
    """(stored scales, dtype name) in the spec's ``scale_dtype``: exact, else float32."""
    stored = _representable(scale, spec.scale_dtype)
    if stored is not None:
        return stored, spec.scale_dtype
    log.warning(
        "%s: its scales are not all %s values although its spec says scale_dtype=%s (were they "
        "set by hand?); storing them as float32 to stay exact",
        where,
        spec.scale_dtype,
        spec.scale_dtype,
    )
    return scale.to(torch.float32), "float32"


def _cast_scale(scale: torch.Tensor, dtype_name: str, where: str) -> torch.Tensor:
    exact = _representable(scale, dtype_name)
    if exact is not None:  # float32, or scales that are already values of dtype_name
        return exact
    cast = scale.to(SCALE_DTYPES[dtype_name])
    back = cast.to(torch.float32)
    rel = ((back - scale).abs() / scale.abs().clamp(min=torch.finfo(torch.float32).tiny)).max()
    tiny = torch.finfo(SCALE_DTYPES[dtype_name]).tiny
    if (
        not torch.isfinite(back).all()
        or bool((scale.abs() < tiny).any())
        or rel > _REL_ERROR[dtype_name]
    ):
        raise ValueError(
            f"{where}: scales in [{float(scale.min()):.3g}, {float(scale.max()):.3g}] are not "
            f"normal {dtype_name} numbers (relative error {float(rel):.2g}); save with "
            "scale_dtype='float32' (exact) or 'bfloat16' (float32's range)"
        )
    return cast


def common_scale_dtype(modules: dict[str, dict]) -> str:
    """The dtype every layer's scales were stored in; ``float32`` when they differ or none has
    scales (each layer entry's ``scale_dtype`` is then the one to read)."""
    dtypes = {entry["scale_dtype"] for entry in modules.values() if "scale_dtype" in entry}
    return dtypes.pop() if len(dtypes) == 1 else "float32"
