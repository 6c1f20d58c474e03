"""NF4 (4-bit NormalFloat) with QLoRA double quantization, in plain torch.

Dettmers et al., "QLoRA" (2023), section 3 and appendix E. The codebook holds 16 values from
quantiles of N(0, 1), normalised to [-1, 1], with an exact zero: ``NF4_CODEBOOK``, the same
float32 values as bitsandbytes' ``get_4bit_type("nf4")``.

``quantize_nf4(W)`` follows bitsandbytes' ``quantize_4bit(W, blocksize=64, quant_type="nf4",
compress_statistics=True)``:
1. ``W`` is read flat (row-major) in blocks of 64 (a last partial block is allowed);
   ``absmax_b = max |W_block|``; codes are the nearest codebook entries of
   ``clamp(W · (1/absmax_b), -1, 1)`` (ties to the lower entry, as bitsandbytes' bucketize on the
   codebook midpoints does).
2. Double quantization: ``offset = mean(absmax)``; ``absmax − offset`` is quantized in blocks of
   256 with bitsandbytes' signed 8-bit *dynamic* code (``dynamic_map()``: QLoRA's "8-bit floats")
   and its own float32 absmax per block of 256. How a value picks its 8-bit code
   (``absmax_rounding``):
   - ``"nearest"`` (default): the nearest code value, as QLoRA defines it (device-independent);
   - ``"bitsandbytes_cpu"``: bitsandbytes 0.50's CPU kernel, which looks the normalised value up
     in a 65,536-bin table over [-1, 1] (bin ``trunc((v+1)/2·65535 + 0.5)``, each bin holding the
     code of its bin centre). Bins are 3e-5 wide, so codes closer to zero than that are never
     used and values near a midpoint can take the farther code.
3. Dequantization: ``absmax = code8[q8] · absmax2 + offset`` and ``Ŵ = NF4[q] · absmax``.

Exactness against bitsandbytes 0.50 on CPU (tests/quant/test_quant_nf4.py): the 4-bit codes, the
first-level absmax, the second-level absmax and the offset are identical; with
``absmax_rounding="bitsandbytes_cpu"`` the 8-bit absmax codes and the dequantized weight are
identical too (``atol=0``); with ``"nearest"`` 0.1-0.4 % of the 8-bit codes differ (always
toward the nearer value: our dequantized absmax is never farther from the true absmax) and the
dequantized weights differ by at most one 8-bit code step of their block's absmax times
``|NF4[q]|``. Storage differs only in layout: distiq packs two codes per byte with the *first in
the low nibble* (``distiq.quant.pack``, the ONNX INT4 layout); bitsandbytes puts the first in the
high nibble.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from distiq.quant.packing import pack, unpack

NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
"""The 16 NF4 values (float32), ascending; index 7 is the exact zero."""

_ABSMAX_FLOOR = 1e-38  # bitsandbytes divides by max(absmax, 1e-38): all-zero blocks give code 7


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int32) of the nearest value of the ascending ``code`` for each element of ``x``
    (ties go to the lower index)."""
    return torch.bucketize(x, _midpoints(code.to(x.device)), out_int32=True)


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """NF4 codes (int32 0-15) of already normalised values ``x`` (clamped to [-1, 1])."""
    return nearest_code(torch.clamp(x.float(), -1.0, 1.0), NF4_CODEBOOK)


def dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization code (Dettmers 2015), 256 ascending
    float32 values in [-1, 1]: for exponent ``i`` in 0..6, ``2^i`` linearly spaced fractions
    (midpoints of ``linspace(0.1, 1, 2^i + 1)``) times ``10^(i-6)``, both signs, plus 0 and 1."""
    values: list[float] = []
    for i in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + i)
        values += (magnitude * means).tolist()
        values += (-magnitude * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


_LUT_BINS = 65536


@functools.cache
def _bnb_cpu_table() -> torch.Tensor:
    """bitsandbytes' CPU lookup table: the dynamic-code index of each of 65,536 bin centres."""
    code = dynamic_map()
    centres = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / float(_LUT_BINS - 1)
    return torch.searchsorted(_midpoints(code), centres, side="left")


