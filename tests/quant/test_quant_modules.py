"""FakeQuantLinear / FakeQuantConv2d, the model-wide switches, calibration, token importance."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distiq.quant import (
    FakeQuantConv2d,
    FakeQuantLinear,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    attach_token_importance,
    calibration,
    choose_qparams,
    fake_quant_disabled,
    fake_quant_modules,
    fake_quantize,
    reset_calibration,
    token_importance_from_attention,
)

W4 = QuantSpec(bits=4, granularity=PerGroup(8))
A8_STATIC = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
A8_DYNAMIC = QuantSpec(bits=8, dynamic=True, granularity=PerToken())


def _fq(x, spec):
    return fake_quantize(x, *choose_qparams(x, spec), spec)


def test_from_float_shares_parameters_and_to_float_round_trips():
    linear = nn.Linear(16, 8)
    fq = FakeQuantLinear.from_float(linear, W4)
    assert fq.weight is linear.weight and fq.bias is linear.bias
    back = fq.to_float()
    assert isinstance(back, nn.Linear) and type(back) is nn.Linear
    assert back.weight is linear.weight and back.bias is linear.bias
    x = torch.randn(3, 16)
    assert torch.equal(back(x), linear(x))


def test_linear_forward_equals_reference_in_train_and_eval():
    linear = nn.Linear(32, 12)
    fq = FakeQuantLinear.from_float(linear, W4, A8_DYNAMIC)
    x = torch.randn(2, 5, 32)
    ref = F.linear(_fq(x, A8_DYNAMIC), _fq(linear.weight.detach(), W4), linear.bias)
    out_train = fq(x)  # grad enabled: fused weight path
    with torch.no_grad():
        out_eval = fq(x)
    torch.testing.assert_close(out_train, ref, atol=0, rtol=0)
    torch.testing.assert_close(out_eval, ref, atol=0, rtol=0)


def test_weight_only_gradients_flow_with_ste():
    linear = nn.Linear(8, 4)
    fq = FakeQuantLinear.from_float(linear, QuantSpec(bits=3))
    x = torch.randn(6, 8, requires_grad=True)
    fq(x).sum().backward()
    assert linear.weight.grad is not None and x.grad is not None
    assert (linear.weight.grad == 0).any()  # clipped extremes get no gradient (3 bits)


def test_fake_quant_disabled_is_exact_full_precision_and_restores():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    ref = model(x)
    model[0] = FakeQuantLinear.from_float(model[0], QuantSpec(bits=2), A8_DYNAMIC)
    model[2] = FakeQuantLinear.from_float(model[2], QuantSpec(bits=2))
    model[2].fake_quant_enabled = False  # a module already off stays off afterwards
    quantized = model(x)
    assert not torch.equal(quantized, ref)
    with fake_quant_disabled(model):
        assert torch.equal(model(x), ref)
    assert model[0].fake_quant_enabled and not model[2].fake_quant_enabled
    with pytest.raises(RuntimeError), fake_quant_disabled(model):
        raise RuntimeError("boom")
    assert model[0].fake_quant_enabled
    assert [name for name, _ in fake_quant_modules(model)] == ["0", "2"]


def test_static_activation_calibration_equals_choose_qparams_on_all_data():
    fq = FakeQuantLinear.from_float(nn.Linear(16, 4), None, A8_STATIC)
    batches = [torch.randn(3, 16) * (i + 1) + i for i in range(3)]
    with pytest.raises(RuntimeError, match="calibration"):
        fq(batches[0])
    with calibration(fq):
        outs = [fq(b) for b in batches]
    assert torch.equal(outs[0], F.linear(batches[0], fq.weight, fq.bias))  # observing: no quant
    expected = choose_qparams(torch.cat(batches).reshape(1, -1), A8_STATIC)
    scale, zero = fq.act_quant.qparams()
    assert torch.equal(scale.reshape(()), expected.scale.reshape(()))
    assert torch.equal(zero.reshape(()), expected.zero_point.reshape(()))
    x = torch.randn(2, 16)
    ref = F.linear(
        fake_quantize(x, *(t.reshape(1, 1) for t in expected), A8_STATIC), fq.weight, fq.bias
    )
    torch.testing.assert_close(fq(x), ref, atol=0, rtol=0)
    reset_calibration(fq)
    assert int(fq.act_quant.num_batches) == 0 and bool(fq.act_quant.calibrated)


def test_static_percentile_and_per_channel_activations():
    spec = QuantSpec(bits=8, granularity=PerChannel(-1), observer="percentile", percentile=99.0)
    fq = FakeQuantLinear.from_float(nn.Linear(6, 2), None, spec)
    with calibration(fq):
        fq(torch.randn(50, 6))
        fq(torch.randn(50, 6) * 2)
    scale, _ = fq.act_quant.qparams()
    assert scale.shape == (6,) and (scale > 0).all()


def test_calibration_warns_about_unseen_quantizers(caplog):
    model = nn.ModuleDict(
        {
            "a": FakeQuantLinear.from_float(nn.Linear(4, 4), None, A8_STATIC),
            "b": FakeQuantLinear.from_float(nn.Linear(4, 4), None, A8_STATIC),
        }
    )
    with caplog.at_level(logging.WARNING), calibration(model):
        model["a"](torch.randn(2, 4))
    assert "b.act_quant" in caplog.text


def test_learnable_weight_and_activation_scales_train():
    spec_w = QuantSpec(bits=4, granularity=PerChannel(0), learnable=True)
    spec_a = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), learnable=True)
    fq = FakeQuantLinear.from_float(nn.Linear(8, 4), spec_w, spec_a)
    x = torch.randn(16, 8)
    fq(x)  # the first batch initialises the activation scale (minmax: nothing clips)
    assert bool(fq.act_quant.calibrated)
    fq(3 * x).pow(2).sum().backward()  # wider inputs clip: LSQ+ moves the offset too
    params = dict(fq.named_parameters())
    for name in ("weight_quant.lsq.scale", "act_quant.scale", "act_quant.zero_point"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    before = params["weight_quant.lsq.scale"].detach().clone()
    torch.optim.SGD(fq.parameters(), lr=0.1).step()
    assert not torch.equal(before, params["weight_quant.lsq.scale"])


def test_conv2d_weight_and_activation_fake_quant():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    spec_w = QuantSpec(bits=4, granularity=PerGroup(12))  # groups over C_in·kh·kw = 36
    fq = FakeQuantConv2d.from_float(conv, spec_w, A8_STATIC)
    x = torch.randn(2, 4, 5, 5)
    with calibration(fq):
        fq(x)
    w_ref = _fq(conv.weight.detach().reshape(6, -1), spec_w).reshape(conv.weight.shape)
    qp = choose_qparams(x, A8_STATIC)
    ref = F.conv2d(fake_quantize(x, *qp, A8_STATIC), w_ref, conv.bias, padding=1)
    torch.testing.assert_close(fq(x), ref, atol=0, rtol=0)
    back = fq.to_float()
    assert type(back) is nn.Conv2d and back.weight is conv.weight
    assert torch.equal(back(x), conv(x))
    dynamic = FakeQuantConv2d.from_float(
        conv, None, QuantSpec(bits=8, dynamic=True, granularity=PerToken())
    )
    pixels = x.movedim(1, -1)
    expected = _fq(pixels, QuantSpec(bits=8, dynamic=True, granularity=PerToken())).movedim(-1, 1)
    torch.testing.assert_close(
        dynamic(x), F.conv2d(expected, conv.weight, conv.bias, padding=1), atol=0, rtol=0
    )


def test_bad_module_specs_name_the_fix():
    with pytest.raises(ValueError, match="group size 7 does not divide the input width 16"):
        FakeQuantLinear.from_float(nn.Linear(16, 4), QuantSpec(bits=4, granularity=PerGroup(7)))
    with pytest.raises(ValueError, match="set dynamic=True"):
        FakeQuantLinear.from_float(
            nn.Linear(16, 4), None, QuantSpec(bits=8, granularity=PerToken())
        )
    with pytest.raises(ValueError, match="set dynamic=False"):
        FakeQuantLinear.from_float(
            nn.Linear(16, 4),
            None,
            QuantSpec(bits=8, dynamic=True, learnable=True, granularity=PerTensor()),
        )
    with pytest.raises(ValueError, match="per_channel\\(1\\)"):
        FakeQuantConv2d.from_float(
            nn.Conv2d(2, 2, 1), None, QuantSpec(bits=8, granularity=PerChannel(0))
        )
    bad = nn.Linear(4, 4)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    fq_bad = FakeQuantLinear.from_float(bad, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="NaN/Inf"):
        fq_bad(torch.randn(1, 4))  # training (fused) path
    with pytest.raises(ValueError, match="NaN/Inf"), torch.no_grad():
        fq_bad(torch.randn(1, 4))
    with pytest.raises(ValueError, match="give an activation spec"):
        FakeQuantLinear.from_float(nn.Linear(4, 4), None, None, token_importance=True)


# -- token importance (EdgeQAT) -------------------------------------------------------------------
def test_token_importance_mixes_bits_by_rank():
    fq = FakeQuantLinear.from_float(
        nn.Linear(16, 4), None, A8_DYNAMIC, token_importance=True, low_bits=2
    )
    x = torch.randn(2, 5, 16)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.3], [0.0, 1.0, 0.2, 0.8, 0.6]])
    fq.set_token_importance(scores)
    out = fq(x)
    high = _fq(x, A8_DYNAMIC)
    low = _fq(x, A8_DYNAMIC.replace(bits=2))
    important = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)  # top ceil(5/2)
    expected_in = torch.where(important[..., None], high, low)
    torch.testing.assert_close(out, F.linear(expected_in, fq.weight, fq.bias), atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not match"):
        fq(torch.randn(2, 4, 16))
    fq.set_token_importance(None)
    with pytest.raises(RuntimeError, match="set_token_importance"):
        fq(x)


def test_token_importance_from_attention_hook():
    class Attention(nn.Module):
        def forward(self, x):
            b, t, _ = x.shape
            weights = torch.softmax(torch.randn(b, 2, t, t), dim=-1)
            return x, weights

    attention = Attention()
    fq = FakeQuantLinear.from_float(nn.Linear(8, 8), None, A8_DYNAMIC, token_importance=True)
    handle = attach_token_importance(attention, [fq])
    x = torch.randn(3, 6, 8)
    _, weights = attention(x)
    assert fq.token_scores.shape == (3, 6)
    torch.testing.assert_close(fq.token_scores, weights[:, :, :, 0].mean(1))
    fq(x)
    handle.remove()
    assert token_importance_from_attention(weights, "from_first").shape == (3, 6)
    torch.testing.assert_close(
        token_importance_from_attention(weights, "from_first"), weights[:, :, 0, :].mean(1)
    )
    with pytest.raises(ValueError, match="to_first"):
        token_importance_from_attention(weights, "middle")

    class NoWeights(nn.Module):
        def forward(self, x):
            return x, None

    silent = NoWeights()
    attach_token_importance(silent, [fq])
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        silent(x)


def test_fused_weight_buffer_is_reused_only_when_safe():
    linear = nn.Linear(16, 8)
    fq = FakeQuantLinear.from_float(linear, QuantSpec(bits=4))
    x = torch.randn(3, 16)
    expected = F.linear(x, _fq(linear.weight.detach(), QuantSpec(bits=4)), linear.bias)
    fq(x).sum().backward()
    first = fq._weight_buffer.tensor
    fq(x).sum().backward()
    assert fq._weight_buffer.tensor is first  # step after step: same storage
    # two forwards before their backwards (e.g. two views of a batch): no sharing
    y1, y2 = fq(x), fq(2 * x)
    linear.weight.grad = None
    (y1.sum() + y2.sum()).backward()
    torch.testing.assert_close(y1, expected, atol=0, rtol=0)
    reference = linear.weight.detach().clone().requires_grad_(True)
    w_hat = fake_quantize(
        reference, *choose_qparams(reference, QuantSpec(bits=4)), QuantSpec(bits=4)
    )
    (F.linear(x, w_hat).sum() + F.linear(2 * x, w_hat).sum()).backward()
    torch.testing.assert_close(linear.weight.grad, reference.grad)
    # reusing a graph after a newer forward overwrote its buffer fails loudly, never silently
    y_old = fq(x)
    y_old.sum().backward(retain_graph=True)
    fq(x).sum().backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y_old.sum().backward()


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, granularity=PerChannel(0), learnable=True),
        QuantSpec(bits=3, symmetric=False, granularity=PerGroup(8), learnable=True),
        QuantSpec(bits=4, symmetric=False, granularity=PerTensor(), learnable=True),
    ],
    ids=["lsq-channel", "lsq+-group", "lsq+-tensor"],
)
def test_fused_lsq_path_matches_generic_autograd(spec):
    linear = nn.Linear(32, 12)
    fq = FakeQuantLinear.from_float(linear, spec)
    lsq = fq.weight_quant.lsq
    with torch.no_grad():
        lsq.scale.mul_(0.8)  # make some codes clip
        if isinstance(lsq.zero_point, nn.Parameter):
            lsq.zero_point.add_(0.6)
    x = torch.randn(2, 5, 32, requires_grad=True)
    g = torch.randn(2, 5, 12)
    params = [x, linear.weight, linear.bias, lsq.scale]
    if isinstance(lsq.zero_point, nn.Parameter):
        params.append(lsq.zero_point)
    fused_out = fq(x)  # grad enabled: fused LSQ path
    fused = torch.autograd.grad((fused_out * g).sum(), params)
    generic_out = F.linear(x, lsq(linear.weight), linear.bias)  # distiq.quant.lsq autograd
    generic = torch.autograd.grad((generic_out * g).sum(), params)
    torch.testing.assert_close(fused_out, generic_out, atol=0, rtol=0)
    for got, ref in zip(fused, generic):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert fused[3].abs().sum() > 0


def test_prepared_model_pickles_and_deep_copies(tmp_path):
    import copy

    model = nn.Sequential(FakeQuantLinear.from_float(nn.Linear(8, 4), QuantSpec(bits=4)))
    x = torch.randn(2, 8)
    model(x).sum().backward()  # the fused path now holds a weight buffer
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)
        assert (
            other[0]._weight_buffer.tensor is None
            or other[0]._weight_buffer.tensor is not model[0]._weight_buffer.tensor
        )
