"""Quantization-aware terms: prediction difference, Q/K entropy, rounding / range regulariser."""

import math

import pytest
import torch

from distiq.distill import (
    divergence,
    kl_divergence,
    prediction_difference,
    qk_entropy_loss,
    rounding_regularizer,
    split_heads,
)


def test_prediction_difference_is_the_divergence_with_a_detached_fp_target():
    fp = torch.randn(2, 4, 9, requires_grad=True)
    quant = torch.randn(2, 4, 9, requires_grad=True)
    mask = torch.rand(2, 4) > 0.3
    for name in ("forward_kl", "reverse_kl", "js", "tv", "confidence_aware_kl"):
        got = prediction_difference(fp, quant, divergence_name=name, temperature=1.5, mask=mask)
        want = divergence(name, quant, fp.detach(), temperature=1.5, mask=mask)
        torch.testing.assert_close(got, want)
    prediction_difference(fp, quant).backward()
    assert fp.grad is None and quant.grad is not None
    torch.testing.assert_close(
        prediction_difference(fp, quant), kl_divergence(quant, fp, direction="forward")
    )
    assert prediction_difference(quant, quant).abs() < 1e-6
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("kl", quant, fp)


def ref_qk_entropy(q, k, mask):
    total = 0.0
    for x in (q, k):
        b, h, t, _ = x.shape
        for head in range(h):
            vals = [
                math.log1p(x[i, head, j].double().var(correction=0).item())
                for i in range(b)
                for j in range(t)
                if mask[i, j]
            ]
            total += sum(vals) / len(vals)
    return -total


def test_qk_entropy_matches_reference_and_grows_with_spread():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 5, 8) * 3  # grouped-query keys: fewer heads
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = qk_entropy_loss(q, k, mask=mask)
    assert got.item() == pytest.approx(ref_qk_entropy(q, k, mask), rel=1e-5)
    assert got < 0
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(qk_entropy_loss(q, k), qk_entropy_loss(q, k, mask=full))
    # minimising the term spreads queries and keys out (larger variance)
    assert qk_entropy_loss(2 * q, 2 * k) < qk_entropy_loss(q, k)
    x = q.clone().requires_grad_()
    qk_entropy_loss(x, k, mask=mask).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, :, 3:] == 0).all()


def test_split_heads_layout():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    heads = split_heads(x, 4)
    assert heads.shape == (2, 2, 3, 4)
    torch.testing.assert_close(heads[1, 1, 2], x[1, 2, 4:])
    with pytest.raises(ValueError, match="divisible"):
        split_heads(x, 3)


def test_rounding_regularizer_reference_and_zero_on_grid():
    torch.manual_seed(1)
    scale = torch.rand(4, 1) * 0.1 + 0.05
    zero = torch.zeros(4, 1)
    codes = torch.randint(-8, 8, (4, 6)).float()
    on_grid = codes * scale
    assert rounding_regularizer(on_grid, scale, zero, -8, 7).item() == pytest.approx(0.0, abs=1e-12)
    w = torch.randn(4, 6, dtype=torch.float64) * 0.4
    s64, z64 = scale.double(), torch.full((4, 1), 1.6, dtype=torch.float64)  # round(z) = 2
    ref = (w - s64 * (torch.clamp(torch.round(w / s64) + 2.0, -8, 7) - 2.0)) ** 2
    torch.testing.assert_close(rounding_regularizer(w, s64, z64, -8, 7), ref.mean())
    torch.testing.assert_close(rounding_regularizer(w, s64, z64, -8, 7, reduction="none"), ref)


