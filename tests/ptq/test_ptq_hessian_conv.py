"""Hessian accumulation (Linear, Conv2d by unfolding), conv GPTQ, and RTN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distiq.ptq import HessianAccumulator, gptq_quantize, quantize_layer, rtn_quantize
from distiq.ptq.hessian import conv2d_patches
from distiq.quant import PerChannel, PerGroup, QuantSpec, fake_quantize
from distiq.quant.functional import choose_qparams


def test_linear_hessian_is_two_over_n_xxt_over_all_tokens():
    layer = nn.Linear(12, 5)
    acc = HessianAccumulator(layer)
    xs = [torch.randn(3, 7, 12), torch.randn(2, 4, 12)]
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    assert acc.tokens == 29
    torch.testing.assert_close(acc.hessian().double(), 2 / 29 * X.T @ X, rtol=1e-5, atol=1e-6)


CONVS = {
    "pad1": dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    "stride2-dil2": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2),
    "same-reflect": dict(
        in_channels=3, out_channels=5, kernel_size=(3, 2), padding="same", padding_mode="reflect"
    ),
    "grouped": dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_patches_reproduce_the_convolution(name):
    conv = nn.Conv2d(**CONVS[name], bias=False)
    x = torch.randn(2, conv.in_channels, 9, 8)
    y = conv(x)  # (B, out, H', W')
    rows = conv2d_patches(conv, x)  # (B·H'·W', C·kh·kw)
    G = conv.groups
    per_group = rows.reshape(rows.shape[0], G, -1)
    w = conv.weight.flatten(1).reshape(G, conv.out_channels // G, -1)
    # conv(x) = W_flat @ patches, per group of channels
    out = torch.einsum("ngd,god->ngo", per_group, w).reshape(rows.shape[0], -1)
    expected = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    acc = HessianAccumulator(conv)
    acc.add(x)
    H = acc.hessian()
    d = conv.in_channels // G * conv.kernel_size[0] * conv.kernel_size[1]
    assert H.shape == ((d, d) if G == 1 else (G, d, d))
    block = per_group[:, -1].double()
    last = H if G == 1 else H[-1]
    torch.testing.assert_close(
        last.double(), 2 / rows.shape[0] * block.T @ block, rtol=1e-5, atol=1e-5
    )


def test_conv_gptq_by_unfolding_reduces_the_output_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False)
    smooth = F.interpolate(torch.randn(6, 4, 4, 4), size=(10, 10), mode="bilinear")
    x = smooth + 0.1 * torch.randn(6, 4, 10, 10)  # neighbouring pixels correlate, as in images
    acc = HessianAccumulator(conv)
    acc.add(x)
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(12))
    result = gptq_quantize(conv.weight.detach(), acc.hessian(), spec, act_order=True)
    rtn = rtn_quantize(conv.weight.detach(), spec, acc.hessian())
    assert result.weight.shape == conv.weight.shape and result.codes.shape == (8, 36)
    # the reported error is the mean over output positions of ‖conv_W(x) − conv_Q(x)‖²
    diff = F.conv2d(x, conv.weight - result.weight, padding=1)
    direct = diff.pow(2).sum() / acc.tokens
    assert result.error == pytest.approx(float(direct), rel=1e-4)
    assert result.relative_error < 0.7 * rtn.relative_error


def test_grouped_conv_is_quantized_group_by_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False).requires_grad_(
        False
    )  # d = 2·3·3 = 18 per group
    x = torch.randn(4, 6, 8, 8)
    acc = HessianAccumulator(conv)
    acc.add(x)
    spec = QuantSpec(bits=4, granularity=PerChannel(0))
    result = quantize_layer(conv, spec, acc.hessian(), "gptq")
    assert result.weight.shape == conv.weight.shape and result.scale.shape == (6, 1)
    for g in range(3):
        part = gptq_quantize(conv.weight[2 * g : 2 * g + 2].detach(), acc.hessian()[g], spec)
        torch.testing.assert_close(result.weight[2 * g : 2 * g + 2], part.weight, rtol=0, atol=0)
    diff = F.conv2d(x, conv.weight - result.weight, padding=1, groups=3)
    assert result.error == pytest.approx(float(diff.pow(2).sum() / acc.tokens), rel=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, granularity=PerChannel(0)),
        QuantSpec(bits=3, symmetric=False, granularity=PerGroup(8)),
        QuantSpec(bits=4, observer="mse", granularity=PerChannel(0)),
    ],
)
def test_rtn_equals_fake_quantize(spec):
    W = torch.randn(10, 32)
    r = rtn_quantize(W, spec)
    scale, zero = choose_qparams(W, spec)
    torch.testing.assert_close(r.weight, fake_quantize(W, scale, zero, spec), rtol=0, atol=0)
    assert r.codes.dtype == torch.int32 and r.error is None
    assert r.scale.shape == scale.shape
