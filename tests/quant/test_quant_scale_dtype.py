"""16-bit scales (``QuantSpec.scale_dtype``): the rounding against a float64 reference, observers
(zero-point from the rounded scale), learned scales (straight-through), RTN / GPTQ, configs."""

import pytest
import torch

from distiq.config import ConfigError, dump_yaml, from_dict, load_yaml
from distiq.quant import (
    FakeQuantLinear,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantConfig,
    QuantSpec,
    calibration,
    choose_qparams,
    fake_quantize,
)
from distiq.quant.functional import round_scale
from distiq.quant.fused import fake_quantize_weight
from distiq.quant.lsq import LsqQuantizer, lsq_fake_quantize
from distiq.quant.quantizers import ActivationQuantizer

# (mantissa bits, smallest normal exponent, largest finite value) of each 16-bit format
FORMATS = {
    "float16": (10, -14, 65504.0),
    "bfloat16": (7, -126, float(torch.finfo(torch.bfloat16).max)),
}
TO_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _reference_round(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Nearest ``scale_dtype`` value of each positive float64 ``s`` (ties to even), computed from
    the format's definition: spacing ``2^(e - mantissa_bits)`` in binade ``e`` (subnormals use
    the smallest normal binade), saturated at the largest finite value, floored at the smallest
    subnormal."""
    mantissa, min_exp, largest = FORMATS[scale_dtype]
    _, exponent = torch.frexp(s)  # s = m · 2^exponent, m in [0.5, 1)
    binade = torch.clamp(exponent - 1, min=min_exp).to(torch.float64)
    ulp = torch.pow(2.0, binade - mantissa)
    rounded = torch.round(s / ulp) * ulp  # round half to even; the division is exact
    rounded = torch.clamp(rounded, max=largest)
    return torch.clamp(rounded, min=2.0 ** (min_exp - mantissa))


def _scales() -> torch.Tensor:
    """float32 scales over 16 binades, plus subnormal, tiny, huge and tie cases."""
    torch.manual_seed(0)
    wide = torch.exp(torch.empty(2000).uniform_(-30.0, 14.0))  # 1e-13 .. 1.2e6
    ties = torch.tensor([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2.0**-14 + 2.0**-25, 65519.0])
    edges = torch.tensor([2.0**-23, 2.0**-24, 2.0**-26, 1e-30, 65504.0, 65520.0, 1e9, 3e38])
    return torch.cat([wide, ties, edges]).float()


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_round_scale_matches_float64_reference(scale_dtype):
    s = _scales()
    got = round_scale(s, scale_dtype)
    assert got.dtype == torch.float32 and got.shape == s.shape
    expected = _reference_round(s.double(), scale_dtype)
    torch.testing.assert_close(got.double(), expected, atol=0, rtol=0)
    assert torch.equal(got.to(TO_DTYPE[scale_dtype]).float(), got)  # representable
    assert torch.equal(round_scale(got, scale_dtype), got)  # idempotent
    assert round_scale(s, "float32") is s  # the default changes nothing
    s64 = s.double()
    assert torch.equal(round_scale(s64, scale_dtype), got.double())  # float64 scales too


def test_round_scale_is_straight_through():
    s = (torch.rand(5) + 0.1).requires_grad_(True)
    out = round_scale(s, "float16")
    assert torch.equal(out, round_scale(s.detach(), "float16"))
    weights = torch.randn(5)
    (out * weights).sum().backward()
    assert torch.equal(s.grad, weights)


# -- observers ---------------------------------------------------------------------------------
OBSERVER_SPECS = [
    QuantSpec(bits=4, granularity=PerGroup(64)),
    QuantSpec(bits=4, symmetric=False, granularity=PerGroup(64)),
    QuantSpec(bits=3, symmetric=False, granularity=PerChannel(0), observer="percentile"),
    QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0), observer="mse", mse_grid=20),
    QuantSpec(bits=8, symmetric=False, granularity=PerToken(), dynamic=True),
    QuantSpec(bits=8, granularity=PerTensor(), signed=False),
]


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "base", OBSERVER_SPECS, ids=lambda s: f"{s.observer}-{s.granularity._to_config()}"
)
def test_observer_scales_are_representable_and_zero_points_follow(base, scale_dtype):
    torch.manual_seed(1)
    x = torch.randn(16, 128) * torch.logspace(-4, 1, 16)[:, None] + 0.3  # rows of many sizes
    spec = base.replace(scale_dtype=scale_dtype)
    scale, zero = choose_qparams(x, spec)
    assert torch.equal(scale.to(TO_DTYPE[scale_dtype]).float(), scale)
    if spec.observer != "mse":  # minmax / percentile: round the float32 observer's scale
        scale32, _ = choose_qparams(x, base)
        assert torch.equal(scale, round_scale(scale32, scale_dtype))
        assert not torch.equal(scale, scale32)  # not vacuous
    if not spec.symmetric:  # z = clamp(qmin - round(xmin / s), qmin, qmax) with the rounded s
        from distiq.quant.functional import _rows

        rows, _ = _rows(x, spec)
        xmin = rows.min(dim=1).values.clamp(max=0).reshape(zero.shape)
        if spec.observer == "minmax":
            expected = torch.clamp(
                spec.quant_min - torch.round(xmin / scale), spec.quant_min, spec.quant_max
            )
            assert torch.equal(zero, expected)
        # the zero-point maps 0 exactly onto the grid of the rounded scale
        assert torch.equal(fake_quantize(torch.zeros_like(x), scale, zero, spec), 0 * x)


def test_fused_weight_path_uses_the_rounded_scales():
    torch.manual_seed(2)
    weight = torch.randn(48, 128) * 0.02
    for symmetric in (True, False):
        spec = QuantSpec(
            bits=4, symmetric=symmetric, granularity=PerGroup(64), scale_dtype="float16"
        )
        fused, qparams, _ = fake_quantize_weight(weight, spec)
        scale, zero = choose_qparams(weight, spec)
        assert torch.equal(scale.half().float(), scale)
        assert torch.equal(qparams.scale, scale) and torch.equal(qparams.zero_point, zero)
        assert torch.equal(fused, fake_quantize(weight, scale, zero, spec))


def test_static_activation_calibration_is_rounded():
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), scale_dtype="float16")
    quantizer = ActivationQuantizer(spec, 32)
    quantizer.observing = True
    quantizer(torch.randn(8, 32) * 3.3)
    quantizer.observing = False
    quantizer.freeze()
    scale, zero = quantizer.qparams()
    assert torch.equal(scale.half().float(), scale)
    xmin = quantizer.observed_min
    assert torch.equal(zero, torch.clamp(-torch.round(xmin.clamp(max=0) / scale), 0, 255))


# -- learned scales ---------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_gradient_is_the_float32_formula_at_the_rounded_scale(symmetric):
    """The fp16-scale forward and gradients equal the float32 path started at the rounded
    scale: straight-through rounding, LSQ formula evaluated at round(s)."""
    torch.manual_seed(3)
    x = torch.randn(8, 128) * 0.7
    fp16 = QuantSpec(
        bits=4, symmetric=symmetric, granularity=PerGroup(64), learnable=True,
        scale_dtype="float16",
    )  # fmt: skip
    fp32 = fp16.replace(scale_dtype="float32")
    scale0, zero0 = choose_qparams(x, fp32.replace(learnable=False))
    scale0 = scale0 * 1.0123  # off the float16 grid
    rounded = round_scale(scale0, "float16")
    assert not torch.equal(rounded, scale0)
    weights = torch.randn_like(x)
    grads = []
    for spec, start in ((fp16, scale0), (fp32, rounded)):
        xs = x.clone().requires_grad_(True)
        s = start.clone().requires_grad_(True)
        z = zero0.clone().requires_grad_(not symmetric)
        out = lsq_fake_quantize(xs, s, z, spec)
        (out * weights).sum().backward()
        grads.append((out.detach(), xs.grad, s.grad, z.grad))
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_lsq_quantizer_qparams_are_rounded():
    spec = QuantSpec(bits=4, learnable=True, granularity=PerChannel(0), scale_dtype="bfloat16")
    quantizer = LsqQuantizer(spec, torch.randn(16, 64))
    with torch.no_grad():
        quantizer.scale.mul_(1.01)
    scale, _ = quantizer.qparams()
    assert torch.equal(scale.bfloat16().float(), scale)
    assert torch.equal(scale, round_scale(quantizer.scale.detach(), "bfloat16"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_lsq_linear_matches_the_reference_path(symmetric):
    """FakeQuantLinear's fused LSQ path (training) against lsq_fake_quantize + F.linear."""
    torch.manual_seed(4)
    spec = QuantSpec(
        bits=4, symmetric=symmetric, granularity=PerGroup(64), learnable=True,
        scale_dtype="float16",
    )  # fmt: skip
    layer = FakeQuantLinear.from_float(torch.nn.Linear(128, 24), spec)
    with torch.no_grad():
        layer.weight_quant.lsq.scale.mul_(0.93)  # clip some codes and leave the fp16 grid
    x = torch.randn(5, 128)
    grad_out = torch.randn(5, 24)
    fused = layer(x)
    fused.backward(grad_out)
    lsq = layer.weight_quant.lsq
    got = (fused.detach(), layer.weight.grad.clone(), lsq.scale.grad.clone())
    layer.zero_grad()
    reference = torch.nn.functional.linear(x, layer.weight_quant(layer.weight), layer.bias)
    reference.backward(grad_out)
    expected = (reference.detach(), layer.weight.grad, lsq.scale.grad)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)
    torch.testing.assert_close(got[2], expected[2], atol=1e-6, rtol=1e-5)  # summation order