def _bnb_cpu_codes(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """8-bit dynamic codes as bitsandbytes 0.50's CPU ``quantize_blockwise`` computes them."""
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = torch.clamp(flat * _per_element(inv, flat.numel(), blocksize), -1.0, 1.0)
    index = torch.trunc((v + 1.0) * 0.5 * float(_LUT_BINS - 1) + 0.5).long()
    codes = _bnb_cpu_table().to(flat.device)[index]
    zero_block = _per_element(absmax == 0, flat.numel(), blocksize)
    return torch.where(zero_block, torch.zeros_like(codes), codes)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def _per_element(blockvalues: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Repeat one value per block to one value per element (``n`` elements)."""
    return blockvalues.repeat_interleave(blocksize)[:n]


def _blockwise_codes(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, code):
    scale = _per_element(1.0 / absmax.clamp(min=_ABSMAX_FLOOR), flat.numel(), blocksize)
    return nearest_code(torch.clamp(flat * scale, -1.0, 1.0), code)


@dataclass
class NF4Tensor:
    """A weight in NF4 with (optionally) double-quantized block statistics.

    Attributes:
        packed: uint8 ``ceil(n/2)``: the 4-bit codes, ``distiq.quant.pack`` layout.
        shape: the original shape; ``n = prod(shape)``.
        blocksize: elements per absmax block (64).
        absmax: float32 ``(ceil(n/64),)`` when not double-quantized, else None.
        absmax_codes: uint8 ``(ceil(n/64),)`` 8-bit dynamic codes of ``absmax − offset``.
        absmax_scale: float32 ``(ceil(n/64/256),)`` the second-level absmax.
        absmax_offset: float32 scalar tensor, the mean of the first-level absmax.
        absmax_blocksize: 256.
        dtype: the dtype to dequantize to.
    """

    packed: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    absmax_blocksize: int = 256
    dtype: torch.dtype = torch.float32

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, int32, flat ``(n,)``."""
        return unpack(self.packed, 4, (math.prod(self.shape),))

    def block_absmax(self) -> torch.Tensor:
        """First-level absmax, float32 ``(ceil(n/64),)`` (dequantized when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        q = self.absmax_codes.long()
        values = dynamic_map().to(q.device)[q]
        values = values * _per_element(self.absmax_scale, q.numel(), self.absmax_blocksize)
        return values + self.absmax_offset

    def nbytes(self) -> int:
        """Bytes of storage (codes + statistics)."""
        tensors = [self.packed, self.absmax, self.absmax_codes, self.absmax_scale]
        tensors.append(self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = 64,
    *,
    double_quant: bool = True,
    absmax_blocksize: int = 256,
    absmax_rounding: Literal["nearest", "bitsandbytes_cpu"] = "nearest",
) -> NF4Tensor:
    """Quantize ``weight`` (any shape, float16/bfloat16/float32) to NF4 (module docstring).

    Args:
        weight: the tensor; read flat in row-major order.
        blocksize: elements per absmax block (QLoRA: 64).
        double_quant: quantize the absmax values to 8 bits (QLoRA's double quantization).
        absmax_blocksize: elements per second-level block (QLoRA: 256).
        absmax_rounding: ``"nearest"`` or ``"bitsandbytes_cpu"`` (module docstring).

    Raises ``ValueError`` on NaN/Inf (they would poison a whole block's absmax).
    """
    if absmax_rounding not in ("nearest", "bitsandbytes_cpu"):
        raise ValueError(
            f"absmax_rounding must be 'nearest' or 'bitsandbytes_cpu', got {absmax_rounding!r}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a float tensor, got {weight.dtype}")
    if blocksize < 1 or absmax_blocksize < 1:
        raise ValueError("blocksize and absmax_blocksize must be positive")
    if not torch.isfinite(weight).all():
        raise ValueError(
            "weight has NaN/Inf values; NF4 needs finite weights: fix the model that produced them"
        )
    flat = weight.detach().reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize)
    codes = _blockwise_codes(flat, absmax, blocksize, NF4_CODEBOOK)
    result = NF4Tensor(
        packed=pack(codes, 4), shape=tuple(weight.shape), blocksize=blocksize, dtype=weight.dtype
    )
    if not double_quant:
        result.absmax = absmax
        return result
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = _blockwise_absmax(centred, absmax_blocksize)
    if absmax_rounding == "nearest":
        codes8 = _blockwise_codes(centred, absmax2, absmax_blocksize, dynamic_map())
    else:
        codes8 = _bnb_cpu_codes(centred, absmax2, absmax_blocksize)
    result.absmax_codes = codes8.to(torch.uint8)
    result.absmax_scale = absmax2
    result.absmax_offset = offset
    result.absmax_blocksize = absmax_blocksize
    return result


def dequantize_nf4(tensor: NF4Tensor) -> torch.Tensor:
    """``NF4[q] · absmax`` per block, reshaped to ``tensor.shape``, in ``tensor.dtype``."""
    codes = tensor.codes().long()
    values = NF4_CODEBOOK.to(codes.device)[codes]
    absmax = tensor.block_absmax()
    out = values * _per_element(absmax, codes.numel(), tensor.blocksize)
    return out.reshape(tensor.shape).to(tensor.dtype)
