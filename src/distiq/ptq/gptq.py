"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), Algorithm 1.

Columns of ``W (out, in)`` are quantized one at a time; the error of column ``i`` is spread over
the not-yet-quantized columns through the upper Cholesky factor ``U`` of the damped inverse
Hessian (``Uᵀ U = (H + λ I)⁻¹``, ``λ = damp · mean(diag H)``):

    err_i    = (w_i − q_i) / U[i, i]
    w_j     −= err_i · U[i, j]          for j > i

Updates inside a block of ``block_size`` columns are applied at once (rank-1 per column); the
updates of the columns after the block are batched into one matmul per block ("lazy batch
updates"). Options: per-group parameters (computed from the group's current, error-updated
columns when the quantizer reaches the group), act-order (columns in order of decreasing
``diag H``, with ``g_idx`` giving each column's group), static groups (group parameters from the
original weight, before any update).

Implementation notes: the weight is processed transposed (``(in, out)``) so that a column is a
contiguous row; ``U`` is computed as ``J L⁻¹ J`` with ``L`` the Cholesky factor of ``J H J``
(``J`` reverses the order): one Cholesky (n³/3 flops) and one triangular inverse by halves
(≈ n³/2, mostly matmuls) instead of the reference's Cholesky, ``cholesky_inverse`` and second
Cholesky (≈ 4n³/3); the same matrix in exact arithmetic. Group parameters are computed from the
group's columns with every update so far applied (inside the current block and the block's
pending lazy update beyond it), so the result equals Algorithm 1 without lazy batching.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

from distiq.ptq.result import (
    PTQResult,
    check_finite,
    check_hessian,
    matrix_spec,
    reconstruction_error,
    weight_matrix,
)
from distiq.quant.functional import choose_qparams, dequantize, quantize
from distiq.quant.spec import PerChannel, PerGroup, QuantSpec

logger = logging.getLogger(__name__)

#: The damping is multiplied by this factor after each failed Cholesky ...
DAMP_GROWTH = 10.0
#: ... until it exceeds this (relative to the mean diagonal); then GPTQ gives up.
MAX_DAMP = 10.0


