"""W4A16: 4-bit weights (groupwise scale and zero-point), 16-bit activations, for decode on a GPU.

Layout of a ``W4A16Weight`` (N = out features, K = in features, G = K / group_size):
- ``packed``: ``(K/8, N)`` int32, K-major ("column-major" words, as GemLite and gpt-fast lay out
  4-bit weights): word ``[j, n]`` holds the codes of weights ``(n, 8j) .. (n, 8j+7)``, code
  ``8j+i`` in bits ``4i .. 4i+3``; codes are unsigned 0-15. Consecutive columns ``n`` are
  consecutive words, so the threads of a warp that each take one output feature read one
  contiguous, coalesced run of memory;
- ``scale``: ``(G, N)``; ``zero_scaled``: ``(G, N)`` = zero-point · scale, so that
  ``w[n, k] = codes[n, k] · scale[g, n] − zero_scaled[g, n]`` with ``g = k // group_size``
  (the same value as distiq's ``(q − z) · s``, regrouped for the kernel).

``w4a16_linear(x, weight)`` computes ``x @ wᵀ``, on one of three paths (``select_w4a16_kernel``
picks it from the device, dtype, group size, shape and row count):
- ``"tinygemm"``: PyTorch's own int4 tensor-core kernel (``distiq.kernels.tinygemm``), for bf16
  activations on an sm80+ CUDA device, group sizes 32-256, N a multiple of 8 and at most
  ``TINYGEMM_MAX_ROWS`` rows. Its packed weight and ``scales_and_zeros`` are built on the first
  such call and cached on the ``W4A16Weight`` (rebuilt if its tensors are replaced or changed in
  place); they take about as much memory again as the weight itself. The first call therefore
  allocates and launches packing kernels: make it before capturing a CUDA graph;
- ``"triton"``: distiq's own Triton GEMV below, where tinygemm does not apply (fp16 activations,
  other group sizes) and ``x`` has at most ``GEMV_MAX_ROWS`` rows (a decode step);
- ``"dequantize"``: dequantize and ``F.linear`` everywhere else (CPU, fp32, prefill): tinygemm
  re-reads and re-dequantizes the whole weight once per 16 rows, so beyond a few such tiles one
  dequantization plus a cuBLAS GEMM is the faster of the two.

The Triton kernel is ONE launch (no memset, no cast: it writes ``x.dtype`` into an
uninitialised output, bias fused) that reads the packed weights once (4 bits per weight: the
memory traffic a decode step is bound by) and folds the zero-point out of the inner loop: per
group, Σₖ wₖxₖ = s·Σₖ qₖxₖ − (z·s)·Σₖ xₖ. Two inner loops, picked per shape and row count by
the autotuner:
- FMA (``USE_DOT=0``): per word row, the 8 nibbles are turned into floats without the
  quarter-rate int→float conversion — ``MAGIC=1``: ``float(bits | 2²³) − 2²³``; ``MAGIC=2``
  (one row): one shift places two nibbles at the top of a 1.0f mantissa, no per-weight
  subtraction (see the kernel) — and multiply-added on CUDA cores; the sum over K stays in
  per-thread partial sums until the end (one cross-thread reduction per output tile);
- DOT (``USE_DOT=1``): the tile is dequantized to ``x.dtype`` codes and multiplied on tensor
  cores (``tl.dot``, rows padded to 16), so M rows cost one unpack instead of M, and Triton
  pipelines its weight loads (cp.async, ``num_stages``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from distiq.kernels.tinygemm import (
    TinygemmWeight,
    cuda_capability,
    pack_tinygemm,
    tinygemm_applies,
    tinygemm_linear,
)

GEMV_MAX_ROWS = 8
W4A16Kernel = Literal["tinygemm", "triton", "dequantize"]

# The configs the first call autotunes over (one compile and one timing each, per shape and row
# count): the winners of benchmarks/w4a16_variants.py on an NVIDIA H200
# (benchmarks/results/w4a16_variants_h200.log). One row (decode): CUDA cores, two nibbles per
# shift into a float mantissa (MAGIC=2), 16 columns per program, 1.49-1.62x bf16. Two to eight
# rows: tensor cores (USE_DOT) or a small CUDA-core tile; all of them were slower than bf16 there.
AUTOTUNE_CONFIGS: tuple[dict[str, int], ...] = (
    {"BLOCK_N": 16, "BLOCK_K": 1024, "USE_DOT": 0, "LOOP_STAGES": 3, "MAGIC": 2, "UNROLL": 1,
     "num_warps": 8, "num_stages": 1},
    {"BLOCK_N": 16, "BLOCK_K": 512, "USE_DOT": 0, "LOOP_STAGES": 1, "MAGIC": 2, "UNROLL": 8,
     "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 32, "BLOCK_K": 128, "USE_DOT": 1, "LOOP_STAGES": 1, "MAGIC": 1, "UNROLL": 1,
     "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_K": 128, "USE_DOT": 1, "LOOP_STAGES": 1, "MAGIC": 1, "UNROLL": 1,
     "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 16, "BLOCK_K": 128, "USE_DOT": 0, "LOOP_STAGES": 3, "MAGIC": 1, "UNROLL": 1,
     "num_warps": 4, "num_stages": 1},
)  # fmt: skip


@dataclass
class W4A16Weight:
    """Packed 4-bit weight; see the module docstring for the layout."""

    packed: torch.Tensor  # (K/8, N) int32
    scale: torch.Tensor  # (G, N)
    zero_scaled: torch.Tensor  # (G, N)
    group_size: int
    # (source tensors, their versions, tinygemm weight), built by the first tinygemm call
    _tinygemm: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)``: out features, in features."""
        return self.packed.shape[1], self.packed.shape[0] * 8

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
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (codes.to(torch.int64).reshape(n, k // 8, 8) << shifts).sum(-1)  # (N, K/8) in [0, 2³²)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return W4A16Weight(
        words.t().contiguous(),
        scale.t().contiguous().to(dtype),
        (zero * scale).t().contiguous().to(dtype),
        group_size,
    )


def unpack_w4a16_codes(weight: W4A16Weight) -> torch.Tensor:
    """The ``(N, K)`` int32 codes in [0, 15] that ``weight.packed`` holds."""
    shifts = torch.arange(0, 32, 4, device=weight.packed.device, dtype=torch.int32)
    codes = (weight.packed[:, None, :] >> shifts[None, :, None]) & 0xF  # (K/8, 8, N)
    return codes.reshape(-1, codes.shape[-1]).t()


def dequantize_w4a16(weight: W4A16Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(N, K)`` weight that ``weight`` encodes."""
    codes = unpack_w4a16_codes(weight).float()  # (N, K)
    g = weight.group_size
    w = codes.unflatten(-1, (-1, g)) * weight.scale.float().t()[..., None]
    w = w - weight.zero_scaled.float().t()[..., None]
    return w.reshape(codes.shape).to(dtype)


def select_w4a16_kernel(
    *,
    device_type: str,
    dtype: torch.dtype,
    group_size: int,
    shape: tuple[int, int],
    rows: int,
    capability: tuple[int, int] | None,
    triton_available: bool,
) -> W4A16Kernel:
    """The path ``w4a16_linear`` takes for ``x`` (``device_type``, ``dtype``, ``rows`` = its
    elements over K) and a weight (``group_size``, ``shape`` = (N, K)), given the CUDA device's
    ``capability`` (``cuda_capability``) and whether Triton imports. A pure function."""
    if device_type != "cuda" or rows <= 0:
        return "dequantize"
    if tinygemm_applies(device_type, dtype, group_size, shape, rows, capability):
        return "tinygemm"
    power_of_two = group_size & (group_size - 1) == 0  # Triton tiles have power-of-two sizes
    if rows <= GEMV_MAX_ROWS and power_of_two and group_size >= 16 and triton_available:
        return "triton"
    return "dequantize"


def tinygemm_weight(weight: W4A16Weight) -> TinygemmWeight:
    """``weight`` packed for tinygemm on its own device, built once and cached on ``weight``.

    The cache is rebuilt when ``packed``, ``scale`` or ``zero_scaled`` is replaced or changed in
    place (tensor version counters). Raises ``ValueError`` (from ``pack_tinygemm``) for weights
    tinygemm does not take.
    """
    sources = (weight.packed, weight.scale, weight.zero_scaled)
    versions = tuple(t._version for t in sources)
    cached = weight._tinygemm
    if (
        cached is not None
        and all(a is b for a, b in zip(cached[0], sources, strict=True))
        and cached[1] == versions
    ):
        return cached[2]
    with torch.no_grad():
        packed = pack_tinygemm(
            unpack_w4a16_codes(weight), weight.scale, weight.zero_scaled, weight.group_size
        )
    weight._tinygemm = (sources, versions, packed)
    return packed


def w4a16_linear(
    x: torch.Tensor, weight: W4A16Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (..., K) @ wᵀ (+ bias) -> (..., N)`` in ``x.dtype``, on the path
    ``select_w4a16_kernel`` picks.

    Raises:
        ValueError: if ``x`` is not on the weight's device or has the wrong width.
    """
    n, k = weight.shape
    if x.device != weight.packed.device:
        raise ValueError(
            f"x is on {x.device} but the W4A16Weight on {weight.packed.device}; move the weight "
            f"with weight.to({str(x.device)!r})"
        )
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    rows = x.numel() // k if k else 0
    kernel = select_w4a16_kernel(
        device_type=x.device.type,
        dtype=x.dtype,
        group_size=weight.group_size,
        shape=(n, k),
        rows=rows,
        capability=cuda_capability(x.device) if x.is_cuda else None,
        triton_available=x.is_cuda and _triton_kernel() is not None,
    )
    if kernel == "tinygemm":
        return tinygemm_linear(x, tinygemm_weight(weight), bias)
    if kernel == "triton":
        out = _triton_w4a16(x.reshape(rows, k), weight, bias)
        return out.reshape(*x.shape[:-1], n)
    return F.linear(x, dequantize_w4a16(weight, x.dtype), bias)


def _prune(configs, named_args, **kwargs):
    """Drop tensor-core configs whose K tile would span two groups (the dot sums a tile before the
    per-group scale), and, for several rows, CUDA-core tiles too big for registers (that path holds
    a (rows, BLOCK_K/8, BLOCK_N) partial sum per program)."""
    args = {**named_args, **kwargs}

    def fits(c) -> bool:
        if c.kwargs["USE_DOT"]:
            return c.kwargs["BLOCK_K"] <= args["GROUP"]
        return args["M"] == 1 or c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 2048

    return [c for c in configs if fits(c)] or [c for c in configs if not c.kwargs["USE_DOT"]]


@functools.cache
def _triton_kernel():
    """``(kernel, autotuned kernel)``, or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(
        x_ptr,  # (M, K), row stride stride_xm
        w_ptr,  # (K/8, N) int32, contiguous
        s_ptr,  # (G, N), contiguous
        zs_ptr,  # (G, N), contiguous
        b_ptr,  # (N,) bias, read only when HAS_BIAS
        out_ptr,  # (M, N), row stride stride_om
        M,
        N,
        stride_xm,
        stride_om,
        one_bits,  # 0x3F800000 (1.0f), a runtime value so ptxas fuses and+or into one LOP3
        K: tl.constexpr,  # constexpr: known trip count (one compile per in-features value)
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,  # 1, or GEMV_MAX_ROWS >= M (rows beyond M are masked)
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        USE_DOT: tl.constexpr,
        MAGIC: tl.constexpr = 1,  # 0: int->float cvt; 1: 0x4B000000 trick; 2: see FMA, M = 1
        LOOP_STAGES: tl.constexpr = 1,
        UNROLL: tl.constexpr = 1,
    ):
        WORDS: tl.constexpr = BLOCK_K // 8
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_w = tl.arange(0, WORDS)
        k_words = K // 8
        if USE_DOT:
            DOT_M: tl.constexpr = 16
            offs_m = tl.arange(0, DOT_M)
            # row r of a K tile holds nibble r // WORDS of word r % WORDS: k = 8 (r % W) + r // W
            offs_r = tl.arange(0, BLOCK_K)
            k_of_r = (offs_r % WORDS) * 8 + offs_r // WORDS
            shifts = tl.arange(0, 8) * 4
            acc = tl.zeros((DOT_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                w_idx = k0 // 8 + offs_w
                p = tl.load(
                    w_ptr + w_idx[:, None] * N + offs_n[None, :],
                    mask=(w_idx < k_words)[:, None] & n_mask[None, :],
                    other=0,
                )  # (W, BN)
                c = (p[None, :, :] >> shifts[:, None, None]) & 0xF  # (8, W, BN)
                if MAGIC:
                    f = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                else:
                    f = c.to(tl.float32)
                xk = k0 + k_of_r
                xt = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + xk[None, :],
                    mask=(offs_m < M)[:, None] & (xk < K)[None, :],
                    other=0.0,
                )  # (16, BK)
                wt = tl.reshape(f, (BLOCK_K, BLOCK_N)).to(xt.dtype)
                d = tl.dot(xt, wt, input_precision=DOT_PRECISION)  # (16, BN) fp32
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                zs = tl.load(zs_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                sx = tl.sum(xt.to(tl.float32), axis=1)  # (16,)
                acc += d * s[None, :] - sx[:, None] * zs[None, :]
            offs_m_out = offs_m
            result = acc
        elif BLOCK_M == 1:
            acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
            # The kernel's num_stages pipelines only loads that feed a tl.dot; LOOP_STAGES > 1
            # asks tl.range to pipeline these weight loads (cp.async), UNROLL > 1 unrolls the loop
            # so that ptxas can issue later tiles' loads early: both keep more bytes in flight.
            for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
                w_idx = k0 // 8 + offs_w
                w_mask = w_idx < k_words
                p = tl.load(
                    w_ptr + w_idx[:, None] * N + offs_n[None, :],
                    mask=w_mask[:, None] & n_mask[None, :],
                    other=0,
                )  # (W, BN)
                if MAGIC == 2:
                    # One shift serves two nibbles, which land in bits 12-15 and 16-19, the top
                    # of a float's mantissa: float(bits | 1.0) = 1 + c·2⁻¹¹ (or 1 + c·2⁻⁷), and
                    # Σ(1 + c·2⁻ᵉ)x − Σx = 2⁻ᵉ·Σcx, so no per-weight subtraction: 2.5 instead
                    # of 4 integer/float ops per weight (13+ bits of c·x survive the offset).
                    ql = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
                    qh = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
                    sxl = tl.zeros((WORDS,), dtype=tl.float32)
                    sxh = tl.zeros((WORDS,), dtype=tl.float32)
                    for j in tl.static_range(4):
                        if j < 2:
                            pj = p << (12 - 8 * j)
                        else:
                            pj = p >> (8 * j - 12)
                        lo = ((pj & 0xF000) | one_bits).to(tl.float32, bitcast=True)
                        hi = ((pj & 0xF0000) | one_bits).to(tl.float32, bitcast=True)
                        x_lo = tl.load(x_ptr + w_idx * 8 + 2 * j, mask=w_mask, other=0.0)
                        x_hi = tl.load(x_ptr + w_idx * 8 + 2 * j + 1, mask=w_mask, other=0.0)
                        x_lo = x_lo.to(tl.float32)
                        x_hi = x_hi.to(tl.float32)
                        ql += lo * x_lo[:, None]
                        qh += hi * x_hi[:, None]
                        sxl += x_lo
                        sxh += x_hi
                    q = ql * 2048.0 + qh * 128.0 - (sxl * 2048.0 + sxh * 128.0)[:, None]
                    sx = sxl + sxh
                else:
                    q = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
                    sx = tl.zeros((WORDS,), dtype=tl.float32)
                    for i in tl.static_range(8):
                        xi = tl.load(x_ptr + w_idx * 8 + i, mask=w_mask, other=0.0)
                        xi = xi.to(tl.float32)
                        c = (p >> (4 * i)) & 0xF
                        if MAGIC:
                            f = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                        else:
                            f = c.to(tl.float32)
                        q += f * xi[:, None]
                        sx += xi
                if BLOCK_K <= GROUP:  # one group per tile: one scale per column
                    g = k0 // GROUP
                    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    zs = tl.load(zs_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    acc += q * s[None, :] - sx[:, None] * zs[None, :]
                else:
                    sg = ((w_idx * 8) // GROUP)[:, None] * N + offs_n[None, :]
                    sg_mask = w_mask[:, None] & n_mask[None, :]
                    s = tl.load(s_ptr + sg, mask=sg_mask, other=0.0).to(tl.float32)
                    zs = tl.load(zs_ptr + sg, mask=sg_mask, other=0.0).to(tl.float32)
                    acc += q * s - sx[:, None] * zs
            offs_m_out = tl.arange(0, 1)
            result = tl.sum(acc, axis=0)[None, :]
        else:
            offs_m = tl.arange(0, BLOCK_M)
            m_mask = offs_m < M
            acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=LOOP_STAGES, loop_unroll_factor=UNROLL):
                w_idx = k0 // 8 + offs_w
                w_mask = w_idx < k_words
                p = tl.load(
                    w_ptr + w_idx[:, None] * N + offs_n[None, :],
                    mask=w_mask[:, None] & n_mask[None, :],
                    other=0,
                )  # (W, BN)
                q = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
                sx = tl.zeros((BLOCK_M, WORDS), dtype=tl.float32)
                for i in tl.static_range(8):
                    xi = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + w_idx[None, :] * 8 + i,
                        mask=m_mask[:, None] & w_mask[None, :],
                        other=0.0,
                    ).to(tl.float32)  # (BM, W)
                    c = (p >> (4 * i)) & 0xF
                    if MAGIC:
                        f = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    else:
                        f = c.to(tl.float32)
                    q += f[None, :, :] * xi[:, :, None]
                    sx += xi
                sg = ((w_idx * 8) // GROUP)[:, None] * N + offs_n[None, :]
                sg_mask = w_mask[:, None] & n_mask[None, :]
                s = tl.load(s_ptr + sg, mask=sg_mask, other=0.0).to(tl.float32)
                zs = tl.load(zs_ptr + sg, mask=sg_mask, other=0.0).to(tl.float32)
                acc += q * s[None, :, :] - sx[:, :, None] * zs[None, :, :]
            offs_m_out = offs_m
            result = tl.sum(acc, axis=1)
        if HAS_BIAS:
            b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            result += b[None, :]
        tl.store(
            out_ptr + offs_m_out[:, None] * stride_om + offs_n[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=(offs_m_out < M)[:, None] & n_mask[None, :],
        )

    configs = [
        triton.Config(
            {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
            num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )
        for c in AUTOTUNE_CONFIGS
    ]
    tuned = triton.autotune(
        configs=configs,
        key=["M", "N", "K", "GROUP"],
        prune_configs_by={"early_config_prune": _prune},
    )(kernel)
    return kernel, tuned


def _triton_w4a16(
    x: torch.Tensor,
    weight: W4A16Weight,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x (M, K)``, M small -> ``(M, N)`` in ``x.dtype``. ``config`` fixes the meta-parameters
    (``BLOCK_N``, ``BLOCK_K``, ``USE_DOT``; optionally ``MAGIC``, ``LOOP_STAGES``, ``UNROLL``,
    ``num_warps``, ``num_stages``)
    instead of autotuning (the tests run the kernel in Triton's interpreter on the CPU; the
    variant benchmark sweeps them)."""
    import triton

    raw, tuned = _triton_kernel()
    n, k = weight.shape
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects {k}")
    if config is not None and config.get("USE_DOT") and config["BLOCK_K"] > weight.group_size:
        raise ValueError(
            f"USE_DOT needs BLOCK_K ({config['BLOCK_K']}) <= group_size ({weight.group_size})"
        )
    if not all(t.is_contiguous() for t in (weight.packed, weight.scale, weight.zero_scaled)):
        raise ValueError("the W4A16Weight's tensors must be contiguous (as pack_w4a16 makes them)")
    x = x.contiguous()
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    (raw if config is not None else tuned)[grid](
        x,
        weight.packed,
        weight.scale,
        weight.zero_scaled,
        out if bias is None else bias,
        out,
        m,
        n,
        x.stride(0),
        out.stride(0),
        0x3F800000,
        K=k,
        GROUP=weight.group_size,
        BLOCK_M=1 if m == 1 else GEMV_MAX_ROWS,  # two variants to compile, not one per row count
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **(config or {}),
    )
    return out