def test_learnable_activation_scale_is_rounded_straight_through():
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), learnable=True)
    fp16 = spec.replace(scale_dtype="float16")
    x = torch.randn(4, 32) * 2.1
    quantizers = [ActivationQuantizer(s, 32) for s in (fp16, spec)]
    quantizers[0](x)  # initialises from the first batch
    quantizers[1](x)
    with torch.no_grad():
        quantizers[0].scale.mul_(1.0077)
        quantizers[1].scale.copy_(round_scale(quantizers[0].scale, "float16"))
        quantizers[1].zero_point.copy_(quantizers[0].zero_point)
    weights = torch.randn_like(x)
    outs = [q(x) for q in quantizers]
    for out in outs:
        (out * weights).sum().backward()
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(quantizers[0].scale.grad, quantizers[1].scale.grad)
    assert torch.equal(quantizers[0].zero_point.grad, quantizers[1].zero_point.grad)
    assert torch.equal(quantizers[0].qparams().scale, quantizers[1].scale.detach())


# -- post-training quantization ---------------------------------------------------------------
def test_rtn_and_gptq_use_the_rounded_scales():
    from distiq.ptq import gptq_quantize, rtn_quantize
    from distiq.quant import dequantize

    torch.manual_seed(5)
    weight, inputs = torch.randn(32, 128) * 0.05, torch.randn(256, 128)
    hessian = 2 * inputs.T @ inputs / 256
    for symmetric in (True, False):
        spec = QuantSpec(
            bits=4, symmetric=symmetric, granularity=PerGroup(64), scale_dtype="float16"
        )
        results = [
            rtn_quantize(weight, spec),
            gptq_quantize(weight, hessian, spec),
            gptq_quantize(weight, hessian, spec.replace(granularity=PerChannel(0))),
            gptq_quantize(weight, hessian, spec, act_order=True, static_groups=True),
        ]
        for result in results:
            assert torch.equal(result.scale.half().float(), result.scale)
            if result.g_idx is None:
                codes_weight = dequantize(
                    result.codes, result.scale, result.zero_point, result.spec
                )
                assert torch.equal(codes_weight, result.weight)


