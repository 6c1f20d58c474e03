"""QuantizedLinear: identical to the fake-quant module it came from, W8A8 integer matmul within
the float-rounding bound, act-order g_idx, state_dict / safetensors round trips."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distiq.quant import (
    FakeQuantLinear,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantizedLinear,
    QuantSpec,
    calibration,
    choose_qparams,
    dequantize,
    quantize,
)
from distiq.quant.quantized import int8_matmul, pad_for_int_mm

WEIGHT_SPECS = [
    QuantSpec(bits=2, granularity=PerGroup(16)),
    QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32)),
    QuantSpec(bits=4, granularity=PerChannel(0)),
    QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0), observer="mse", mse_grid=20),
    QuantSpec(bits=5, granularity=PerTensor()),
    QuantSpec(bits=8, granularity=PerChannel(0)),
    QuantSpec(
        bits=8, symmetric=False, granularity=PerTensor(), observer="percentile", percentile=99.0
    ),
    QuantSpec(bits=4, learnable=True, granularity=PerGroup(16)),
    QuantSpec(bits=4, format="nf4", granularity=PerGroup(64)),
    QuantSpec(bits=8, format="fp8_e4m3", granularity=PerChannel(0)),
]
ACT_SPECS = [
    None,
    QuantSpec(bits=8, symmetric=False, granularity=PerTensor()),
    QuantSpec(bits=8, dynamic=True, granularity=PerToken()),
    QuantSpec(bits=6, symmetric=False, learnable=True, granularity=PerTensor()),
]


def _spec_id(spec):
    return "none" if spec is None else f"{spec.format}{spec.bits}-{spec.granularity._to_config()}"


def _fake(weight_spec, act_spec, in_features=64, out_features=24, bias=True):
    fq = FakeQuantLinear.from_float(
        nn.Linear(in_features, out_features, bias=bias), weight_spec, act_spec
    )
    if act_spec is not None and not act_spec.dynamic:
        with torch.no_grad(), calibration(fq):
            fq(torch.randn(16, in_features))
    return fq


@pytest.mark.parametrize("act_spec", ACT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("weight_spec", WEIGHT_SPECS, ids=_spec_id)
def test_converted_forward_is_identical(weight_spec, act_spec):
    fq = _fake(weight_spec, act_spec, bias=weight_spec.bits != 5)
    if weight_spec.learnable:  # move the learned scale away from its initial value
        with torch.no_grad():
            fq.weight_quant.lsq.scale.mul_(0.9)
    x = torch.randn(3, 7, 64) * 2
    fake_train = fq(x)  # grad enabled (fused path for int weights)
    with torch.no_grad():
        fake = fq(x)
    real = QuantizedLinear.from_fake_quant(fq)
    with torch.no_grad():
        out = real(x)
    torch.testing.assert_close(out, fake, atol=0, rtol=0)
    torch.testing.assert_close(out, fake_train.detach(), atol=0, rtol=0)


def test_packed_size_is_bits_per_value_plus_scales():
    fq = _fake(QuantSpec(bits=4, granularity=PerGroup(32)), None, in_features=128, out_features=64)
    real = QuantizedLinear.from_fake_quant(fq)
    assert real.packed_weight.numel() == 64 * 128 // 2  # half a byte per value
    assert real.weight_scale.shape == (64, 4, 1)
    fq3 = _fake(QuantSpec(bits=3), None, in_features=128, out_features=64)
    assert QuantizedLinear.from_fake_quant(fq3).packed_weight.numel() == 64 * 128 * 3 // 8


@pytest.mark.parametrize(
    "act_spec",
    [
        QuantSpec(bits=8, dynamic=True, granularity=PerToken()),
        QuantSpec(bits=8, symmetric=False, dynamic=True, granularity=PerToken()),
        QuantSpec(bits=8, symmetric=False, granularity=PerTensor()),
        QuantSpec(bits=8, symmetric=False, signed=True, granularity=PerTensor()),
    ],
    ids=["sym-token", "asym-token", "asym-static", "asym-signed-static"],
)
def test_w8a8_integer_matmul_equals_fake_quant_to_float_rounding(act_spec):
    k = 512
    fq = _fake(
        QuantSpec(bits=8, granularity=PerChannel(0)), act_spec, in_features=k, out_features=96
    )
    real = QuantizedLinear.from_fake_quant(fq, int_matmul=True)
    assert real.int_matmul
    x = torch.randn(4, 16, k) * 3 + 0.5
    with torch.no_grad():
        fake = fq(x)
        out = real(x)
        x_hat = fq.act_quant(x)
        w_hat = fq.quantized_weight()
    # rigorous float32 bound: (k + 4) u Σ|x̂||ŵ| + u |b|, u = 2^-24
    u = 2.0**-24
    bound = (k + 4) * u * (x_hat.abs() @ w_hat.abs().t()) + u * fq.bias.abs()
    diff = (out - fake).abs()
    assert (diff <= bound).all()
    relative = (diff / (x_hat.abs() @ w_hat.abs().t())).max().item()
    assert relative < 1e-6  # measured 9e-8, the bound's (k+4)u is 3.1e-5


def test_int8_matmul_and_padding_for_cuda_constraints():
    a = torch.randint(-128, 128, (3, 21), dtype=torch.int8)
    b = torch.randint(-128, 128, (21, 5), dtype=torch.int8)
    ref = a.int() @ b.int()
    assert torch.equal(int8_matmul(a, b), ref)
    a_pad, b_pad = pad_for_int_mm(a, b)
    assert a_pad.shape == (17, 24) and b_pad.shape == (24, 8)
    assert torch.equal(torch._int_mm(a_pad, b_pad)[:3, :5], ref)


def test_int_matmul_refuses_ineligible_specs():
    fq = _fake(QuantSpec(bits=4), QuantSpec(bits=8, dynamic=True, granularity=PerToken()))
    with pytest.raises(ValueError, match="int_matmul needs int8 symmetric"):
        QuantizedLinear.from_fake_quant(fq, int_matmul=True)
    assert not QuantizedLinear.from_fake_quant(fq, int_matmul=None).int_matmul


def test_from_quantized_with_act_order_g_idx():
    out_f, in_f, group = 8, 32, 8
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(group))
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    scale = torch.rand(out_f, in_f // group, 1) + 0.1
    zero = torch.randint(0, 16, (out_f, in_f // group, 1)).float()
    g_idx = torch.randperm(in_f) % (in_f // group)
    bias = torch.randn(out_f)
    layer = QuantizedLinear.from_quantized(codes, scale, zero, spec, bias, g_idx)
    expected = torch.empty(out_f, in_f)
    for j in range(in_f):
        g = int(g_idx[j])
        expected[:, j] = (codes[:, j].float() - zero[:, g, 0]) * scale[:, g, 0]
    torch.testing.assert_close(layer.dequantized_weight(), expected, atol=0, rtol=0)
    assert torch.equal(layer.weight_codes(), codes)
    x = torch.randn(5, in_f)
    torch.testing.assert_close(layer(x), F.linear(x, expected, bias), atol=0, rtol=0)
    # same state_dict keys as the layer it rebuilds
    rebuilt = QuantizedLinear(in_f, out_f, spec, num_groups=in_f // group)
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 4\)"):
        QuantizedLinear.from_quantized(codes, scale, zero, spec, bias, g_idx + 4)
    with pytest.raises(ValueError, match="scale has shape"):
        QuantizedLinear.from_quantized(codes, scale[:, :2], zero[:, :2], spec, bias)
    with pytest.raises(ValueError, match="outside the signed 4-bit range"):
        QuantizedLinear.from_quantized(
            codes, *choose_qparams(codes.float(), QuantSpec(bits=4)), QuantSpec(bits=4)
        )


def test_from_quantized_rtn_codes_match_dequantize():
    spec = QuantSpec(bits=3, granularity=PerGroup(16))
    w = torch.randn(12, 48)
    qp = choose_qparams(w, spec)
    codes = quantize(w, *qp, spec)
    layer = QuantizedLinear.from_quantized(codes, *qp, spec)
    torch.testing.assert_close(
        layer.dequantized_weight(), dequantize(codes, *qp, spec), atol=0, rtol=0
    )


def test_state_dict_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    act = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    fq = _fake(QuantSpec(bits=4, granularity=PerGroup(16)), act)
    layer = QuantizedLinear.from_fake_quant(fq)
    state = layer.state_dict()
    assert {"packed_weight", "weight_scale", "weight_zero_point", "bias", "act_quant.scale"} <= set(
        state
    )
    assert state["packed_weight"].dtype == torch.uint8
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "layer.safetensors")
    fresh = QuantizedLinear(
        64, 24, QuantSpec(bits=4, granularity=PerGroup(16)), activation_spec=act
    )
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)