def lower_triangular_inverse(lower: torch.Tensor, base: int = 256) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``(n, n)`` matrix, by halves:
    ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]`` — about n³/2 flops, mostly in matmuls
    (a triangular solve against the identity takes n³)."""
    n = lower.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    h = n // 2
    out = torch.zeros_like(lower)
    out[:h, :h] = inv_a = lower_triangular_inverse(lower[:h, :h], base)
    out[h:, h:] = inv_c = lower_triangular_inverse(lower[h:, h:], base)
    out[h:, :h] = (inv_c @ lower[h:, :h]) @ inv_a
    out[h:, :h].neg_()
    return out


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ I)⁻¹`` with ``λ = damp · mean(diag H)``.

    A Hessian that is not positive definite (singular, or indefinite from rounding) is retried
    with the damping multiplied by ``DAMP_GROWTH`` each time, with a warning, up to
    ``MAX_DAMP``.

    Args:
        hessian: ``(in, in)``, symmetric, no zero diagonal entries (dead inputs already fixed).
        damp: relative damping (GPTQ's ``percdamp``, 0.01 = 1 %).

    Returns:
        ``(U, damp_used)``: ``U`` upper triangular ``(in, in)``, ``Uᵀ U = (H + λ I)⁻¹``.
    """
    mean_diag = hessian.diagonal().mean()
    flipped = hessian.flip((0, 1))  # J H J (a copy, damped in place below)
    diagonal = flipped.diagonal()
    undamped = diagonal.clone()
    requested = damp
    while True:
        diagonal.copy_(undamped + damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(flipped)  # J (H + λI) J = L Lᵀ
        if int(info) == 0:
            upper = lower_triangular_inverse(lower).flip((0, 1))  # U = J L⁻¹ J
            if torch.isfinite(upper).all():
                if damp != requested:
                    logger.info("GPTQ: damping raised from %g to %g", requested, damp)
                return upper, damp
        del lower
        next_damp = damp * DAMP_GROWTH if damp > 0 else 1e-4
        if next_damp > MAX_DAMP:
            raise ValueError(
                f"the Hessian stays singular with damping {damp:g} × mean(diag H); it is "
                "degenerate: check the calibration inputs of this layer (are they all equal?)"
            )
        warnings.warn(
            f"GPTQ: the Hessian is not positive definite with damping {damp:g}; "
            f"retrying with {next_damp:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        damp = next_damp


def _group_qparams(columns: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point ``(out, 1, 1)`` of one group ``columns (out, g)``, one per row."""
    group_spec = spec.replace(granularity=PerGroup(columns.shape[1]))
    scale, zero_point = choose_qparams(columns, group_spec, check_finite=False)
    return scale, zero_point


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    compute_error: bool = True,
) -> PTQResult:
    """Quantize ``weight`` with GPTQ given the Hessian of its layer's inputs.

    Args:
        weight: ``W (out_features, in_features)``, or a convolution weight ``(out, C, kh, kw)``
            (quantized as its ``(out, C·kh·kw)`` matrix: the Hessian is that of the unfolded
            inputs). float64 weights are processed in float64, others in float32.
        hessian: ``H = 2/n Σ x xᵀ`` over the n calibration inputs, ``(in, in)``.
        spec: weight spec: ``PerTensor()``, ``PerChannel(0)`` or ``PerGroup(g)``; its observer
            (minmax / mse / percentile) chooses each row's or group's range.
        block_size: columns per lazy-update block.
        damp: damping relative to the mean of ``diag H``; raised step by step (with a warning)
            while ``H`` is not positive definite.
        act_order: quantize columns in order of decreasing ``diag H``.
        static_groups: per-group parameters from the original weight (before GPTQ's updates),
            so that groups stay contiguous under act-order.
        compute_error: compute ``error`` / ``relative_error`` (two extra ``out × in × in``
            matmuls).

    Returns:
        A ``PTQResult``; ``weight`` has the input's shape and dtype, ``codes`` are in the
        input's column order. Inputs with ``H[i, i] = 0`` (dead) get a zero weight column.
    """
    start = time.perf_counter()
    matrix = weight_matrix(weight)
    spec = matrix_spec(spec, matrix)
    out_features, in_features = matrix.shape
    check_finite(matrix, "the weight")
    check_hessian(hessian, in_features)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0 (a fraction of the mean Hessian diagonal), got {damp}")
    group_size = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None
    if static_groups and group_size is None:
        raise ValueError("static_groups=True needs a per-group spec (granularity=PerGroup(size))")

    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        W = matrix.to(dtype).clone()  # (out, in)
        H = hessian.to(device=W.device, dtype=dtype)  # (in, in)
        dead = H.diagonal() == 0
        if dead.any():
            H = H.clone()
            H[dead, dead] = 1.0
            W[:, dead] = 0.0

        # One column (out,) at a time: int columns as (out, 1) per channel, nf4 (a blockwise
        # format) as groups of 1; `shape` is the qparam shape for a column (out, 1).
        if spec.format == "int":
            column_spec, shape = spec.replace(granularity=PerChannel(0)), (out_features, 1)
        else:
            column_spec, shape = spec.replace(granularity=PerGroup(1)), (out_features, 1, 1)
        if group_size is None:  # one scale per row (or for the tensor) for every column
            scale, zero_point = choose_qparams(W, spec, check_finite=False)  # (out | 1, 1)
            current = (scale.expand(shape), zero_point.expand(shape))
        elif static_groups:  # (out, n_groups, 1) from the original weight
            scale, zero_point = choose_qparams(W, spec, check_finite=False)
        else:  # (out, n_groups, 1), filled when the quantizer reaches each group
            scale = torch.empty(out_features, in_features // group_size, 1, device=W.device)
            zero_point = torch.empty_like(scale)

        perm = None
        if act_order:
            perm = torch.argsort(H.diagonal(), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        U, damp_used = inverse_hessian_factor(H, damp)  # (in, in) upper
        del H
        Wt = W.t().contiguous()  # (in, out): column i of W is the contiguous row Wt[i]
        del W
        Qt = torch.empty_like(Wt)
        codes_t = torch.empty(in_features, out_features, dtype=torch.int32, device=Wt.device)
        group_of_position = None
        if group_size is not None:
            position = torch.arange(in_features, device=Wt.device)
            source = perm if (perm is not None and static_groups) else position
            group_of_position = (source // group_size).tolist()

        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1 = Wt[i1:i2]  # (B, out), a view: updated in place
            U1 = U[i1:i2, i1:i2]
            inv_diag = U1.diagonal().reciprocal()
            Err1 = torch.empty_like(W1)
            codes_block, q_block = [], []
            for i in range(i2 - i1):
                col = i1 + i
                if group_size is not None:
                    if static_groups:
                        g = group_of_position[col]
                        current = (scale[:, g].reshape(shape), zero_point[:, g].reshape(shape))
                    elif col % group_size == 0:
                        g = col // group_size
                        group = _current_columns(Wt, U, Err1, i1, i2, col, col + group_size)
                        s, z = _group_qparams(group.t(), spec)  # (out, 1, 1)
                        scale[:, g : g + 1], zero_point[:, g : g + 1] = s, z
                        current = (s.reshape(shape), z.reshape(shape))
                w = W1[i]  # (out,)
                c = quantize(w.view(-1, 1), current[0], current[1], column_spec)  # (out, 1)
                q = dequantize(c, current[0], current[1], column_spec, dtype=dtype).view(-1)
                codes_block.append(c)
                q_block.append(q)
                err = torch.sub(w, q, out=Err1[i]).mul_(inv_diag[i])  # (w − q) / U[i, i]
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
            codes_t[i1:i2] = torch.stack(codes_block).view(i2 - i1, out_features)
            Qt[i1:i2] = torch.stack(q_block)
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy batch update

        codes = codes_t.t()
        quantized = Qt.t()
        g_idx = None
        if perm is not None:
            inverse = torch.argsort(perm)
            codes = codes[:, inverse]
            quantized = quantized[:, inverse]
            if group_size is not None:
                g_idx = torch.tensor(group_of_position, device=Wt.device)[inverse]
                g_idx = g_idx.to(torch.int32)
        result = PTQResult(
            weight=quantized.reshape(weight.shape).to(weight.dtype),
            codes=codes.contiguous(),
            scale=scale,
            zero_point=zero_point,
            spec=spec,
            g_idx=g_idx,
            damp=damp_used,
        )
        if compute_error:
            result.error, result.relative_error = reconstruction_error(matrix, quantized, hessian)
    result.seconds = time.perf_counter() - start
    return result


def _current_columns(
    Wt: torch.Tensor, U: torch.Tensor, Err1: torch.Tensor, i1: int, i2: int, lo: int, hi: int
) -> torch.Tensor:
    """Rows ``lo:hi`` of ``Wt`` (weight columns) with every update so far applied: inside the
    block ``i1:i2`` they are current; after it, the block's pending lazy update (from the columns
    ``i1:lo`` quantized so far) is added here. Returns ``(hi − lo, out)``."""
    inside = Wt[lo : min(hi, i2)]
    if hi <= i2:
        return inside
    pending = U[i1:lo, i2:hi].t() @ Err1[: lo - i1]  # (hi − i2, out)
    return torch.cat([inside, Wt[i2:hi] - pending])
