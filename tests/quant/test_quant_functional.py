"""Pure functions: exact equality with torch's fake-quantize ops, the fused weight path, bad input."""

import pytest
import torch

from distiq.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)
from distiq.quant.fused import fake_quant_linear, fake_quantize_weight


def _torch_fake(x, scale, zero, spec):
    """torch's own op for the same qparams (int zero-points, as torch's int8 observers give)."""
    zero_i = zero.reshape(-1).round().to(torch.int32)
    if isinstance(spec.granularity, PerTensor):
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()), zero_i.reshape(()), spec.quant_min, spec.quant_max
        )
    return torch.fake_quantize_per_channel_affine(
        x, scale.reshape(-1), zero_i, spec.granularity.axis % x.ndim, spec.quant_min, spec.quant_max
    )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerChannel(1)])
def test_int8_fake_quantize_equals_torch_exactly(symmetric, granularity):
    x = torch.randn(33, 70) * 3 + 0.5
    spec = QuantSpec(bits=8, symmetric=symmetric, granularity=granularity)
    scale, zero = choose_qparams(x, spec)
    ours = fake_quantize(x, scale, zero, spec)
    ref = _torch_fake(x, scale, zero, spec)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    # STE gradient: identical clipping mask
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (fake_quantize(xa, scale, zero, spec) * g).sum().backward()
    (_torch_fake(xb, scale, zero, spec) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0), PerGroup(16), PerToken()])
def test_inference_path_equals_the_autograd_forward(dtype, bits, granularity):
    # Without gradients fake_quantize runs in one buffer; it must give the same bits as the
    # autograd function, including a learnable (unrounded) zero-point under no_grad.
    x = (torch.randn(6, 64) * 2 + 0.3).to(dtype)
    spec = QuantSpec(bits=bits, symmetric=False, granularity=granularity)
    scale, zero = choose_qparams(x.float(), spec)
    learned_zero = (zero + 0.3).requires_grad_(True)
    for z in (zero, learned_zero):
        reference = fake_quantize(x.clone().requires_grad_(True), scale, z, spec).detach()
        with torch.no_grad():
            fast = fake_quantize(x, scale, z, spec)
        assert fast.dtype == dtype
        torch.testing.assert_close(fast, reference, atol=0, rtol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_int8_explicit_signedness_matches_torch(signed):
    x = torch.randn(8, 40)
    spec = QuantSpec(bits=8, symmetric=False, signed=signed, granularity=PerChannel(0))
    scale, zero = choose_qparams(x, spec)
    assert spec.quant_min == (-128 if signed else 0)
    torch.testing.assert_close(
        fake_quantize(x, scale, zero, spec), _torch_fake(x, scale, zero, spec), atol=0, rtol=0
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "granularity", [PerChannel(0), PerGroup(16), PerTensor(), PerChannel(1), PerToken()]
)
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_fused_weight_fake_quant_is_bit_identical(bits, symmetric, granularity, observer):
    w = torch.randn(24, 64)
    w[3, 5] = 9.0  # an outlier
    spec = QuantSpec(
        bits=bits, symmetric=symmetric, granularity=granularity, observer=observer, mse_grid=20
    )
    ref_qp = choose_qparams(w, spec)
    ref = fake_quantize(w, *ref_qp, spec)
    out, qp, clipped = fake_quantize_weight(w, spec)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(qp.scale, ref_qp.scale, atol=0, rtol=0)
    torch.testing.assert_close(qp.zero_point, ref_qp.zero_point, atol=0, rtol=0)
    # clipped indices == where the STE gradient of fake_quantize is zero
    wr = w.clone().requires_grad_(True)
    fake_quantize(wr, *ref_qp, spec).sum().backward()
    expect = (wr.grad.reshape(-1) == 0).nonzero().squeeze(1)
    assert torch.equal(clipped.sort().values, expect)


def test_fused_linear_gradients_match_autograd_reference():
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(8))
    w = torch.randn(12, 32, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = fake_quant_linear(x, w, b, spec)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), (x, w, b))
    w_ref = w.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    qp = choose_qparams(w_ref, spec)
    y_ref = torch.nn.functional.linear(x_ref, fake_quantize(w_ref, *qp, spec), b_ref)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    refs = torch.autograd.grad((y_ref * g).sum(), (x_ref, w_ref, b_ref))
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_quantize_dequantize_roundtrip_and_code_range():
    x = torch.randn(10, 32)
    for spec in [
        QuantSpec(bits=3, symmetric=False, granularity=PerGroup(8)),
        QuantSpec(bits=4),
        QuantSpec(bits=8, granularity=PerTensor()),
    ]:
        qp = choose_qparams(x, spec)
        codes = quantize(x, *qp, spec)
        assert codes.dtype == torch.int32
        assert int(codes.min()) >= spec.quant_min and int(codes.max()) <= spec.quant_max
        torch.testing.assert_close(dequantize(codes, *qp, spec), fake_quantize(x, *qp, spec))


def test_mse_observer_error_not_above_minmax():
    w = torch.randn(16, 128)
    w[:, 0] *= 8  # heavy outliers: clipping helps
    base = QuantSpec(bits=3, granularity=PerChannel(0))
    err = {}
    for observer in ("minmax", "mse"):
        spec = base.replace(observer=observer)
        err[observer] = (fake_quantize(w, *choose_qparams(w, spec), spec) - w).abs().pow(2.4).sum(1)
    assert (err["mse"] <= err["minmax"] + 1e-6).all()
    assert err["mse"].sum() < err["minmax"].sum()


def test_percentile_observer_clips_outliers():
    x = torch.randn(1, 10000)
    x[0, 0] = 100.0
    spec = QuantSpec(bits=8, granularity=PerTensor(), observer="percentile", percentile=99.9)
    scale, _ = choose_qparams(x, spec)
    assert float(scale) * 127.5 < 10.0  # the outlier does not set the range


# -- bad input: each error names the fix -----------------------------------------------------
@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_outside_range_is_a_clear_error(bits):
    with pytest.raises(ValueError, match=r"outside 2-8"):
        QuantSpec(bits=bits)


def test_group_size_not_dividing_input_width():
    spec = QuantSpec(bits=4, granularity=PerGroup(48))
    with pytest.raises(ValueError, match=r"does not divide .* \(e\.g\. \d+\)"):
        choose_qparams(torch.randn(4, 100), spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_weights_are_rejected(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf .*fix the model or data"):
        choose_qparams(w, QuantSpec(bits=4))


def test_nf4_and_fp8_specs_validate():
    with pytest.raises(ValueError, match="set bits=4"):
        QuantSpec(bits=8, format="nf4", granularity=PerGroup(64))
    with pytest.raises(ValueError, match="PerGroup"):
        QuantSpec(bits=4, format="nf4", granularity=PerChannel(0))
    with pytest.raises(ValueError, match="learnable"):
        QuantSpec(bits=8, format="fp8_e4m3", learnable=True)


def test_fp8_and_nf4_fake_quantize_straight_through_and_exact():
    x = torch.randn(4, 64, requires_grad=True)
    for spec in [
        QuantSpec(bits=8, format="fp8_e4m3", granularity=PerChannel(0)),
        QuantSpec(bits=4, format="nf4", granularity=PerGroup(64)),
    ]:
        qp = choose_qparams(x, spec)
        out = fake_quantize(x, *qp, spec)
        # forward is exactly dequantize(quantize(.)) (no x + (q - x) rounding)
        exact = dequantize(quantize(x.detach(), *qp, spec), *qp, spec)
        torch.testing.assert_close(out, exact, atol=0, rtol=0)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(grad, torch.ones_like(x))
