"""``quantize_model`` on a toy model (per-layer keyword inputs, a non-chained list, grouped conv,
tied weights, unreached layers) and on a tiny Hugging Face Llava (vision tower + projector +
language model), each against a slow reference that re-runs the whole model for every block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distiq.ptq import HessianAccumulator, gptq_quantize, quantize_model, select_layers
from distiq.ptq.blocks import plan_stages
from distiq.quant import PerChannel, PerGroup, QuantConfig, QuantizedLinear, QuantSpec


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x, *, gain):
        return x + self.fc2(torch.relu(self.fc1(x * gain)))


class Toy(nn.Module):
    """conv stem → depthwise conv → 3 blocks, each called with its own ``gain`` keyword → two
    parallel heads (a ModuleList that is not a chain); ``unused`` is never called."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, d, 3, padding=1)
        self.depthwise = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.layers = nn.ModuleList(Block(d) for _ in range(3))
        self.heads = nn.ModuleList(nn.Linear(d, 4) for _ in range(2))
        self.unused = nn.Linear(d, d)

    def forward(self, images, scale=1.0):
        h = self.depthwise(torch.relu(self.stem(images)))
        x = h.flatten(2).transpose(1, 2) * scale  # (B, HW, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, gain=1.0 + 0.5 * i)  # every block gets a different keyword input
        return torch.stack([head(x) for head in self.heads])


def toy_batches(n=6):
    smooth = F.interpolate(torch.randn(n * 2, 3, 3, 3), size=(6, 6), mode="bilinear")
    images = smooth + 0.2 * torch.randn(n * 2, 3, 6, 6)
    return [{"images": images[2 * i : 2 * i + 2], "scale": 0.5} for i in range(n)]


def slow_reference(model, batches, units, spec, **options):
    """Quantize ``units`` (lists of layer names) in order; for each, run the *whole* model on
    every batch to collect the Hessians (so earlier units are already quantized)."""
    for names in units:
        accs = {n: HessianAccumulator(model.get_submodule(n)) for n in names}
        handles = [
            a.layer.register_forward_pre_hook(a.hook, with_kwargs=True) for a in accs.values()
        ]
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        for h in handles:
            h.remove()
        for name, acc in accs.items():
            layer = model.get_submodule(name)
            if getattr(layer, "groups", 1) > 1:  # depthwise: one problem per channel group
                parts = [
                    gptq_quantize(w, acc.hessian()[g], spec, **options).weight
                    for g, w in enumerate(layer.weight.detach().chunk(layer.groups))
                ]
                new = torch.cat(parts)
            else:
                new = gptq_quantize(layer.weight.detach(), acc.hessian(), spec, **options).weight
            layer.weight.data.copy_(new)
    return model


TOY_UNITS = [
    ["stem"],
    ["depthwise"],
    ["layers.0.fc1", "layers.0.fc2"],
    ["layers.1.fc1", "layers.1.fc2"],
    ["layers.2.fc1", "layers.2.fc2"],
    ["heads.0"],
    ["heads.1"],
]


def test_toy_model_matches_the_slow_full_forward_reference():
    model = Toy()
    batches = toy_batches()
    spec = QuantSpec(bits=3, granularity=PerChannel(0))
    expected = slow_reference(copy.deepcopy(model), batches, TOY_UNITS, spec, act_order=True)
    quantized = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="unused is never reached"):
        reports = quantize_model(quantized, batches, QuantConfig(weight=spec), act_order=True)
    assert [r.name for r in reports] == [n for unit in TOY_UNITS for n in unit] + ["unused"]
    for name in [n for unit in TOY_UNITS for n in unit]:
        got = quantized.get_submodule(name).weight
        torch.testing.assert_close(got, expected.get_submodule(name).weight, rtol=0, atol=1e-6)
    by_name = {r.name: r for r in reports}
    assert by_name["unused"].method == "rtn" and by_name["unused"].tokens == 0
    stages = plan_stages(model, list(select_layers(model, QuantConfig())), batches[0])
    assert [s.names for s in stages] == [
        ["stem"],
        ["depthwise"],
        ["layers.0", "layers.1", "layers.2"],  # a chain; its blocks get different gains
        ["heads.0"],  # parallel heads: not a chain, one stage each
        ["heads.1"],
        ["unused"],
    ]
    assert not stages[2].uniform and stages[-1].order is None
    assert by_name["stem"].tokens == 12 * 36 and by_name["layers.0.fc1"].tokens == 12 * 36
    assert all(r.relative_error is not None for r in reports if r.name != "unused")


