"""Hessians ``H = 2/n Σ x xᵀ`` of a layer's inputs, accumulated batch by batch.

For ``nn.Linear`` the rows ``x`` are the input's last dimension (every token of every sequence is
one row). For ``nn.Conv2d`` they are the unfolded input patches (``F.unfold``: ``C·kh·kw``
features per output position), the columns of the flattened weight ``(out, C·kh·kw)``, so that
``conv(x) = W_flat @ unfold(x)``; padding (any mode), stride and dilation follow the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv2d_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches of ``conv`` for input ``x (B, C, H, W)`` (or ``(C, H, W)``), as rows:
    ``(B · H_out · W_out, C · kh · kw)``."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    else:
        padding = conv.padding
    cols = F.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
    )  # (B, C·kh·kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def layer_in_features(layer: nn.Module) -> int:
    """Columns of the layer's weight matrix: ``in_features``, or ``C/groups · kh · kw``."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` (float32 sum) of one layer's inputs.

    A grouped convolution (``groups = G``) sees ``G`` independent input groups: it gets ``G``
    Hessians ``(G, d, d)`` with ``d = C/G · kh · kw``, one per group of output channels.

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv2d``.
    """

    def __init__(self, layer: nn.Module) -> None:
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            raise TypeError(f"Hessians are for nn.Linear / nn.Conv2d, got {type(layer).__name__}")
        self.layer = layer
        self.groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        d = layer_in_features(layer)
        self.sum = torch.zeros(self.groups, d, d, device=layer.weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the layer input ``x``: ``(..., in_features)`` for a Linear, ``(B, C, H, W)`` for a
        Conv2d."""
        with torch.no_grad():
            if isinstance(self.layer, nn.Conv2d):
                rows = conv2d_patches(self.layer, x)  # (N, C·kh·kw), channel-major
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.to(device=self.sum.device, dtype=torch.float32)
            if self.groups == 1:
                self.sum[0].addmm_(rows.t(), rows)
            else:
                grouped = rows.reshape(rows.shape[0], self.groups, -1).transpose(0, 1)  # (G, N, d)
                self.sum.baddbmm_(grouped.transpose(1, 2), grouped)
            self.tokens += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2/n Σ x xᵀ``: ``(d, d)`` float32, or ``(G, d, d)`` for a grouped convolution
        (zeros when nothing was added)."""
        h = self.sum * (2.0 / self.tokens) if self.tokens else self.sum.clone()
        return h[0] if self.groups == 1 else h

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook (``with_kwargs=True``) that adds the module's input."""
        self.add(args[0] if args else kwargs["input"])
