"""quantize_: selection by globs, overrides, the report, loud errors, prepare -> convert."""

import logging

import pytest
import torch
from torch import nn

from distiq.quant import (
    FakeQuantConv2d,
    FakeQuantLinear,
    PerGroup,
    PerToken,
    QuantConfig,
    QuantizedLinear,
    QuantSpec,
    calibration,
    quantize_,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "o_proj": nn.Linear(16, 16)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})

    def forward(self, x):
        x = x + self.attn["o_proj"](self.attn["q_proj"](x))
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](x)))


class Tiny(nn.Module):
    """Names like a Hugging Face model: model.embed_tokens, model.layers.N..., lm_head."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(20, 16)
        self.model.vision = nn.Conv2d(3, 16, 4, stride=4)
        self.model.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 20)

    def forward(self, ids, image):
        x = self.model.embed_tokens(ids) + self.model.vision(image).flatten(2).mean(-1)[:, None]
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


@pytest.fixture
def inputs():
    return torch.randint(0, 20, (2, 5)), torch.randn(2, 3, 8, 8)


def test_prepare_selects_by_globs_with_overrides(caplog):
    model = Tiny()
    config = QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerGroup(16)),
        activation=QuantSpec(bits=8, dynamic=True, granularity=PerToken()),
        exclude=("model.layers.1.attn",),
        overrides={
            "lm_head": {"weight": {"bits": 8, "granularity": "per_channel"}, "activation": None},
            "*.down_proj": {"weight": {"granularity": "per_group(32)"}},
        },
    )
    with caplog.at_level(logging.INFO, logger="distiq.quant.api"):
        report = quantize_(model, config)
    assert report.names == [
        "model.vision",
        "model.layers.0.attn.q_proj",
        "model.layers.0.attn.o_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ]
    assert "quantize_ prepare: 8 module(s) changed" in caplog.text
    assert isinstance(model.model.vision, FakeQuantConv2d)
    assert type(model.model.layers[1].attn["q_proj"]) is nn.Linear  # excluded subtree
    assert model.lm_head.weight_spec.bits == 8 and model.lm_head.activation_spec is None
    assert model.model.layers[0].mlp["down_proj"].weight_spec.granularity == PerGroup(32)
    assert model.model.layers[0].mlp["up_proj"].weight_spec.granularity == PerGroup(16)
    change = report.changes[-1]
    assert (change.name, change.old_type, change.new_type) == (
        "lm_head",
        "Linear",
        "FakeQuantLinear",
    )
    assert "int8 sym per_channel(0)" in change.weight and change.activation == "none"
    assert report.to_dict()["changes"][0]["name"] == "model.vision"
    assert "lm_head" in str(report)


def test_pattern_matching_nothing_lists_near_misses():
    model = Tiny()
    with pytest.raises(ValueError) as err:
        quantize_(model, QuantConfig(include=("model.layer.*.mlp.*",)))
    assert "matches no module" in str(err.value) and "model.layers.0.mlp" in str(err.value)
    with pytest.raises(ValueError, match="exclude pattern 'lm_haed' matches no module.*'lm_head'"):
        quantize_(model, QuantConfig(exclude=("lm_haed",)))
    with pytest.raises(ValueError, match="override pattern"):
        quantize_(model, QuantConfig(overrides={"head": {"weight": {"bits": 8}}}))
    assert type(model.lm_head) is nn.Linear  # nothing changed


def test_unsupported_module_named_explicitly_fails_loudly():
    model = Tiny()
    with pytest.raises(
        ValueError, match=r"'model.embed_tokens' \(Embedding\).*supported: nn.Linear"
    ):
        quantize_(model, QuantConfig(include=("model.embed_tokens",)))
    with pytest.raises(ValueError, match=r"select no supported module.*Embedding.*supported"):
        quantize_(model, QuantConfig(include=("*embed*",)))
    with pytest.raises(ValueError, match="step must be"):
        quantize_(model, QuantConfig(), step="export")


def test_multihead_attention_out_proj_is_skipped_not_swapped():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    report = quantize_(model, QuantConfig())
    assert report.names == ["1"]
    assert any("MultiheadAttention" in reason for _, reason in report.skipped)
    with pytest.raises(ValueError, match="NonDynamicallyQuantizableLinear"):
        quantize_(model, QuantConfig(include=("0.out_proj",)))


def test_prepare_twice_and_both_specs_none():
    model = Tiny()
    quantize_(model, QuantConfig(include=("model.layers.0",)))
    report = quantize_(
        model, QuantConfig(include=("model.layers.*",), overrides={"lm_head": {"weight": None}})
    )
    assert report.names == [
        f"model.layers.1.{p}"
        for p in ("attn.q_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    assert ("model.layers.0.attn.q_proj", "already prepared") in report.skipped
    report = quantize_(
        model, QuantConfig(include=("lm_head",), overrides={"lm_head": {"weight": None}})
    )
    assert report.names == [] and report.skipped == [
        ("lm_head", "weight and activation specs are both None")
    ]


def test_prepare_then_convert_keeps_outputs_identical(inputs):
    model = Tiny()
    config = QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerGroup(16)),
        activation=QuantSpec(bits=8, symmetric=False, granularity=PerToken(), dynamic=True),
        overrides={"lm_head": {"weight": {"bits": 8}}},
    )
    quantize_(model, config)
    with torch.no_grad():
        fake = model(*inputs)
    report = quantize_(model, config, step="convert")
    assert "model.vision" not in report.names  # convs have no packed form: they stay fake
    assert (
        "model.vision",
        "FakeQuantConv2d has no packed form yet; it stays fake-quantized",
    ) in report.skipped
    assert isinstance(model.lm_head, QuantizedLinear) and len(report) == 9
    with torch.no_grad():
        real = model(*inputs)
    torch.testing.assert_close(real, fake, atol=0, rtol=0)
    with pytest.raises(ValueError, match="select no supported module"):
        quantize_(model, config, step="convert")  # nothing fake-quantized left to convert


def test_static_activations_through_quantize_and_calibration(inputs):
    model = Tiny()
    quantize_(
        model,
        QuantConfig(
            weight=None, activation=QuantSpec(bits=8, symmetric=False, granularity="per_tensor")
        ),
    )
    with torch.no_grad(), calibration(model):
        model(*inputs)
    with torch.no_grad():
        fake = model(*inputs)
    assert isinstance(model.lm_head, FakeQuantLinear) and bool(model.lm_head.act_quant.calibrated)
    assert torch.isfinite(fake).all()


def test_tiny_llama_keeps_embeddings_and_head_at_8_bits():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    quant = QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerGroup(16)),
        include=("model.layers.*", "lm_head"),
        overrides={"lm_head": {"weight": {"bits": 8}}},
    )
    report = quantize_(model, quant)
    assert len(report) == 2 * 7 + 1 and model.lm_head.weight_spec.bits == 8
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    quantize_(model, quant, step="convert")
    with torch.no_grad():
        real = model(input_ids=ids).logits
    torch.testing.assert_close(real, fake, atol=0, rtol=0)
