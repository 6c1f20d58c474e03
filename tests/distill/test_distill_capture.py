"""Hook-based feature capture by module-name globs, and layer mapping."""

import pytest
import torch
from torch import nn

from distiq.distill import FeatureCapture, glob_match, map_layers, match_modules


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x), torch.softmax(x @ x.transpose(-1, -2), -1)


class Tiny(nn.Module):
    def __init__(self, d=8, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h, _ = layer(h)
        return self.head(h)


def test_glob_semantics():
    assert glob_match("layers.0", "layers.*")
    assert not glob_match("layers.0.mlp", "layers.*")
    assert glob_match("model.layers.3.self_attn.q_proj", "**.q_proj")
    assert glob_match("layers.1.mlp.0", "layers.[0-1].mlp.?")
    assert not glob_match("xlayers.0", "layers.*")
    names = [n for n, _ in match_modules(Tiny(), ["layers.*.mlp", "layers.*"])]
    assert names == [
        "layers.0",
        "layers.0.mlp",
        "layers.1",
        "layers.1.mlp",
        "layers.2",
        "layers.2.mlp",
    ]


def test_capture_records_outputs_without_changing_them():
    model = Tiny()
    x = torch.randn(2, 3, 4)
    plain = model(x)
    with FeatureCapture(model, ["layers.*"]) as cap:
        hooked = model(x)
        feats = cap.features()
        assert cap.names == ["layers.0", "layers.1", "layers.2"]
    assert torch.equal(plain, hooked)
    # reference: the hidden state after each block
    h = model.embed(x)
    for i, layer in enumerate(model.layers):
        h, _ = layer(h)
        torch.testing.assert_close(feats[i], h)
    assert feats[0].requires_grad  # the student keeps its graph
    for module in model.modules():
        assert not module._forward_hooks  # removed on exit


def test_capture_output_index_detach_pause_and_clear():
    model = Tiny()
    x = torch.randn(2, 3, 4)
    cap = FeatureCapture(model, "layers.*", output_index=1, detach=True)
    model(x)
    attn = cap.features()
    assert attn[0].shape == (2, 3, 3) and not attn[0].requires_grad
    first = attn[0].clone()
    with cap.paused():
        model(torch.randn(2, 3, 4))
    assert torch.equal(cap.features()[0], first)
    cap.clear()
    with pytest.raises(RuntimeError, match="run the model's forward first"):
        cap.features()
    cap.remove()
    cap.remove()
    model(x)
    assert cap.as_dict() == {}
    assert not cap.attached


def test_unmatched_pattern_lists_near_misses():
    with pytest.raises(ValueError, match=r"'layer\.\*' matches no module \(did you mean"):
        FeatureCapture(Tiny(), ["layer.*"])
    with pytest.raises(ValueError, match="out of range"):
        cap = FeatureCapture(Tiny(), ["layers.0"], output_index=5)
        cap_model = cap.modules[0][1]
        cap_model(torch.randn(1, 2, 8))


def test_map_layers_uniform_and_explicit():
    assert map_layers(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert map_layers(2, 4) == [(0, 1), (1, 3)]
    assert map_layers(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert map_layers(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert map_layers(2, 4, [(0, 0), (-1, -1)]) == [(0, 0), (1, 3)]
    with pytest.raises(ValueError, match="teacher index 4"):
        map_layers(2, 4, [(0, 4)])
    with pytest.raises(ValueError, match="at least one layer"):
        map_layers(0, 4)
