"""Masked reductions shared by every loss in ``distiq.distill``.

Every loss first computes one value per *position* (a token, a patch, a pixel, an attention row),
then reduces with :func:`reduce_masked`:

- ``"mean"`` (default): sum over valid positions / number of valid positions — the token mean.
  Numbers do not change with sequence length or padding. An all-masked input gives 0, not NaN.
- ``"sum"``: sum over valid positions.
- ``"batchmean"``: sum over valid positions / ``values.shape[0]`` (the batch size), as
  ``torch.nn.functional.kl_div(reduction="batchmean")`` does. For ``(B, T)`` positions with ``n``
  valid tokens, ``batchmean == mean * n / B``; for 2-D logits ``(N, V)`` without a mask the two
  agree.
- ``"none"``: the per-position values, with masked positions set to 0.

With ``weights`` (relative per-position weights, e.g. visual vs text tokens), ``"mean"`` is the
weighted mean ``Σ w·v / Σ w`` over valid positions and ``"sum"`` / ``"batchmean"`` use ``Σ w·v``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "batchmean", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "batchmean", "none")


def check_reduction(reduction: str) -> None:
    """Raise a ``ValueError`` naming the allowed reductions when ``reduction`` is not one."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not supported; use one of {', '.join(REDUCTIONS)}"
        )


def _as_mask(mask: Tensor | None, shape: torch.Size, what: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != shape:
        try:
            mask = mask.expand(shape)
        except RuntimeError:
            raise ValueError(
                f"{what} has shape {tuple(mask.shape)} but the loss has one value per position "
                f"of shape {tuple(shape)}; pass a mask with the positions' shape (the logits' "
                "shape without the last, class dimension)"
            ) from None
    return mask if mask.dtype == torch.bool else mask != 0


def reduce_masked(
    values: Tensor,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
    *,
    weights: Tensor | None = None,
) -> Tensor:
    """Reduce per-position loss ``values`` over the positions where ``mask`` is true.

    Args:
        values: per-position losses, any shape ``(...)`` (at least 1-D for ``batchmean``).
        mask: ``(...)`` bool (or 0/1) tensor of valid positions, broadcastable to ``values``;
            None means every position is valid. Masked positions contribute exactly nothing
            (``torch.where``, so a NaN or inf there does not leak into the result).
        reduction: ``"mean"``, ``"sum"``, ``"batchmean"`` or ``"none"`` (see the module doc).
        weights: optional ``(...)`` non-negative relative weights per position.

    Returns:
        A scalar tensor, or ``values``' shape for ``"none"``.
    """
    check_reduction(reduction)
    valid = _as_mask(mask, values.shape, "mask")
    if weights is not None:
        if weights.shape != values.shape:
            weights = weights.expand(values.shape)
        values = values * weights
    if valid is not None:
        values = torch.where(valid, values, values.new_zeros(()))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        if values.dim() == 0:
            return total
        return total / values.shape[0]
    # mean over valid positions (weighted mean when weights are given)
    if weights is not None:
        denom = weights if valid is None else torch.where(valid, weights, weights.new_zeros(()))
        return total / denom.sum().clamp_min(torch.finfo(values.dtype).tiny)
    if valid is None:
        return total / max(values.numel(), 1)
    return total / valid.sum().clamp_min(1).to(values.dtype)
