"""W4A16: 4-bit weights (groupwise scale and zero-point), 16-bit activations, for decode on a GPU.

Layout of a ``W4A16Weight`` (N = out features, K = in features, G = K / group_size):
- ``packed``: ``(N, K/2)`` uint8; byte ``j`` of a row holds code ``2j`` in its low nibble and code
  ``2j+1`` in its high nibble; codes are unsigned 0-15;
- ``scale``: ``(N, G)``; ``zero_scaled``: ``(N, G)`` = zero-point · scale, so that
  ``w[n, k] = codes[n, k] · scale[n, g] − zero_scaled[n, g]`` with ``g = k // group_size``
  (the same value as distiq's ``(q − z) · s``, regrouped for the kernel).

``w4a16_linear(x, weight)`` computes ``x @ wᵀ``. With a CUDA device, Triton, and at most
``GEMV_MAX_ROWS`` rows of ``x`` (a decode step), it runs the Triton kernel below, which reads the
packed weights once (4 bits per weight: the memory traffic a decode step is bound by) and folds the
zero-point out of the inner loop: per group, Σₖ wₖxₖ = s·Σₖ qₖxₖ − (z·s)·Σₖ xₖ. Otherwise (CPU,
prefill) it dequantizes and calls ``F.linear`` — on a GPU a prefill is compute-bound, so the one
extra pass over the weights costs little there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GEMV_MAX_ROWS = 8


@dataclass
class W4A16Weight:
    """Packed 4-bit weight; see the module docstring for the layout."""

    packed: torch.Tensor  # (N, K/2) uint8
    scale: torch.Tensor  # (N, G)
    zero_scaled: torch.Tensor  # (N, G)
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def to(self, device: torch.device | str) -> W4A16Weight:
        return W4A16Weight(
            self.packed.to(device),
            self.scale.to(device),
            self.zero_scaled.to(device),
            self.group_size,
        )


def pack_w4a16(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float16,
) -> W4A16Weight:
    """Pack unsigned 4-bit ``codes (N, K)`` with per-group ``scale`` and ``zero_point``
    (each ``(N, G)`` or ``(N, G, 1)``, distiq's ``PerGroup`` qparams) for ``w4a16_linear``."""
    n, k = codes.shape
    if k % group_size or group_size % 8:
        raise ValueError(
            f"in_features {k} must be divisible by group_size {group_size}, and group_size by 8"
        )
    if codes.min() < 0 or codes.max() > 15:
        raise ValueError(
            "W4A16 needs unsigned 4-bit codes in [0, 15] (an asymmetric or unsigned spec)"
        )
    scale = scale.reshape(n, k // group_size).float()
    zero = zero_point.reshape(n, k // group_size).float()
    c = codes.to(torch.uint8)
    packed = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()
    return W4A16Weight(packed, scale.to(dtype), (zero * scale).to(dtype), group_size)


def dequantize_w4a16(weight: W4A16Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(N, K)`` weight that ``weight`` encodes."""
    p = weight.packed
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1).float()  # (N, K)
    g = weight.group_size
    w = codes.unflatten(-1, (-1, g)) * weight.scale.float()[..., None]
    w = w - weight.zero_scaled.float()[..., None]
    return w.reshape(codes.shape).to(dtype)


def w4a16_linear(
    x: torch.Tensor, weight: W4A16Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (..., K) @ wᵀ (+ bias) -> (..., N)`` in ``x.dtype``."""
    rows = x.numel() // x.shape[-1]
    group = weight.group_size
    power_of_two = group & (group - 1) == 0  # Triton tiles have power-of-two sizes
    if x.is_cuda and rows <= GEMV_MAX_ROWS and power_of_two and _triton_kernel() is not None:
        out = _triton_w4a16(x.reshape(rows, x.shape[-1]), weight).reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias
    return F.linear(x, dequantize_w4a16(weight, x.dtype), bias)


@functools.cache
def _triton_kernel():
    """``(kernel, autotuned kernel)``, or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    configs = [
        triton.Config({"BLOCK_N": bn, "GROUPS_PER_BLOCK": gpb, "SPLIT_K": sk}, num_warps=w)
        for bn in (8, 16, 32)
        for gpb in (1, 2)
        for sk in (1, 2, 4)
        for w in (2, 4)
    ]

    @triton.jit
    def kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        zs_ptr,
        out_ptr,
        N,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_om,
        N_GROUPS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUPS_PER_BLOCK: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        # The packed weight is read as int32 words: word j of a row holds codes 8j..8j+7,
        # code 8j+i in bits 4i..4i+3 (little-endian bytes, low nibble first).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        WORDS: tl.constexpr = GROUP // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_g = tl.arange(0, GROUPS_PER_BLOCK)
        offs_w = tl.arange(0, WORDS)
        offs_i = tl.arange(0, 8)
        shifts = offs_i * 4
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for it in range(0, tl.cdiv(N_GROUPS, GROUPS_PER_BLOCK * SPLIT_K)):
            groups = (it * SPLIT_K + pid_k) * GROUPS_PER_BLOCK + offs_g  # (GPB,)
            g_mask = groups < N_GROUPS
            word = groups[:, None] * WORDS + offs_w[None, :]  # (GPB, WORDS)
            p = tl.load(
                w_ptr + offs_n[:, None, None] * stride_wn + word[None, :, :],
                mask=n_mask[:, None, None] & g_mask[None, :, None],
                other=0,
            )  # (BN, GPB, WORDS) int32
            codes = (p[:, :, :, None] >> shifts[None, None, None, :]) & 0xF  # (BN, GPB, WORDS, 8)
            k_idx = word[:, :, None] * 8 + offs_i[None, None, :]  # (GPB, WORDS, 8)
            x = tl.load(x_ptr + pid_m * stride_xm + k_idx, mask=g_mask[:, None, None], other=0.0)
            x = x.to(tl.float32)
            qx = tl.sum(
                tl.sum(codes.to(tl.float32) * x[None, :, :, :], axis=3), axis=2
            )  # (BN, GPB)
            sx = tl.sum(tl.sum(x, axis=2), axis=1)  # (GPB,)
            sg = offs_n[:, None] * stride_sn + groups[None, :]
            sg_mask = n_mask[:, None] & g_mask[None, :]
            s = tl.load(s_ptr + sg, mask=sg_mask, other=0.0).to(tl.float32)
            zs = tl.load(zs_ptr + sg, mask=sg_mask, other=0.0).to(tl.float32)
            acc += tl.sum(s * qx - zs * sx[None, :], axis=1)
        out = out_ptr + pid_m * stride_om + offs_n
        if SPLIT_K == 1:
            tl.store(out, acc, mask=n_mask)
        else:
            tl.atomic_add(out, acc, mask=n_mask)

    tuned = triton.autotune(
        configs=configs, key=["N", "N_GROUPS", "GROUP"], reset_to_zero=["out_ptr"]
    )(kernel)
    return kernel, tuned


def _triton_w4a16(x: torch.Tensor, weight: W4A16Weight, config: dict | None = None) -> torch.Tensor:
    """``x (M, K)``, M small -> ``(M, N)`` in ``x.dtype``. ``config`` fixes the meta-parameters
    (``BLOCK_N``, ``GROUPS_PER_BLOCK``, ``SPLIT_K``) instead of autotuning (used by the tests,
    which run the kernel in Triton's interpreter on the CPU)."""
    import triton

    raw, tuned = _triton_kernel()
    kernel = tuned if config is None else raw
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects {k}")
    x = x.contiguous()
    words = weight.packed.view(torch.int32)  # (N, K/8): 8 codes per word
    out = torch.zeros(x.shape[0], n, device=x.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), x.shape[0], meta["SPLIT_K"])

    kernel[grid](
        x,
        words,
        weight.scale,
        weight.zero_scaled,
        out,
        n,
        x.stride(0),
        words.stride(0),
        weight.scale.stride(0),
        out.stride(0),
        N_GROUPS=k // weight.group_size,
        GROUP=weight.group_size,
        **(config or {}),
    )
    return out.to(x.dtype)
