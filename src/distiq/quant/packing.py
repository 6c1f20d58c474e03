"""Lossless packing of low-bit integer codes into bytes.

Layout (every width 1-8): the codes, flattened in row-major order, form a little-endian bit
stream — code ``i`` occupies bits ``[i·b, (i+1)·b)`` and byte ``j`` holds bits ``[8j, 8j+8)``. So
8 codes fill exactly ``b`` bytes: 4-bit codes are two per byte, the first in the low nibble
(the ONNX ``INT4`` / ``UINT4`` layout), 2-bit codes four per byte, 3-bit codes 8 per 3 bytes, and
8-bit codes one per byte. ``n`` codes take ``ceil(n·b/8)`` bytes; unused high bits of the last
byte are zero.

Signed codes (``signed=True``, range ``[-2^(b-1), 2^(b-1)-1]``) are stored with the offset
``2^(b-1)`` (as unsigned ``[0, 2^b-1]``) and the offset is removed on unpacking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_CHUNK_GROUPS = 1 << 20


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1-8 to pack into bytes, got {bits!r}")


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``pack`` uses for ``numel`` codes of ``bits`` bits: ``ceil(numel·bits/8)``."""
    _check_bits(bits)
    return math.ceil(numel * bits / 8)


def pack(codes: torch.Tensor, bits: int, *, signed: bool = False) -> torch.Tensor:
    """Pack integer ``codes`` (any shape) into a 1-D ``uint8`` tensor.

    Args:
        codes: integer tensor; values in ``[0, 2^bits)`` or, with ``signed``,
            ``[-2^(bits-1), 2^(bits-1))``.
        bits: code width, 1-8 (distiq uses 2, 3, 4 and 8).
        signed: the codes are signed (stored with offset ``2^(bits-1)``).

    Returns:
        ``uint8`` of ``ceil(codes.numel()·bits/8)`` bytes. Keep ``codes.shape`` to unpack.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"pack takes integer codes, got {codes.dtype}; quantize first")
    flat = codes.reshape(-1).to(torch.int64)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if flat.numel():
        cmin, cmax = int(flat.min()), int(flat.max())
        if cmin < low or cmax > high:
            hint = (
                "; these look like signed codes: pass signed=True"
                if not signed and cmin < 0 and cmin >= -(2 ** (bits - 1))
                else ""
            )
            raise ValueError(
                f"codes span [{cmin}, {cmax}], outside the {'signed' if signed else 'unsigned'} "
                f"{bits}-bit range [{low}, {high}]{hint}"
            )
    if signed:
        flat = flat + 2 ** (bits - 1)
    n = flat.numel()
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte:  # 1, 2, 4, 8 bits: codes never straddle a byte
        padded = torch.zeros(
            math.ceil(n / per_byte) * per_byte, dtype=torch.uint8, device=flat.device
        )
        padded[:n] = flat.to(torch.uint8)
        slots = padded.view(-1, per_byte)
        packed = slots[:, 0].clone()
        for i in range(1, per_byte):
            packed |= slots[:, i] << (i * bits)
        return packed
    groups = math.ceil(n / 8)
    padded = torch.zeros(groups * 8, dtype=torch.int64, device=codes.device)
    padded[:n] = flat
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = torch.empty(groups, bits, dtype=torch.uint8, device=codes.device)
    for start in range(0, groups, _CHUNK_GROUPS):  # bounded int64 temporaries
        block = padded.view(groups, 8)[start : start + _CHUNK_GROUPS]
        words = (block << shifts).sum(dim=1)  # 8·bits <= 56 bits: no int64 overflow
        out[start : start + _CHUNK_GROUPS] = ((words[:, None] >> byte_shifts) & 0xFF).to(
            torch.uint8
        )
    return out.reshape(-1)[: packed_numel(n, bits)].contiguous()


def unpack(
    packed: torch.Tensor,
    bits: int,
    shape: Sequence[int] | torch.Size,
    *,
    signed: bool = False,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Inverse of ``pack``: the codes of ``shape`` (``dtype``, default int32).

    Args:
        packed: ``uint8`` from ``pack`` (any shape; read flat).
        bits: the width given to ``pack``.
        shape: the shape of the original codes.
        signed: as given to ``pack``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack takes the uint8 tensor made by pack, got {packed.dtype}")
    n = math.prod(shape)
    need = packed_numel(n, bits)
    flat = packed.reshape(-1)
    if flat.numel() != need:
        raise ValueError(
            f"{flat.numel()} packed bytes do not hold {n} codes of {bits} bits (need {need}); "
            "check bits and shape against those given to pack"
        )
    per_byte = 8 // bits if 8 % bits == 0 else 0
    mask = 2**bits - 1
    if per_byte:
        shifts8 = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = ((flat[:, None] >> shifts8) & mask).reshape(-1)[:n].to(torch.int64)
    else:
        groups = math.ceil(n / 8)
        padded = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
        padded[:need] = flat.to(torch.int64)
        byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
        shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
        codes = torch.empty(groups, 8, dtype=torch.int64, device=packed.device)
        for start in range(0, groups, _CHUNK_GROUPS):
            block = padded.view(groups, bits)[start : start + _CHUNK_GROUPS]
            words = (block << byte_shifts).sum(dim=1)
            codes[start : start + _CHUNK_GROUPS] = (words[:, None] >> shifts) & mask
        codes = codes.reshape(-1)[:n]
    if signed:
        codes = codes - 2 ** (bits - 1)
    return codes.to(dtype).reshape(tuple(shape))
