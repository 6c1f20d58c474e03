"""llama.cpp's block formats that hold distiq's integer grids exactly: ``Q4_0``, ``Q5_0``, ``Q8_0``.

ggml stores a quantized matrix row by row in blocks of 32 consecutive input columns. The three
"type 0" formats (ggml-common.h, gguf-py ``quants.py``) each hold one float16 scale ``d`` per
block and a signed code ``c`` per weight, the weight being ``c · d`` (float32 arithmetic):

    Q4_0   18 bytes: d, then 16 bytes of nibbles q = c + 8 in 0..15: byte j holds weight j in
           its low nibble and weight j + 16 in its high nibble                c in [-8, 7]
    Q5_0   22 bytes: d, qh (a little-endian uint32 whose bit j is bit 4 of weight j), then the
           low nibbles of q = c + 16 laid out as in Q4_0                      c in [-16, 15]
    Q8_0   34 bytes: d, then 32 int8 codes                                     c in [-128, 127]

distiq's integer grid (``distiq.quant.functional``) gives ``Ŵ = (q − z) · s``. A layer is held
*exactly* — code for code, bit for bit — in the smallest of these formats whose code range
contains ``q − z`` when

- its format is ``int`` with a symmetric grid (z fixed at the centre: signed codes
  ``[-2^(b-1), 2^(b-1) - 1]``) of 2-4 bits (Q4_0), 5 bits (Q5_0) or 6-8 bits (Q8_0), or an
  asymmetric grid (``q − z`` in ``[-(2^b - 1), 2^b - 1]``) of 2-3 bits (Q4_0), 4 bits (Q5_0) or
  5-7 bits (Q8_0);
- its scale is constant over each block of 32 input columns: per tensor, per output channel
  (``per_channel(0)``) or per group of a multiple of 32 (no act-order ``g_idx``), with the
  number of input columns a multiple of 32;
- every scale is a float16 value (``scale_dtype: float16`` guarantees it).

Then ``c · d`` is the same float32 product as distiq's ``(q − z) · s`` (a code of at most 8 bits
times an 11-bit significand is exact in float32), so llama.cpp's dequantized weight *is* the
evaluated weight. Symmetric 4-bit per-group(32) float16 weights are Q4_0's own grid and
symmetric 8-bit ones Q8_0's; the other grids are held exactly in a wider block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distiq.quant import QuantSpec
from distiq.quant.spec import PerChannel, PerGroup, PerTensor

BLOCK = 32
"""Weights per ggml block (QK4_0 = QK5_0 = QK8_0)."""


@dataclass(frozen=True)
class BlockFormat:
    """One llama.cpp block format: its ggml type name, signed code range and block bytes."""

    name: str
    code_min: int
    code_max: int
    block_bytes: int


Q4_0 = BlockFormat("Q4_0", -8, 7, 18)
Q5_0 = BlockFormat("Q5_0", -16, 15, 22)
Q8_0 = BlockFormat("Q8_0", -128, 127, 34)
FORMATS = (Q4_0, Q5_0, Q8_0)

EXACT_GRIDS = (
    "int, symmetric, 2-4 bits -> Q4_0 (4-bit: its own grid)",
    "int, symmetric, 5 bits -> Q5_0",
    "int, symmetric, 6-8 bits -> Q8_0 (8-bit: its own grid)",
    "int, asymmetric, 2-3 bits -> Q4_0; 4 bits -> Q5_0; 5-7 bits -> Q8_0",
    "each with per_tensor, per_channel(0) or per_group(32 * k) scales stored as float16 "
    "(scale_dtype: float16) and input features a multiple of 32",
)
"""The grids llama.cpp holds exactly, as the error messages and docs list them."""


class GridError(ValueError):
    """A quantized layer whose grid no llama.cpp block format holds exactly."""


def code_range(spec: QuantSpec) -> tuple[int, int]:
    """The range of ``q − z`` over every weight a layer of ``spec`` can hold."""
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        return -half, half - 1
    span = 2**spec.bits - 1
    return -span, span


def block_format(spec: QuantSpec) -> BlockFormat | None:
    """The smallest block format whose code range holds ``spec``'s grid, or None."""
    if spec.format != "int":
        return None
    low, high = code_range(spec)
    return next((f for f in FORMATS if f.code_min <= low and high <= f.code_max), None)


def spec_problem(spec: QuantSpec, in_features: int) -> str | None:
    """Why a ``(out, in_features)`` weight of ``spec`` has no exact llama.cpp block form (None
    when it has one; the float16 check of the scales themselves happens on the values)."""
    if spec.format != "int":
        return f"format {spec.format!r} has no llama.cpp block equivalent"
    if block_format(spec) is None:
        return (
            f"{spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} codes span "
            f"{code_range(spec)}, more than Q8_0's [-128, 127]"
        )
    g = spec.granularity
    if isinstance(g, PerChannel) and g.axis % 2 != 0:
        return "per_channel(1) scales vary along the input columns inside a block"
    if isinstance(g, PerGroup) and g.size % BLOCK:
        return f"per_group({g.size}) does not split into llama.cpp's blocks of {BLOCK}"
    if not isinstance(g, PerTensor | PerChannel | PerGroup):
        return f"granularity {g!r} is not a weight granularity llama.cpp stores"
    if in_features % BLOCK:
        return f"{in_features} input features are not a multiple of {BLOCK}"
    return None


