"""PyTorch's own int4 GEMM ("tinygemm") on distiq's 4-bit weights.

PyTorch ships a tensor-core W4A16 kernel: ``torch.ops.aten._weight_int4pack_mm`` (CUDA, sm80+)
with its packing op ``_convert_weight_to_int4pack``, and CPU twins with the same
``scales_and_zeros`` format (``_weight_int4pack_mm_for_cpu`` /
``_convert_weight_to_int4pack_for_cpu``). This module packs distiq's codes and qparams for them.

The affine map. distiq's W4A16 weight (``distiq.kernels.w4a16``) holds unsigned codes
``c ∈ [0, 15]`` and per-group ``scale`` s and ``zero_scaled`` zs = z·s, and decodes
``w = c·s − zs``. tinygemm treats the codes as signed int4 ``c − 8 ∈ [−8, 7]`` and decodes
``w = (c − 8)·s' + z'`` with a bf16 pair ``(s', z')`` per group and output feature. Both are
affine in ``c``; they agree for every code iff the slopes and the values at ``c = 8`` agree:

    s' = s,        z' = 8·s − zs  (= (8 − z)·s)

computed in fp32 from the stored values and rounded once to bf16 (the kernel's format).

Shapes (N = out features, K = in features, g = group size, G = K / g):
- ``scales_and_zeros``: ``(G, N, 2)`` bf16, ``[..., 0]`` = s', ``[..., 1]`` = z';
- CUDA ``packed``: ``(N/8, K/(16·inner_k_tiles), 32, inner_k_tiles/2)`` int32 (the m16n8k16
  tensor-core layout), built from a ``(N, K/2)`` uint8 tensor holding code ``2i`` in the high
  nibble and ``2i+1`` in the low one;
- CPU ``packed``: ``(N, K/2)`` uint8, built from ``(N, K)`` int32 codes.

What the kernels accept (checked in ``tinygemm_unsupported_reason``): bf16 activations; group
size 32, 64, 128 or 256; K a multiple of the group size and of 32 (the smallest packing tile,
``inner_k_tiles = 2``); N a multiple of 8 on CUDA (the n tile) and of 16 on the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
# tinygemm runs one tile of 16 rows per pass over the whole weight. Measured faster than the
# Triton GEMV and the dequantize path at 1-8 rows and far slower than dequantize + cuBLAS at 2048
# rows (benchmarks/results/cuda_kernels_h200*.json, w4a16_variants_h200.log); its time grows
# with the number of 16-row tiles, so the limit stays a few tiles below where the dequantize
# path's fixed cost would win. benchmarks/cuda_kernels.py measures the rows in between.
TINYGEMM_MAX_ROWS = 64
TINYGEMM_MIN_CAPABILITY = (8, 0)  # bf16 m16n8k16 tensor-core mma: Ampere and later


@dataclass(frozen=True)
class TinygemmWeight:
    """A 4-bit weight packed for ``_weight_int4pack_mm`` (CUDA) or its CPU twin.

    Attributes:
        packed: the device's int4 layout (see the module docstring).
        scales_and_zeros: ``(K/g, N, 2)`` bf16 pairs ``(s', z')``.
        group_size: g.
        shape: ``(N, K)``: out features, in features.
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    shape: tuple[int, int]


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero_scaled: torch.Tensor) -> torch.Tensor:
    """tinygemm's ``(s', z')`` pairs for weights decoded as ``c·scale − zero_scaled``.

    Args:
        scale: ``(G, N)`` per-group scales s (any float dtype).
        zero_scaled: ``(G, N)`` zero-point times scale, zs = z·s.

    Returns:
        ``(G, N, 2)`` bf16, contiguous: ``[..., 0] = s``, ``[..., 1] = 8·s − zs``, so that
        ``(c − 8)·s' + z' = c·s − zs`` for every code c (up to one bf16 rounding of s' and z').

    Raises:
        ValueError: if the two tensors are not 2-D of one shape.
    """
    if scale.dim() != 2 or scale.shape != zero_scaled.shape:
        raise ValueError(
            f"scale and zero_scaled must both be (groups, out_features); got "
            f"{tuple(scale.shape)} and {tuple(zero_scaled.shape)}"
        )
    s = scale.float()
    zero = 8.0 * s - zero_scaled.float()
    return torch.stack([s, zero], dim=-1).to(torch.bfloat16).contiguous()


def tinygemm_inner_k_tiles(k: int) -> int:
    """The largest packing depth (8, 4 or 2 k-tiles of 16) that divides ``k``.

    Raises:
        ValueError: if ``k`` is not a positive multiple of 32.
    """
    for tiles in (8, 4, 2):
        if k > 0 and k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"tinygemm needs in_features to be a multiple of 32; got {k}")


