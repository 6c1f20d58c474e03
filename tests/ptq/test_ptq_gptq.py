"""GPTQ against a straightforward float64 Algorithm 1, and its options and failure modes."""

from __future__ import annotations

import pytest
import torch

from distiq.ptq import gptq_quantize, reconstruction_error, rtn_quantize
from distiq.ptq.gptq import inverse_hessian_factor
from distiq.quant import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from distiq.quant.functional import choose_qparams, dequantize, quantize


def reference_gptq(W, H, spec, *, damp=0.01, act_order=False, static_groups=False):
    """Algorithm 1 of Frantar et al. in float64, one column at a time, every update applied
    immediately (no lazy blocks), inverse Hessian by ``torch.linalg.inv``. Returns (Q, codes)."""
    W = W.double().clone()
    H = H.double().clone()
    n_cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    group_size = spec.granularity.size if isinstance(spec.granularity, PerGroup) else None
    if group_size is None:
        s, z = choose_qparams(W, spec)
        s, z = s.expand(W.shape[0], 1)[:, :, None], z.expand(W.shape[0], 1)[:, :, None]
    elif static_groups:
        all_s, all_z = choose_qparams(W, spec)
    perm = torch.arange(n_cols)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(n_cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.int32)
    column_spec = spec.replace(granularity=PerGroup(1))
    for i in range(n_cols):
        if group_size is not None:
            if static_groups:
                g = int(perm[i]) // group_size
                s, z = all_s[:, g : g + 1], all_z[:, g : g + 1]
            elif i % group_size == 0:
                group_spec = spec.replace(granularity=PerGroup(group_size))
                s, z = choose_qparams(W[:, i : i + group_size], group_spec)
        c = quantize(W[:, i : i + 1], s, z, column_spec)
        q = dequantize(c, s, z, column_spec, dtype=W.dtype)[:, 0]
        codes[:, i], Q[:, i] = c[:, 0], q
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= torch.outer(err, U[i, i:])
    inverse = torch.argsort(perm)
    return Q[:, inverse], codes[:, inverse]