# -- configuration ----------------------------------------------------------------------------
def test_scale_dtype_round_trips_through_dict_and_yaml(tmp_path):
    spec = QuantSpec(bits=4, granularity=PerGroup(64), scale_dtype="float16")
    assert spec.to_dict()["scale_dtype"] == "float16"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec.from_dict(load_yaml(dump_yaml(spec, tmp_path / "s.yaml"))) == spec
    path = tmp_path / "q.yaml"
    path.write_text(
        "weight: {bits: 4, granularity: per_group(64), scale_dtype: float16}\n"
        "activation: {bits: 8, symmetric: false, granularity: per_tensor, scale_dtype: bfloat16}\n"
        "overrides:\n  lm_head: {weight: {scale_dtype: float32}}\n"
    )
    config = QuantConfig.from_dict(load_yaml(path))
    assert config.weight.scale_dtype == "float16"
    assert config.activation.scale_dtype == "bfloat16"
    assert QuantConfig.from_dict(load_yaml(dump_yaml(config, tmp_path / "c.yaml"))) == config
    assert QuantSpec().scale_dtype == "float32"  # the default


def test_bad_scale_dtype_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"scale_dtype: 'float61' is not allowed .*float16"):
        from_dict(QuantSpec, {"scale_dtype": "float61"})
    with pytest.raises(ValueError, match="scale_dtype 'fp16' is not supported; choose one of"):
        QuantSpec(scale_dtype="fp16")
    with pytest.raises(ValueError, match="applies to format 'int' only.*double quantization"):
        QuantSpec(format="nf4", granularity=PerGroup(64), scale_dtype="float16")
    with pytest.raises(ValueError, match="applies to format 'int' only"):
        QuantSpec(bits=8, format="fp8_e4m3", scale_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"overrides\['x'\]\.weight: .*scale_dtype"):
        from_dict(QuantConfig, {"overrides": {"x": {"weight": {"scale_dtype": "int8"}}}})


def test_calibrated_model_end_to_end_uses_representable_scales():
    """quantize_ + calibration + a training step: every qparam the model uses is a float16
    value (weights per group, static activations per tensor)."""
    from distiq.quant import quantize_

    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    config = QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerGroup(32), learnable=True, scale_dtype="float16"),
        activation=QuantSpec(
            bits=8, symmetric=False, granularity=PerTensor(), scale_dtype="float16"
        ),
    )
    quantize_(model, config)
    x = torch.randn(16, 64)
    with calibration(model):
        model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).square().mean().backward()
    optimizer.step()
    for layer in (model[0], model[2]):
        w_scale, _ = layer.weight_quant.qparams(layer.weight)
        a_scale, _ = layer.act_quant.qparams()
        for scale in (w_scale, a_scale):
            assert torch.equal(scale.half().float(), scale)
