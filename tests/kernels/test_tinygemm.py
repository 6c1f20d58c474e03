"""PyTorch's int4 tinygemm kernel on distiq's W4A16 weights: the scale/zero mapping against
distiq's own dequantization (through PyTorch's CPU twin of the kernel), the dispatch rules,
the cache, and (with a GPU) the CUDA kernel behind ``w4a16_linear``."""

import pytest
import torch

from distiq.kernels import dequantize_w4a16, pack_w4a16, w4a16_linear
from distiq.kernels.tinygemm import (
    TINYGEMM_MAX_ROWS,
    pack_tinygemm,
    tinygemm_inner_k_tiles,
    tinygemm_linear,
    tinygemm_scales_and_zeros,
    tinygemm_unsupported_reason,
)
from distiq.kernels.w4a16 import (
    GEMV_MAX_ROWS,
    select_w4a16_kernel,
    tinygemm_weight,
    unpack_w4a16_codes,
)
from distiq.quant.functional import choose_qparams, dequantize, quantize
from distiq.quant.spec import PerGroup, QuantSpec


def _weight(n, k, group, dtype=torch.bfloat16, device="cpu"):
    """A W4A16Weight from distiq's own asymmetric 4-bit quantizer, its codes forced to hold both
    extremes (0 and 15) in every group of the first row, and distiq's dequantized weight."""
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(group))
    w = torch.randn(n, k) * torch.rand(n, 1)  # rows of different scales
    s, z = choose_qparams(w, spec)
    codes = quantize(w, s, z, spec)
    codes[0, ::group] = 0
    codes[0, 1::group] = 15
    assert codes.min() == 0 and codes.max() == 15
    packed = pack_w4a16(codes, s, z, group, dtype=dtype)
    return packed.to(device), dequantize(codes, s, z, spec)


