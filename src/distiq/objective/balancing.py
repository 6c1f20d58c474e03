"""Automatic balancing of the objective's terms by learned uncertainty (Kendall et al., 2018).

Each balanced term ``i`` gets a learned log-variance ``s_i`` (initialised to 0, i.e. factor 1) and
contributes

    λ_i(t) · (exp(−s_i) · L_i + s_i)

instead of ``λ_i(t) · L_i``. The scheduled weight ``λ_i(t)`` multiplies both parts, so a term that
is switched off (``λ = 0`` during a warm-up) gets no gradient on ``s_i`` and cannot drift. For a
fixed ``L_i`` the optimum is ``s_i = log L_i``: each term is scaled toward the same magnitude,
``exp(−s_i) L_i → 1``. The factors ``exp(−s_i)`` and the ``s_i`` are returned in
``LossOutput.weights`` / ``LossOutput.extras`` so that they appear in the training logs. Terms
that can be negative (``qk_entropy``) or are tiny regularisers (``rounding``) keep fixed weights:
with ``L_i < 0`` the optimum would be ``s_i → −∞``.

The ``s_i`` are parameters of the objective: train them with the student (the objective's
``parameters()``), without weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class UncertaintyWeighting(nn.Module):
    """Learned log-variances ``s_i``, one per term name."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.log_vars = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in names})

    def __contains__(self, name: object) -> bool:
        return name in self.log_vars

    def combine(self, name: str, loss: Tensor, weight: float) -> tuple[Tensor, Tensor]:
        """``weight · (exp(−s) · loss + s)`` and the effective factor ``weight · exp(−s)``
        (a detached scalar tensor: no device sync here)."""
        s = self.log_vars[name]
        s = s.to(loss.dtype) if s.dtype != loss.dtype else s
        factor = torch.exp(-s)
        return weight * (factor * loss + s), weight * factor.detach()
