"""Tiny models, data and step functions shared by the training-loop tests (and the 2-process
worker script). Loaded by path (see conftest.py) or imported from this folder."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

DIM, CLASSES = 6, 3


@dataclass
class LossOutput:
    """Same shape as distiq.objective.LossOutput: the loop only duck-types it."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class ToyData(Dataset):
    """``n`` samples ``{"x": (DIM,), "y": (), "ids": ()}``; labels from a fixed linear rule."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=generator)
        rule = torch.randn(DIM, CLASSES, generator=generator)
        self.y = (self.x @ rule).argmax(-1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "ids": torch.tensor(i)}


class ToyNet(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, 16)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, DIM) -> (B, CLASSES)
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_model(seed: int = 0, dropout: float = 0.0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(dropout)


def plain_step(model, batch, step):
    """Deterministic: cross-entropy (mean over the batch) plus a small L2 term."""
    logits = model(batch["x"])
    task = F.cross_entropy(logits, batch["y"])
    l2 = 1e-3 * sum(p.pow(2).sum() for p in model.parameters())
    return LossOutput(task + l2, {"task": task, "l2": l2})


def noisy_step(model, batch, step):
    """Uses every RNG a real step may touch: torch (dropout), python random, numpy."""
    logits = model(batch["x"])
    task = F.cross_entropy(logits, batch["y"])
    jitter = random.random() * float(np.random.rand()) + float(torch.rand(()))
    l2 = 1e-2 * jitter * sum(p.pow(2).sum() for p in model.parameters())
    return LossOutput(task + l2, {"task": task, "l2": l2})


def make_eval(data: ToyData):
    """eval_fn over ``data`` (a validation split): accuracy (0-100) and mean loss."""

    def eval_fn(model):
        from distiq.train.distributed import gather_objects, shard_range

        device = next(model.parameters()).device
        mine = list(shard_range(len(data)))
        x, y = data.x[mine].to(device), data.y[mine].to(device)
        logits = model(x).float()
        correct = int((logits.argmax(-1) == y).sum())
        loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
        parts = gather_objects((correct, loss_sum, len(mine)))
        n = sum(p[2] for p in parts)
        return {
            "accuracy": 100.0 * sum(p[0] for p in parts) / n,
            "loss": sum(p[1] for p in parts) / n,
        }

    return eval_fn


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# A built-in edge VLM small enough for a unit test (build_edge_vlm(words, "tiny", **TINY_EDGE_VLM)).
TINY_EDGE_VLM = dict(
    image_size=32,
    patch_size=8,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate_size=64,
    text_hidden_size=32,
    text_layers=2,
    text_heads=2,
    text_kv_heads=2,
    text_intermediate_size=64,
    max_length=64,
)
