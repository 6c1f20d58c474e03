"""The optimizer's parameter groups, shared by the training loop and the compression methods."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters of ``modules`` (each parameter once): weight
    decay on tensors with ``ndim >= 2``, none on biases, norms and quantizer scales.

    Raises:
        ValueError: no parameter of ``modules`` is trainable.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(
            "the model has no trainable parameters (all have requires_grad=False); "
            "unfreeze some or pass optimizer_params"
        )
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