def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_scales_and_zeros_reproduce_distiq_weights_exactly_in_float64():
    """(c − 8)·s' + z' = c·s − zs for every code when s', z' are not rounded: the mapping is
    exact, so any error left is bf16 rounding alone."""
    scale, zero_scaled = torch.rand(3, 5) + 0.1, torch.randn(3, 5)
    pairs = tinygemm_scales_and_zeros(scale, zero_scaled)
    assert pairs.shape == (3, 5, 2) and pairs.dtype == torch.bfloat16 and pairs.is_contiguous()
    s = scale.double()
    zero = 8 * s - zero_scaled.double()
    for code in range(16):
        torch.testing.assert_close((code - 8) * s + zero, code * s - zero_scaled.double())
    torch.testing.assert_close(pairs[..., 0], scale.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(pairs[..., 1], zero.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("pack_dtype", [torch.bfloat16, torch.float32])
def test_cpu_tinygemm_matches_distiq_dequantized_weights(group, pack_dtype):
    """PyTorch's ``_weight_int4pack_mm_for_cpu`` with our packing and scales_and_zeros equals
    ``x @ dequantize_w4a16(w)ᵀ`` up to bf16 rounding (a wrong offset, sign or nibble order is
    off by O(1)), for random codes including 0 and 15, with and without bias and batch dims."""
    n, k = 48, 512
    weight, reference = _weight(n, k, group, dtype=pack_dtype)
    distiq_w = dequantize_w4a16(weight).double()
    # distiq's packed weight decodes to its quantizer's values (bf16 qparams round them)
    assert _rel_err(distiq_w, reference) < (1e-2 if pack_dtype == torch.bfloat16 else 1e-6)
    tg = pack_tinygemm(unpack_w4a16_codes(weight), weight.scale, weight.zero_scaled, group)
    assert tg.shape == (n, k) and tg.scales_and_zeros.shape == (k // group, n, 2)
    x = torch.randn(2, 3, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    want = x.double() @ distiq_w.t()
    got = tinygemm_linear(x, tg)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, n)
    assert _rel_err(got, want) < 1e-2
    raw = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, k), tg.packed, group, tg.scales_and_zeros
    )
    torch.testing.assert_close(got.reshape(-1, n), raw, rtol=0, atol=0)
    assert _rel_err(tinygemm_linear(x, tg, bias), want + bias.double()) < 1e-2
    # per output: every row's result is within bf16 rounding of the reference
    row_err = (got.double() - want).abs().amax(dim=(0, 1)) / want.abs().amax(dim=(0, 1))
    assert row_err.max() < 2e-2, row_err.max()


def test_cpu_tinygemm_extreme_codes_every_group():
    """All-0 and all-15 codes (the ends of tinygemm's signed range −8 and 7) in every group."""
    n, k, group = 16, 256, 64
    codes = torch.zeros(n, k, dtype=torch.int32)
    codes[::2] = 15
    codes[:, 5::7] = 15 - codes[:, 5::7]
    scale = torch.rand(n, k // group) + 0.5
    zero_point = torch.randint(0, 16, (n, k // group)).float()
    weight = pack_w4a16(codes, scale, zero_point, group, dtype=torch.float32)
    tg = tinygemm_weight(weight)
    x = torch.randn(4, k).to(torch.bfloat16)
    want = x.double() @ dequantize_w4a16(weight).double().t()
    assert _rel_err(tinygemm_linear(x, tg), want) < 1e-2


def test_inner_k_tiles_and_unsupported_shapes():
    assert [tinygemm_inner_k_tiles(k) for k in (128, 4096, 64, 192, 32, 96)] == [8, 8, 4, 4, 2, 2]
    with pytest.raises(ValueError, match="multiple of 32"):
        tinygemm_inner_k_tiles(48)
    assert tinygemm_unsupported_reason(40, 256, 64, "cuda") is None
    assert "multiple of 16" in tinygemm_unsupported_reason(40, 256, 64, "cpu")
    assert "group size 16" in tinygemm_unsupported_reason(32, 256, 16, "cuda")
    assert "group size 512" in tinygemm_unsupported_reason(32, 1024, 512, "cuda")
    assert "in_features 96" in tinygemm_unsupported_reason(32, 96, 64, "cuda")
    assert "mps" in tinygemm_unsupported_reason(32, 256, 64, "mps")
    weight, _ = _weight(24, 256, 64)
    with pytest.raises(ValueError, match="multiple of 16"):  # the CPU kernel's n tile is 16
        tinygemm_weight(weight)
    tg = tinygemm_weight(_weight(32, 256, 64)[0])
    with pytest.raises(ValueError, match="bfloat16"):
        tinygemm_linear(torch.randn(1, 256), tg)
    with pytest.raises(ValueError, match="expects 256"):
        tinygemm_linear(torch.randn(1, 128).to(torch.bfloat16), tg)


def test_tinygemm_weight_is_cached_and_rebuilt_when_the_weight_changes():
    weight, _ = _weight(32, 256, 64)
    first = tinygemm_weight(weight)
    assert tinygemm_weight(weight) is first
    weight.zero_scaled.add_(1.0)  # in place: the cached zeros are stale
    second = tinygemm_weight(weight)
    assert second is not first
    x = torch.randn(2, 256).to(torch.bfloat16)
    want = x.double() @ dequantize_w4a16(weight).double().t()
    assert _rel_err(tinygemm_linear(x, second), want) < 1e-2
    weight.scale = weight.scale * 2  # replaced
    assert tinygemm_weight(weight) is not second
    assert weight.to("cpu")._tinygemm is None  # a moved copy builds its own


CUDA = dict(device_type="cuda", shape=(4096, 4096), capability=(9, 0), triton_available=True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(dtype=torch.bfloat16, group_size=128, rows=1), "tinygemm"),
        (dict(dtype=torch.bfloat16, group_size=32, rows=GEMV_MAX_ROWS), "tinygemm"),
        (dict(dtype=torch.bfloat16, group_size=256, rows=TINYGEMM_MAX_ROWS), "tinygemm"),
        (dict(dtype=torch.bfloat16, group_size=128, rows=TINYGEMM_MAX_ROWS + 1), "dequantize"),
        (dict(dtype=torch.bfloat16, group_size=128, rows=2048), "dequantize"),
        (dict(dtype=torch.bfloat16, group_size=128, rows=0), "dequantize"),
        # tinygemm takes bf16 only: fp16 decode stays on Triton
        (dict(dtype=torch.float16, group_size=128, rows=1), "triton"),
        (dict(dtype=torch.float16, group_size=128, rows=GEMV_MAX_ROWS + 1), "dequantize"),
        (dict(dtype=torch.float32, group_size=128, rows=1), "triton"),
        # group sizes tinygemm lacks: Triton for power-of-two groups, else dequantize
        (dict(dtype=torch.bfloat16, group_size=16, rows=1), "triton"),
        (dict(dtype=torch.bfloat16, group_size=512, rows=4), "triton"),
        (dict(dtype=torch.bfloat16, group_size=512, rows=16), "dequantize"),
        (dict(dtype=torch.bfloat16, group_size=96, rows=1, shape=(4096, 4032)), "dequantize"),
        # N not a multiple of tinygemm's n tile of 8
        (dict(dtype=torch.bfloat16, group_size=128, rows=1, shape=(4100, 4096)), "triton"),
        # pre-Ampere, ROCm (capability None), no Triton, CPU
        (dict(dtype=torch.bfloat16, group_size=128, rows=1, capability=(7, 5)), "triton"),
        (dict(dtype=torch.bfloat16, group_size=128, rows=1, capability=None), "triton"),
        (dict(dtype=torch.float16, group_size=128, rows=1, triton_available=False), "dequantize"),
        (dict(dtype=torch.bfloat16, group_size=128, rows=1, device_type="cpu"), "dequantize"),
    ],
)
def test_dispatch_rules(overrides, expected):
    assert select_w4a16_kernel(**{**CUDA, **overrides}) == expected


def test_cpu_w4a16_linear_dequantizes_and_checks_the_device():
    """On the CPU ``w4a16_linear`` takes the dequantize path (no tinygemm cache is built)."""
    weight, _ = _weight(32, 256, 64)
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = x.double() @ dequantize_w4a16(weight).double().t()
    assert _rel_err(w4a16_linear(x, weight), want) < 1e-2
    assert weight._tinygemm is None
    with pytest.raises(ValueError, match="expects 256"):
        w4a16_linear(torch.randn(3, 128), weight)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_cuda_w4a16_linear_runs_tinygemm_and_matches_reference(group):
    """bf16 on CUDA: ``w4a16_linear`` picks tinygemm (cache built), over row counts up to the
    limit, a ragged N (multiple of 8, not 16), K needing 2 and 4 inner k-tiles, and bias; its
    output equals ``x @ dequantize(W)ᵀ`` and the raw tinygemm op on the cached weight."""
    for n, k in ((40, 4 * group), (1024, 3 * group), (4096, 4096)):  # 3·32, 3·64: 2, 4 k-tiles
        weight, reference = _weight(n, k, group, device="cuda")
        ref = dequantize_w4a16(weight).double()
        assert _rel_err(ref.cpu(), reference) < 1e-2
        bias = torch.randn(n, device="cuda").to(torch.bfloat16)
        for rows in (1, 3, GEMV_MAX_ROWS, 17, TINYGEMM_MAX_ROWS):
            x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
            want = x.double() @ ref.t()
            got = w4a16_linear(x, weight)
            assert weight._tinygemm is not None, (n, k, rows)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            assert _rel_err(got, want) < 1e-2, (n, k, rows, _rel_err(got, want))
            tg = tinygemm_weight(weight)
            raw = torch.ops.aten._weight_int4pack_mm(x, tg.packed, group, tg.scales_and_zeros)
            torch.testing.assert_close(got, raw, rtol=0, atol=0)
            with_bias = w4a16_linear(x[None], weight, bias)[0]
            assert _rel_err(with_bias, want + bias.double()) < 1e-2


@pytest.mark.gpu
def test_cuda_tinygemm_matches_cpu_twin():
    """The CUDA and CPU kernels, each with its own packing of the same codes, agree."""
    weight, _ = _weight(256, 1024, 128)
    x = torch.randn(5, 1024).to(torch.bfloat16)
    cpu = tinygemm_linear(x, tinygemm_weight(weight))
    cuda = tinygemm_linear(x.cuda(), tinygemm_weight(weight.to("cuda")))
    assert _rel_err(cuda.cpu(), cpu.double()) < 1e-2