def test_glob_selection_overrides_and_clear_errors():
    model = Toy()
    config = QuantConfig(
        weight=QuantSpec(bits=4),
        include=("layers.*", "heads.0"),
        exclude=("layers.1",),
        overrides={"layers.2.fc2": {"weight": {"bits": 8}}, "layers.0.fc1": {"weight": None}},
    )
    selected = select_layers(model, config)
    assert sorted(selected) == ["heads.0", "layers.0.fc2", "layers.2.fc1", "layers.2.fc2"]
    assert selected["layers.2.fc2"][1].bits == 8 and selected["heads.0"][1].bits == 4
    reports = quantize_model(model, toy_batches(2), config, method="rtn")
    assert {r.name: r.bits for r in reports} == {
        "layers.0.fc2": 4,
        "layers.2.fc1": 4,
        "layers.2.fc2": 8,
        "heads.0": 4,
    }
    with pytest.raises(ValueError, match=r"include pattern 'layer.\*.fc1' matches no module"):
        select_layers(model, QuantConfig(include=("layer.*.fc1",)))
    with pytest.raises(ValueError, match="near misses: .heads.1., .heads.0."):
        select_layers(model, QuantConfig(overrides={"heads.9": {"weight": None}}))
    with pytest.raises(ValueError, match="the calibration set is empty"):
        quantize_model(model, [], QuantConfig())
    with pytest.raises(TypeError, match="wrap it in a list"):
        quantize_model(model, toy_batches(1)[0], QuantConfig())
    with pytest.raises(ValueError, match="method must be 'gptq' or 'rtn'"):
        quantize_model(model, toy_batches(1), QuantConfig(), method="awq")
    with pytest.raises(ValueError, match="group size 32 does not divide"):
        quantize_model(model, toy_batches(1), QuantConfig(QuantSpec(granularity=PerGroup(32))))


def test_tied_weights_are_untied_and_nan_weights_rejected():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.body(self.embed(ids))))

    model = Tied()
    embedding = model.embed.weight.detach().clone()
    batches = [(torch.randint(0, 10, (4, 6)),) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="head.weight is shared"):
        quantize_model(model, batches, QuantConfig(QuantSpec(bits=4)))
    assert torch.equal(model.embed.weight, embedding)  # the embedding kept its values
    assert not torch.equal(model.head.weight, embedding)
    with torch.no_grad():
        model.body.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_model(model, batches, QuantConfig(QuantSpec(bits=4)))


# -- a tiny Hugging Face Llava ------------------------------------------------------------------

VOCAB = 64
IMAGE_TOKEN = VOCAB - 1


@pytest.fixture(scope="module")
def llava():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=IMAGE_TOKEN,
    )
    model = tf.LlavaForConditionalGeneration(config).eval()

    def batch(size):
        ids = torch.randint(3, IMAGE_TOKEN, (size, 24))
        ids[:, 1:17] = IMAGE_TOKEN  # 16 patches of a 32×32 image
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding
        return dict(input_ids=ids, pixel_values=torch.randn(size, 3, 32, 32), attention_mask=mask)

    calib = [batch(4) for _ in range(8)]
    held_out = batch(8)
    with torch.no_grad():
        reference = model(**held_out).logits
    cache = {}

    def quantized(method, bits, **options):
        key = (method, bits, tuple(sorted(options.items())))
        if key not in cache:
            spec = QuantSpec(bits=bits, symmetric=False, granularity=PerChannel(0))
            m = copy.deepcopy(model)
            reports = quantize_model(m, calib, QuantConfig(weight=spec), method, **options)
            with torch.no_grad():
                out = m(**held_out).logits
            error = float((out - reference).pow(2).sum() / reference.pow(2).sum())
            cache[key] = (m, reports, error)
        return cache[key]

    return model, calib, held_out, quantized