@dataclass
class BlockWeight:
    """A weight matrix on a llama.cpp block grid: ``W = codes · scales`` blockwise.

    Attributes:
        codes: int16 ``(rows, cols)`` signed codes ``q − z``.
        scales: float32 ``(rows, cols // 32)``: each block's scale, a float16 value.
        fmt: the block format that holds the codes.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: BlockFormat

    def take_rows(self, index: torch.Tensor | slice) -> BlockWeight:
        """The rows ``index`` (a slice or a permutation), same format."""
        return BlockWeight(self.codes[index], self.scales[index], self.fmt)

    def dequantize(self) -> torch.Tensor:
        """float32 ``(rows, cols)``: ``c · d`` per block, as ggml computes it."""
        rows, cols = self.codes.shape
        blocks = self.codes.reshape(rows, cols // BLOCK, BLOCK).to(torch.float32)
        return (blocks * self.scales[..., None]).reshape(rows, cols)

    def pack(self) -> np.ndarray:
        """uint8 ``(rows, cols // 32 * block_bytes)``: the ggml blocks of each row."""
        rows, cols = self.codes.shape
        n_blocks = cols // BLOCK
        scale = self.scales.numpy().astype(np.float16).view(np.uint8).reshape(rows, n_blocks, 2)
        codes = self.codes.numpy().astype(np.int32).reshape(rows, n_blocks, BLOCK)
        if self.fmt is Q8_0:
            body = [codes.astype(np.int8).view(np.uint8)]
        else:
            q = (codes - self.fmt.code_min).astype(np.uint8)  # 0..15 (Q4_0) or 0..31 (Q5_0)
            nibbles = (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)
            body = [nibbles]
            if self.fmt is Q5_0:  # bit 4 of weight j -> bit j of a little-endian uint32
                body.insert(0, np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
        block = np.concatenate([scale, *body], axis=-1)
        assert block.shape[-1] == self.fmt.block_bytes
        return np.ascontiguousarray(block.reshape(rows, n_blocks * self.fmt.block_bytes))


def _per_column(values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """QParams ``(1, 1)``, ``(rows, 1)`` or ``(rows, G, 1)`` expanded to ``(rows, cols)``."""
    if values.dim() == 3:  # per group: (rows, G, 1)
        groups = values.shape[1]
        return values.expand(rows, groups, cols // groups).reshape(rows, cols)
    return values.expand(rows, cols)


def to_blocks(name: str, codes, scale, zero_point, spec: QuantSpec, g_idx=None) -> BlockWeight:
    """A quantized ``(out, in)`` weight as a :class:`BlockWeight`, checked to be exact.

    Args:
        name: the layer's name (for messages).
        codes: int ``(out, in)`` codes ``q``.
        scale, zero_point: float32 ``QParams`` of ``codes`` (``distiq.quant.functional``).
        spec: the layer's weight spec.
        g_idx: act-order group index (refused unless None).

    Raises:
        GridError: the grid has no exact llama.cpp form (the message says why and lists the
            grids that do).
    """
    rows, cols = codes.shape
    problem = spec_problem(spec, cols)
    if problem is None and g_idx is not None:
        problem = "act-order (g_idx) groups are not contiguous blocks of columns"
    if problem is None:
        scales = _per_column(scale.float(), rows, cols)
        zeros = _per_column(zero_point.float(), rows, cols)
        signed = codes.to(torch.float32) - zeros
        blocks = scales.reshape(rows, cols // BLOCK, BLOCK)
        fmt = block_format(spec)
        if not torch.equal(blocks, blocks[..., :1].expand_as(blocks)):
            problem = "its scales change inside a block of 32 columns"
        elif not torch.equal(signed, signed.round()):
            problem = "its zero-points are not integers"
        elif signed.min() < fmt.code_min or signed.max() > fmt.code_max:
            problem = f"its codes leave {fmt.name}'s range [{fmt.code_min}, {fmt.code_max}]"
        else:
            block_scales = blocks[..., 0].contiguous()
            half = block_scales.to(torch.float16)
            if not (torch.isfinite(half).all() and torch.equal(half.float(), block_scales)):
                problem = (
                    "its scales are not float16 values (train with scale_dtype: float16 so "
                    "llama.cpp's float16 block scales hold them exactly)"
                )
            else:
                return BlockWeight(signed.to(torch.int16), block_scales, fmt)
    raise GridError(
        f"layer {name!r} ({spec.bits}-bit {spec.format}, "
        f"{'symmetric' if spec.symmetric else 'asymmetric'}, {spec.granularity._to_config()}): {problem}. "
        "llama.cpp holds these grids exactly: " + "; ".join(EXACT_GRIDS)
    )
