"""pack / unpack: lossless round trips at every width, sizes, layout, bad input."""

import math

import pytest
import torch

from distiq.quant import pack, unpack
from distiq.quant.packing import packed_numel


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 1, 5, 6, 7])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (13, 17), (4, 3, 10)])
def test_round_trip_random_codes(bits, signed, shape):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    codes = torch.randint(low, high, shape, dtype=torch.int32)
    packed = pack(codes, bits, signed=signed)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    back = unpack(packed, bits, shape, signed=signed)
    assert back.dtype == torch.int32 and back.shape == codes.shape
    assert torch.equal(back, codes)


def test_extreme_codes_round_trip():
    for bits in (2, 3, 4, 8):
        for signed in (False, True):
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            codes = torch.tensor([low, high] * 11)
            assert torch.equal(
                unpack(pack(codes, bits, signed=signed), bits, (22,), signed=signed), codes.int()
            )


def test_sizes():
    n = 4096 * 64
    assert pack(torch.zeros(n, dtype=torch.int32), 4).numel() == n // 2  # half a byte per value
    assert pack(torch.zeros(n, dtype=torch.int32), 3).numel() == n * 3 // 8  # 8 codes in 3 bytes
    assert pack(torch.zeros(n, dtype=torch.int32), 2).numel() == n // 4
    assert pack(torch.zeros(n, dtype=torch.int32), 8).numel() == n
    assert packed_numel(8, 3) == 3 and packed_numel(9, 3) == 4


def test_layout_low_bits_first():
    # 4-bit: first code in the low nibble (ONNX INT4 layout)
    assert pack(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    # 3-bit: codes 0..7 as a little-endian bit stream: 0b111_110_101_100_011_010_001_000
    stream = sum(v << (3 * i) for i, v in enumerate(range(8)))
    assert pack(torch.arange(8), 3).tolist() == [(stream >> (8 * j)) & 0xFF for j in range(3)]
    # signed codes carry the offset 2^(b-1)
    assert pack(torch.tensor([-8, 7]), 4, signed=True).tolist() == [0 | (15 << 4)]


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="signed=True"):
        pack(torch.tensor([-1, 2]), 4)
    with pytest.raises(ValueError, match="outside the unsigned 4-bit range"):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="1-8"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(TypeError, match="quantize first"):
        pack(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="need 2"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, (4,))
