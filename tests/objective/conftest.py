"""A tiny causal transformer (Llama-like module names) for the objective tests."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.head_dim = d // heads
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)  # (B, H, T, T)
        out = (probs @ v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(out), probs


class Layer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        a, _ = self.self_attn(self.norm1(x))
        x = x + a
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding -> layers -> lm_head; returns logits (B, T, V)."""

    def __init__(self, vocab=13, d=16, heads=2, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def lm_batch(batch=3, seq=7, vocab=13, prompt=4, seed=0):
    """input_ids, attention_mask (last sequence padded by 2) and labels (answer tokens only)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, -2:] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


@pytest.fixture
def tiny_lm():
    return TinyLM


@pytest.fixture
def make_batch():
    return lm_batch


def reference_ce(logits, labels):
    """Hugging Face's causal-LM loss: shift, flatten, mean over non-ignored tokens."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.fixture
def hf_ce():
    return reference_ce


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer from a busy machine's
    oversubscription); the previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