def correlated_problem(out_features=24, in_features=96, tokens=512, rank=8, seed=0):
    """W (out, in) and H = 2/n XᵀX of strongly correlated inputs (low rank + noise)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, in_features, generator=g)
    X += 0.3 * torch.randn(tokens, in_features, generator=g)
    X *= torch.linspace(0.2, 3.0, in_features)  # unequal input scales: act-order matters
    W = torch.randn(out_features, in_features, generator=g)
    return W, 2 / tokens * X.T @ X, X


SPECS = {
    "3bit-channel": QuantSpec(bits=3, granularity=PerChannel(0)),
    "4bit-asym-g16": QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16)),
    "4bit-g48": QuantSpec(bits=4, granularity=PerGroup(48)),
    "3bit-tensor": QuantSpec(bits=3, granularity=PerTensor()),
    "nf4-g32": QuantSpec(bits=4, format="nf4", granularity=PerGroup(32)),
    "4bit-mse-g32": QuantSpec(
        bits=4, symmetric=False, observer="mse", mse_grid=20, granularity=PerGroup(32)
    ),
}


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_matches_float64_algorithm1(name, act_order):
    spec = SPECS[name]
    W, H, _ = correlated_problem()
    H[7, :] = H[:, 7] = 0  # one dead input
    statics = [False, True] if isinstance(spec.granularity, PerGroup) else [False]
    for static_groups in statics:
        Q_ref, codes_ref = reference_gptq(
            W, H, spec, act_order=act_order, static_groups=static_groups
        )
        # block sizes that split groups (7) and cover everything (128)
        for block_size in (7, 128):
            r = gptq_quantize(
                W.double(),
                H.double(),
                spec,
                block_size=block_size,
                act_order=act_order,
                static_groups=static_groups,
            )
            assert torch.equal(r.codes, codes_ref)
            torch.testing.assert_close(r.weight, Q_ref, rtol=0, atol=1e-12)
        r32 = gptq_quantize(W, H, spec, act_order=act_order, static_groups=static_groups)
        assert r32.weight.dtype == torch.float32
        assert (r32.codes != codes_ref).float().mean() < 0.01  # float32 rounding: rare ties


def test_gptq_error_below_rtn_on_correlated_inputs():
    W, H, X = correlated_problem(out_features=32, in_features=128, tokens=1024)
    for spec in (QuantSpec(bits=3), QuantSpec(bits=4, symmetric=False, granularity=PerGroup(32))):
        rtn = rtn_quantize(W, spec, H)
        gptq = gptq_quantize(W, H, spec)
        act = gptq_quantize(W, H, spec, act_order=True)
        assert gptq.relative_error < 0.5 * rtn.relative_error
        assert act.relative_error < rtn.relative_error
        # the reported error is the mean over inputs of ‖(W − Q) x‖²
        direct = ((W - gptq.weight) @ X.T).pow(2).sum() / X.shape[0]
        torch.testing.assert_close(torch.tensor(gptq.error), direct, rtol=1e-4, atol=0)
        expected_rel = direct / (W @ X.T).pow(2).sum() * X.shape[0]
        torch.testing.assert_close(
            torch.tensor(gptq.relative_error), expected_rel, rtol=1e-4, atol=0
        )


def test_act_order_g_idx_is_consistent():
    W, H, _ = correlated_problem()
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    r = gptq_quantize(W, H, spec, act_order=True)
    perm = torch.argsort(H.diagonal(), descending=True)
    assert r.g_idx.shape == (96,) and r.g_idx.dtype == torch.int32
    # groups are runs of 16 columns in act order
    assert torch.equal(r.g_idx[perm].long(), torch.arange(96) // 16)
    assert r.scale.shape == (24, 6, 1)
    # weight = (codes − z[g_idx]) · s[g_idx], codes within the grid
    scale, zero = r.column_qparams()
    torch.testing.assert_close(r.weight, (r.codes.float() - zero) * scale, rtol=0, atol=0)
    assert int(r.codes.min()) >= spec.quant_min and int(r.codes.max()) <= spec.quant_max
    # without act-order there is no g_idx and dequantize() rebuilds the weight directly
    plain = gptq_quantize(W, H, spec)
    assert plain.g_idx is None
    rebuilt = dequantize(plain.codes, plain.scale, plain.zero_point, spec)
    torch.testing.assert_close(plain.weight, rebuilt, rtol=0, atol=0)


def test_static_groups_use_the_original_weight():
    W, H, _ = correlated_problem()
    spec = QuantSpec(bits=3, symmetric=False, granularity=PerGroup(32))
    r = gptq_quantize(W, H, spec, act_order=True, static_groups=True)
    scale, zero = choose_qparams(W, spec)
    torch.testing.assert_close(r.scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(r.zero_point, zero, rtol=0, atol=0)
    assert torch.equal(r.g_idx.long(), torch.arange(96) // 32)
    torch.testing.assert_close(r.weight, dequantize(r.codes, scale, zero, spec), rtol=0, atol=0)
    dynamic = gptq_quantize(W, H, spec, act_order=True)
    assert not torch.equal(dynamic.scale, scale)  # dynamic groups see the updated columns
    with pytest.raises(ValueError, match="static_groups=True needs a per-group spec"):
        gptq_quantize(W, H, QuantSpec(bits=4), static_groups=True)


def test_singular_hessian_raises_damping_with_a_warning():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 32, generator=g)  # 8 tokens for 32 inputs: H has rank 8
    H = 2 / 8 * X.T @ X
    W = torch.randn(16, 32, generator=g)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        r = gptq_quantize(W, H, QuantSpec(bits=4), damp=0.0)
    assert r.damp > 0 and torch.isfinite(r.weight).all()
    # indefinite (negative eigenvalue, positive diagonal): damping grows until it is PD
    Hbad = torch.eye(32) + 0.9 * (torch.ones(32, 32) - torch.eye(32))
    Hbad[0, 1] = Hbad[1, 0] = -0.95
    with pytest.warns(RuntimeWarning, match="retrying with"):
        U, used = inverse_hessian_factor(Hbad, 0.01)
    assert used > 0.01
    Hd = Hbad + used * Hbad.diagonal().mean() * torch.eye(32)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-4, atol=1e-4)
    assert torch.equal(U, torch.triu(U))


def test_dead_inputs_get_zero_weights():
    W, H, _ = correlated_problem()
    dead = [0, 5, 50]
    H[dead, :] = 0
    H[:, dead] = 0
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    r = gptq_quantize(W, H, spec, act_order=True)
    assert torch.equal(r.weight[:, dead], torch.zeros(24, 3))
    assert torch.isfinite(r.weight).all()
    # dead inputs never reach the output: the error ignores them
    alive = [i for i in range(96) if i not in dead]
    W_alive = W[:, alive]
    H_alive = H[alive][:, alive]
    err, _ = reconstruction_error(W_alive, r.weight[:, alive], H_alive)
    assert r.error == pytest.approx(err, rel=1e-6)


def test_bad_inputs_are_clear_errors():
    W, H, _ = correlated_problem()
    spec = QuantSpec(bits=4)
    bad_w = W.clone()
    bad_w[3, 4] = float("nan")
    with pytest.raises(ValueError, match="the weight has 1 NaN/Inf"):
        gptq_quantize(bad_w, H, spec)
    bad_h = H.clone()
    bad_h[2, 2] = float("inf")
    with pytest.raises(ValueError, match="the Hessian has 1 NaN/Inf"):
        gptq_quantize(W, bad_h, spec)
    with pytest.raises(ValueError, match=r"must be \(in_features, in_features\) = \(96, 96\)"):
        gptq_quantize(W, H[:95, :95], spec)
    with pytest.raises(ValueError, match="group size 40 does not divide"):
        gptq_quantize(W, H, QuantSpec(bits=4, granularity=PerGroup(40)))
    with pytest.raises(ValueError, match="use PerChannel"):
        gptq_quantize(W, H, QuantSpec(bits=4, granularity=PerChannel(1)))
    with pytest.raises(ValueError, match="not supported for weights"):
        rtn_quantize(W, QuantSpec(bits=4, granularity=PerToken()))
    with pytest.raises(ValueError, match="fp8 weights need no calibration"):
        gptq_quantize(W, H, QuantSpec(bits=8, format="fp8_e4m3", granularity=PerChannel(0)))
    neg = H.clone()
    neg[1, 1] = -1.0
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize(W, neg, spec)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, H, spec, block_size=0)
    with pytest.raises(ValueError, match="the weight must be"):
        gptq_quantize(W[0], H, spec)
    with pytest.raises(ValueError, match="bits=9 is outside 2-8"):
        QuantSpec(bits=9)


def test_half_precision_weights_keep_their_dtype():
    W, H, _ = correlated_problem()
    r = gptq_quantize(W.to(torch.bfloat16), H, QuantSpec(bits=4))
    assert r.weight.dtype == torch.bfloat16 and r.weight.shape == W.shape
    assert r.codes.dtype == torch.int32