def test_rounding_regularizer_pulls_weights_to_grid_and_reaches_learnable_scale():
    scale = torch.full((3, 1), 0.1, requires_grad=True)
    zero = torch.zeros(3, 1, requires_grad=True)
    w = (torch.randn(3, 8) * 0.3).requires_grad_()
    start_err = ((w / 0.1) - torch.round(w / 0.1)).abs().detach()
    rounding_regularizer(w, scale, zero, -8, 7, reduction="sum").backward()
    assert scale.grad.abs().sum() > 0 and zero.grad.abs().sum() > 0
    with torch.no_grad():
        w_new = w - 0.1 * w.grad  # a small gradient step
    in_range = (w.detach().abs() / 0.1) < 7
    new_err = ((w_new / 0.1) - torch.round(w_new / 0.1)).abs()
    assert (new_err[in_range] <= start_err[in_range] + 1e-6).all()
    assert new_err[in_range].sum() < start_err[in_range].sum()
    # a weight far outside the range is pulled back toward it
    far = torch.tensor([[5.0]], requires_grad=True)
    rounding_regularizer(far, torch.tensor([[0.1]]), torch.tensor([[0.0]]), -8, 7).backward()
    assert far.grad.item() > 0  # descending the gradient decreases the weight


def test_rounding_regularizer_per_group_and_errors():
    w = torch.randn(2, 8)
    scale = torch.rand(2, 4) + 0.1  # groups of 2 along the input dimension
    zero = torch.zeros(2, 4)
    got = rounding_regularizer(w, scale, zero, -2, 1, reduction="none")
    s_full = scale.repeat_interleave(2, dim=1)
    ref = (w - s_full * torch.clamp(torch.round(w / s_full), -2, 1)) ** 2
    torch.testing.assert_close(got, ref)
    # distiq.quant's per-group layout (out, in // g, 1) gives the same
    torch.testing.assert_close(
        rounding_regularizer(w, scale.unsqueeze(-1), zero.unsqueeze(-1), -2, 1, reduction="none"),
        ref,
    )
    with pytest.raises(ValueError, match="does not broadcast"):
        rounding_regularizer(w, torch.rand(3, 1) + 0.1, 0.0, -2, 1)
    with pytest.raises(ValueError, match="positive"):
        rounding_regularizer(w, torch.zeros(2, 1), 0.0, -2, 1)
    with pytest.raises(ValueError, match="below"):
        rounding_regularizer(w, 0.1, 0.0, 1, 1)


def test_rounding_regularizer_is_the_fake_quant_error_of_distiq_quant():
    from distiq.quant import PerGroup, QuantSpec
    from distiq.quant.functional import choose_qparams, fake_quantize

    specs = [
        QuantSpec(bits=4),
        QuantSpec(bits=3, symmetric=False),
        QuantSpec(bits=2, granularity=PerGroup(4)),
    ]
    for spec in specs:
        w = torch.randn(6, 16)
        qp = choose_qparams(w, spec)
        want = ((w - fake_quantize(w, qp.scale, qp.zero_point, spec)) ** 2).mean()
        got = rounding_regularizer(w, qp.scale, qp.zero_point, spec.quant_min, spec.quant_max)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_rounding_regularizer_analytic_gradients_match_autograd_of_the_formula():
    torch.manual_seed(3)
    for scale_shape, zero_shape in [((5, 1), (5, 1)), ((), ()), ((5, 2, 1), (5, 2, 1))]:
        w = (torch.randn(5, 8, dtype=torch.float64) * 0.5).requires_grad_()
        s = (torch.rand(scale_shape, dtype=torch.float64) * 0.1 + 0.05).requires_grad_()
        z = (torch.rand(zero_shape, dtype=torch.float64) * 3 - 1).requires_grad_()
        got = rounding_regularizer(w, s, z, -4, 3)
        grads = torch.autograd.grad(got, (w, s, z))
        wv = w.view(5, 2, 4) if len(scale_shape) == 3 else w
        z_int = z + (torch.round(z) - z).detach()
        codes = torch.clamp(torch.round(wv.detach() / s.detach()) + torch.round(z.detach()), -4, 3)
        want = ((wv - s * (codes - z_int)) ** 2).mean()
        torch.testing.assert_close(got, want)
        for g, r in zip(grads, torch.autograd.grad(want, (w, s, z))):
            torch.testing.assert_close(g, r)
