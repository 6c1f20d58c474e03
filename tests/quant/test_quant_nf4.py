"""NF4: the published codebook, and bit-exact agreement with bitsandbytes 0.50 on CPU."""

import warnings

import pytest
import torch

from distiq.quant import PerGroup, QuantSpec, choose_qparams, fake_quantize
from distiq.quant.nf4 import (
    NF4_CODEBOOK,
    dequantize_nf4,
    dynamic_map,
    nf4_codes,
    quantize_nf4,
)

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 values.
PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


@pytest.fixture(scope="module")
def bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.functional")


def _bnb_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bitsandbytes packs the first code of a pair in the high nibble."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n].int()


def test_codebook_is_the_published_one():
    assert NF4_CODEBOOK.dtype == torch.float32
    assert NF4_CODEBOOK.tolist() == torch.tensor(PUBLISHED, dtype=torch.float32).tolist()


def test_codebook_from_normal_quantiles():
    """QLoRA's construction: quantiles of N(0,1) at offset 0.9677, 8 positive / 7 negative
    values plus zero, normalised by the largest."""
    ppf = torch.special.ndtri  # the inverse normal CDF (scipy.stats.norm.ppf)
    offset = 0.9677083
    positive = ppf(torch.linspace(offset, 0.5, 9)[:-1].double()).tolist()
    negative = (-ppf(torch.linspace(offset, 0.5, 8)[:-1].double())).tolist()
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    values = values / values.max()
    torch.testing.assert_close(NF4_CODEBOOK.double(), values, atol=2e-7, rtol=0)


def test_codebook_and_dynamic_map_equal_bitsandbytes(bnb):
    assert torch.equal(bnb.get_4bit_type("nf4", device="cpu"), NF4_CODEBOOK)
    assert torch.equal(bnb.create_dynamic_map(), dynamic_map())


def test_nearest_code_ties_and_clamping():
    mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    assert torch.equal(nf4_codes(mids), torch.arange(15, dtype=torch.int32))  # ties: lower code
    assert nf4_codes(torch.tensor([-3.0, 3.0])).tolist() == [0, 15]
    assert torch.equal(nf4_codes(NF4_CODEBOOK), torch.arange(16, dtype=torch.int32))


@pytest.mark.parametrize("shape", [(64, 256), (37, 320), (10, 100)])
def test_single_level_equals_bitsandbytes_exactly(bnb, shape):
    w = torch.randn(*shape) * 0.05
    w[0, 0] = 0.5
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ref = bnb.dequantize_4bit(packed, state)
    ours = quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(ours.codes(), _bnb_codes(packed, w.numel()))
    assert torch.equal(ours.absmax, state.absmax)
    torch.testing.assert_close(dequantize_nf4(ours), ref, atol=0, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_double_quant_bitsandbytes_rounding_is_bit_exact(bnb, seed):
    torch.manual_seed(seed)
    w = torch.randn(300, 512) * 0.02
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnb.dequantize_4bit(packed, state)
    ours = quantize_nf4(w, 64, absmax_rounding="bitsandbytes_cpu")
    assert torch.equal(ours.codes(), _bnb_codes(packed, w.numel()))
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    assert torch.equal(ours.absmax_codes, state.absmax)
    torch.testing.assert_close(dequantize_nf4(ours), ref, atol=0, rtol=0)


def test_double_quant_nearest_is_never_worse_than_bitsandbytes(bnb):
    w = torch.randn(512, 512) * 0.02
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnb.dequantize_4bit(packed, state)
    ours = quantize_nf4(w, 64)  # nearest 8-bit codes (QLoRA's definition)
    true_absmax = w.reshape(-1, 64).abs().amax(1)
    bnb_absmax = (
        dynamic_map()[state.absmax.long()]
        * state.state2.absmax.repeat_interleave(256)[: true_absmax.numel()]
        + state.offset
    )
    ours_err = (ours.block_absmax() - true_absmax).abs()
    bnb_err = (bnb_absmax - true_absmax).abs()
    assert (ours_err <= bnb_err + 1e-9).all()
    differ = ours.absmax_codes != state.absmax
    assert 0 < differ.float().mean() < 0.01  # a few codes near midpoints
    # weights differ only in blocks whose 8-bit absmax code differs, by <= one code step
    step = (dynamic_map()[1:] - dynamic_map()[:-1]).max() * ours.absmax_scale.max()
    diff = (dequantize_nf4(ours) - ref).abs().reshape(-1, 64).amax(1)
    assert (diff[~differ] == 0).all()
    assert diff.max() <= step


def test_functional_nf4_spec_equals_bitsandbytes(bnb):
    """fake_quantize with an nf4 PerGroup(64) spec is bitsandbytes' nf4 without double quant."""
    w = torch.randn(16, 128)
    spec = QuantSpec(bits=4, format="nf4", granularity=PerGroup(64))
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = fake_quantize(w, *choose_qparams(w, spec), spec)
    torch.testing.assert_close(ours, bnb.dequantize_4bit(packed, state), atol=0, rtol=0)


def test_storage_size_and_bad_input():
    w = torch.randn(256, 256)
    q = quantize_nf4(w)
    n = w.numel()
    # 4-bit codes + one byte per 64 values + one float per 256 blocks + the offset
    assert q.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert q.nbytes() * 8 / n < 4.2  # QLoRA: ~4.127 bits per parameter
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="absmax_rounding"):
        quantize_nf4(w, absmax_rounding="round")