def test_llava_every_selected_layer_is_quantized_and_8bit_stays_close(llava):
    model, calib, _, quantized = llava
    m, reports, error = quantized("gptq", 8)
    selected = select_layers(model, QuantConfig())
    assert sorted(r.name for r in reports) == sorted(selected)
    names = [r.name for r in reports]
    # vision tower (patch conv + layers) → projector → language model → lm_head
    assert names[0] == "model.vision_tower.embeddings.patch_embedding"
    assert names.index("model.multi_modal_projector.linear_1") > names.index(
        "model.vision_tower.encoder.layers.1.mlp.fc2"
    )
    assert names[-1] == "lm_head"
    stages = plan_stages(model, list(selected), calib[0])
    lists = [s for s in stages if len(s.blocks) > 1]
    assert [s.names[0] for s in lists] == [
        "model.vision_tower.encoder.layers.0",
        "model.language_model.layers.0",
    ]
    assert all(s.uniform for s in lists)  # same masks / position embeddings for every layer
    assert all(r.method == "gptq" and r.relative_error < 1e-3 for r in reports)
    for name in selected:
        w = m.get_submodule(name).weight.flatten(1)
        assert not torch.equal(w, model.get_submodule(name).weight.flatten(1))
        # every row holds at most 2^8 distinct values: it lies on its 8-bit grid
        assert max(len(torch.unique(row)) for row in w) <= 256
    assert error < 1e-3


@pytest.mark.parametrize("bits", [4, 3])
def test_llava_gptq_beats_rtn(llava, bits):
    _, _, _, quantized = llava
    _, gptq_reports, gptq_error = quantized("gptq", bits)
    _, rtn_reports, rtn_error = quantized("rtn", bits)
    assert sum(r.relative_error for r in gptq_reports) < 0.8 * sum(
        r.relative_error for r in rtn_reports
    )
    # the first stage sees identical inputs under both methods: compare layer by layer
    first = "model.vision_tower.embeddings.patch_embedding"
    gptq_first = next(r for r in gptq_reports if r.name == first)
    rtn_first = next(r for r in rtn_reports if r.name == first)
    assert gptq_first.squared_error < rtn_first.squared_error
    assert gptq_error < rtn_error  # on held-out inputs, at the logits


def test_llava_matches_the_slow_full_forward_reference(llava):
    model, calib, _, quantized = llava
    m, reports, _ = quantized("gptq", 4)
    vision = "model.vision_tower.encoder.layers"
    text = "model.language_model.layers"
    layer_names = [r.name for r in reports]
    units = [["model.vision_tower.embeddings.patch_embedding"]]
    units += [[n for n in layer_names if n.startswith(f"{vision}.{i}.")] for i in range(2)]
    units += [["model.multi_modal_projector.linear_1"], ["model.multi_modal_projector.linear_2"]]
    units += [[n for n in layer_names if n.startswith(f"{text}.{i}.")] for i in range(2)]
    units += [["lm_head"]]
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0))
    expected = slow_reference(copy.deepcopy(model), calib, units, spec)
    for name in layer_names:
        torch.testing.assert_close(
            m.get_submodule(name).weight, expected.get_submodule(name).weight, rtol=0, atol=1e-5
        )


def test_llava_convert_gives_quantized_linear_with_identical_outputs(llava):
    model, calib, held_out, quantized = llava
    in_place, _, _ = quantized("gptq", 4)
    converted = copy.deepcopy(model)
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0))
    quantize_model(converted, calib, QuantConfig(weight=spec), convert=True)
    linear_names = [n for n, m in in_place.named_modules() if isinstance(m, nn.Linear)]
    assert linear_names
    assert all(isinstance(converted.get_submodule(n), QuantizedLinear) for n in linear_names)
    assert isinstance(
        converted.get_submodule("model.vision_tower.embeddings.patch_embedding"), nn.Conv2d
    )
    with torch.no_grad():
        torch.testing.assert_close(
            converted(**held_out).logits, in_place(**held_out).logits, rtol=0, atol=0
        )