def tinygemm_unsupported_reason(n: int, k: int, group_size: int, device_type: str) -> str | None:
    """Why tinygemm cannot run an ``(n, k)`` weight in groups of ``group_size`` on
    ``device_type`` (``"cuda"`` or ``"cpu"``), or None when it can."""
    if device_type not in ("cuda", "cpu"):
        return f"tinygemm runs on cuda and cpu, not {device_type}"
    if group_size not in TINYGEMM_GROUP_SIZES:
        return f"group size {group_size} is not one of {TINYGEMM_GROUP_SIZES}"
    if k % group_size or k % 32:
        return f"in_features {k} is not a multiple of the group size and of 32"
    n_tile = 8 if device_type == "cuda" else 16
    if n % n_tile:
        return (
            f"out_features {n} is not a multiple of {n_tile} (tinygemm's n tile on {device_type})"
        )
    return None


def tinygemm_applies(
    device_type: str,
    dtype: torch.dtype,
    group_size: int,
    shape: tuple[int, int],
    rows: int,
    capability: tuple[int, int] | None,
) -> bool:
    """Whether ``distiq.kernels.w4a16_linear`` runs tinygemm: bf16 activations with 1 to
    ``TINYGEMM_MAX_ROWS`` rows on a CUDA device of compute ``capability`` (None: unknown or
    ROCm) at least ``TINYGEMM_MIN_CAPABILITY``, and an ``(N, K)`` weight the kernel takes."""
    return (
        device_type == "cuda"
        and dtype == torch.bfloat16
        and 0 < rows <= TINYGEMM_MAX_ROWS
        and capability is not None
        and tuple(capability) >= TINYGEMM_MIN_CAPABILITY
        and tinygemm_unsupported_reason(*shape, group_size, "cuda") is None
    )


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA ``device``; None on ROCm, whose tinygemm variant has
    other tile sizes and is not used here."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(index: int) -> tuple[int, int] | None:
    if torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability(index)


def pack_tinygemm(
    codes: torch.Tensor, scale: torch.Tensor, zero_scaled: torch.Tensor, group_size: int
) -> TinygemmWeight:
    """Pack unsigned 4-bit codes for tinygemm on the codes' device.

    Args:
        codes: ``(N, K)`` integer codes in [0, 15], on CUDA or the CPU.
        scale: ``(G, N)``; zero_scaled: ``(G, N)``; the weight is ``c·scale − zero_scaled``
            (distiq's W4A16 form).
        group_size: g, with G = K / g.

    Returns:
        A ``TinygemmWeight`` on the codes' device.

    Raises:
        ValueError: for shapes or group sizes the kernel does not take, or codes outside
            [0, 15].
    """
    n, k = codes.shape
    reason = tinygemm_unsupported_reason(n, k, group_size, codes.device.type)
    if reason is not None:
        raise ValueError(f"cannot pack this weight for tinygemm: {reason}")
    if scale.shape != (k // group_size, n):
        raise ValueError(
            f"scale must be (K/group_size, N) = {(k // group_size, n)}; got {tuple(scale.shape)}"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("tinygemm needs unsigned 4-bit codes in [0, 15]")
    scales_and_zeros = tinygemm_scales_and_zeros(scale, zero_scaled).to(codes.device)
    codes = codes.to(torch.int32).contiguous()
    if codes.is_cuda:
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()  # (N, K/2)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, tinygemm_inner_k_tiles(k))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes, tinygemm_inner_k_tiles(k)
        )
    return TinygemmWeight(packed, scales_and_zeros, group_size, (n, k))


def tinygemm_linear(
    x: torch.Tensor, weight: TinygemmWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (..., K) @ wᵀ (+ bias) -> (..., N)`` in bf16 through tinygemm.

    Raises:
        ValueError: if ``x`` is not bf16, not on the weight's device, or has the wrong width.
    """
    n, k = weight.shape
    if x.dtype != torch.bfloat16:
        raise ValueError(f"tinygemm takes bfloat16 activations; got {x.dtype}")
    if x.device != weight.packed.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {weight.packed.device}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    x2d = x.reshape(-1, k).contiguous()
    if x.is_cuda:
        mm = torch.ops.aten._weight_int4pack_mm
    else:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    out = mm(x2d, weight.packed, weight.group_size, weight.scales_and_zeros)
    if bias is not None:
        out.add_(bias)
    return out.reshape(*x.shape[:-1], n)
