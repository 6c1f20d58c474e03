"""LSQ / LSQ+ gradients against finite differences of the straight-through surrogate, and the
gradient scale 1/sqrt(N·Qp)."""

import math

import pytest
import torch

from distiq.quant import PerChannel, PerTensor, QuantSpec, fake_quantize
from distiq.quant.lsq import LsqQuantizer, lsq_fake_quantize, lsq_grad_scale


def _surrogate(x0, s0, z0, qmin, qmax):
    """The function whose derivative the straight-through (LSQ) gradient is, around (x0, s0, z0):
    the rounding residual c = round(x/s) - x/s and the clipping pattern are frozen there, so
    x̂ = s·(x/s + c) = x + s·c inside the grid and s·(q_clamped - z) outside (float64)."""
    c = torch.round(x0 / s0) - x0 / s0
    q = torch.round(x0 / s0) + torch.round(z0)
    inside = (q >= qmin) & (q <= qmax)
    q_clamped = q.clamp(qmin, qmax)

    def f(x, s, z):
        return torch.where(inside, x + s * c, s * (q_clamped - z))

    return f


def _central_difference(f, value, h):
    return (f(value + h) - f(value - h)) / (2 * h)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_gradient_matches_finite_differences(symmetric):
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=PerTensor(), learnable=True)
    x = torch.randn(200, dtype=torch.float64) * 2
    s0 = torch.tensor(0.21, dtype=torch.float64)
    z0 = torch.tensor(0.0 if symmetric else 3.0, dtype=torch.float64)
    weights = torch.randn(200, dtype=torch.float64)
    scale = s0.clone().requires_grad_(True)
    out = lsq_fake_quantize(x, scale, z0, spec, num_elements=1)  # N=1: g = 1/sqrt(Qp)
    (weights * out).sum().backward()
    g = lsq_grad_scale(1, spec.quant_max)
    f = _surrogate(x, s0, z0, spec.quant_min, spec.quant_max)
    fd = _central_difference(lambda s: (weights * f(x, s, z0)).sum(), s0, 1e-6)
    torch.testing.assert_close(scale.grad / g, fd, rtol=1e-7, atol=1e-9)
    # the paper's formula, elementwise, in float64
    q = torch.round(x / s0) + z0
    inside = (q >= spec.quant_min) & (q <= spec.quant_max)
    formula = torch.where(
        inside, torch.round(x / s0) - x / s0, q.clamp(spec.quant_min, spec.quant_max) - z0
    )
    torch.testing.assert_close(scale.grad, g * (weights * formula).sum(), rtol=1e-12, atol=1e-12)


def test_zero_point_gradient_lsq_plus_matches_finite_differences():
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerTensor(), learnable=True)
    x = torch.randn(300, dtype=torch.float64) * 1.5
    s0 = torch.tensor(0.3, dtype=torch.float64)
    z0 = torch.tensor(2.0, dtype=torch.float64)
    weights = torch.randn(300, dtype=torch.float64)
    zero = z0.clone().requires_grad_(True)
    (weights * lsq_fake_quantize(x, s0, zero, spec, num_elements=1)).sum().backward()
    g = lsq_grad_scale(1, spec.quant_max)
    f = _surrogate(x, s0, z0, spec.quant_min, spec.quant_max)
    # z enters through a straight-through round(z): the surrogate is linear in z itself
    fd = _central_difference(lambda z: (weights * f(x, s0, z)).sum(), z0, 1e-6)
    torch.testing.assert_close(zero.grad / g, fd, rtol=1e-7, atol=1e-9)
    assert zero.grad.abs() > 0  # some values clip at 3 bits


def test_input_gradient_matches_finite_differences():
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerTensor())
    x0 = torch.randn(50, dtype=torch.float64) * 3
    s = torch.tensor(0.25, dtype=torch.float64)
    z = torch.tensor(5.0, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    fake_quantize(x, s, z, spec).sum().backward()
    f = _surrogate(x0, s, z, spec.quant_min, spec.quant_max)
    h = 1e-6
    eye = torch.eye(50, dtype=torch.float64)
    fd = torch.stack(
        [
            _central_difference(lambda t, i=i: f(x0 + t * eye[i], s, z).sum(), 0.0, h)
            for i in range(50)
        ]
    )
    torch.testing.assert_close(x.grad, fd, rtol=1e-7, atol=1e-9)
    assert (x.grad == 0).any() and (x.grad == 1).any()


def test_gradient_scale_is_one_over_sqrt_n_qp_and_forward_is_unchanged():
    spec = QuantSpec(bits=4, symmetric=True, granularity=PerChannel(0), learnable=True)
    w = torch.randn(6, 40)
    quant = LsqQuantizer(spec, w)
    out = quant(w)
    out.sum().backward()
    scaled = quant.scale.grad.clone()
    plain_scale = quant.scale.detach().clone().requires_grad_(True)
    plain = fake_quantize(w, plain_scale, quant.zero_point, spec)
    plain.sum().backward()
    torch.testing.assert_close(out, plain, atol=0, rtol=0)  # identity forward, bit for bit
    expected = 1.0 / math.sqrt(40 * spec.quant_max)  # N = 40 elements per channel, Qp = 7
    torch.testing.assert_close(scaled, plain_scale.grad * expected, rtol=1e-6, atol=0)


def test_lsq_init_from_observer_and_bad_input():
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), learnable=True)
    x = torch.randn(100) * 4
    quant = LsqQuantizer(spec, x)
    assert isinstance(quant.zero_point, torch.nn.Parameter)  # LSQ+: learnable offset
    assert isinstance(quant.scale, torch.nn.Parameter)
    with pytest.raises(ValueError, match="num_elements >= 1"):
        lsq_grad_scale(0, 7)
    with pytest.raises(ValueError, match="learnable=True"):
        LsqQuantizer(QuantSpec(bits=4), x)
