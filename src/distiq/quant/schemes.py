"""Named quantization schemes: the usual weight / activation pairs by the names deployment tools
use (compressed-tensors' preset schemes, llm-compressor's recipes).

Each scheme is a pair of ``QuantSpec`` field mappings (``None``: that tensor stays in floating
point); a recipe names one (``quantization: {scheme: W4A8}``) and may change single fields on
top (``weight: {learnable: true}``).

- ``W4A16`` — 4-bit symmetric weights in groups of 128, float activations (GPTQ / AWQ style).
- ``W4A8`` — 4-bit symmetric per-channel weights, 8-bit per-token dynamic activations.
- ``W8A8`` — 8-bit symmetric per-channel weights, 8-bit per-token dynamic activations.
- ``W8A16`` — 8-bit symmetric per-channel weights, float activations.
- ``W2A16-g64`` — 2-bit asymmetric weights in groups of 64, float activations.
- ``NF4`` — QLoRA's 4-bit NormalFloat in blocks of 64, float activations.
- ``Q4_0`` / ``Q8_0`` — llama.cpp's grids: symmetric 4 / 8-bit weights in groups of 32 with
  float16 scales, float activations (a GGUF export writes them code for code).
"""

from __future__ import annotations

import copy
from typing import Any

from distiq.util import suggest

_W4_G128 = {"bits": 4, "symmetric": True, "granularity": "per_group(128)"}
_PER_TOKEN_A8 = {"bits": 8, "symmetric": True, "granularity": "per_token", "dynamic": True}

SCHEMES: dict[str, dict[str, dict[str, Any] | None]] = {
    "W4A16": {"weight": _W4_G128, "activation": None},
    "W4A8": {
        "weight": {"bits": 4, "symmetric": True, "granularity": "per_channel(0)"},
        "activation": _PER_TOKEN_A8,
    },
    "W8A8": {
        "weight": {"bits": 8, "symmetric": True, "granularity": "per_channel(0)"},
        "activation": _PER_TOKEN_A8,
    },
    "W8A16": {
        "weight": {"bits": 8, "symmetric": True, "granularity": "per_channel(0)"},
        "activation": None,
    },
    "W2A16-g64": {
        "weight": {"bits": 2, "symmetric": False, "granularity": "per_group(64)"},
        "activation": None,
    },
    "NF4": {
        "weight": {"bits": 4, "format": "nf4", "granularity": "per_group(64)"},
        "activation": None,
    },
    "Q4_0": {
        "weight": {
            "bits": 4,
            "symmetric": True,
            "granularity": "per_group(32)",
            "scale_dtype": "float16",
        },
        "activation": None,
    },
    "Q8_0": {
        "weight": {
            "bits": 8,
            "symmetric": True,
            "granularity": "per_group(32)",
            "scale_dtype": "float16",
        },
        "activation": None,
    },
}


def scheme_fields(name: str) -> dict[str, dict[str, Any] | None]:
    """``{"weight": fields | None, "activation": fields | None}`` of the scheme ``name`` (a
    copy the caller may change).

    Raises:
        ValueError: an unknown name, with the known ones and a "did you mean".
    """
    if name not in SCHEMES:
        raise ValueError(
            f"unknown quantization scheme {name!r}{suggest(name, list(SCHEMES))}; "
            f"choose one of {', '.join(SCHEMES)}"
        )
    return copy.deepcopy(SCHEMES[name])
