"""W4A16 packing and kernel: equal to distiq's own dequantized weights."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from distiq.kernels import dequantize_w4a16, pack_w4a16, w4a16_linear
from distiq.quant.functional import choose_qparams, dequantize, quantize
from distiq.quant.spec import PerGroup, QuantSpec


def _quantized(n=48, k=640, group=64):
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(group))
    w = torch.randn(n, k)
    s, z = choose_qparams(w, spec)
    codes = quantize(w, s, z, spec)
    return codes, s, z, dequantize(codes, s, z, spec)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_packed_weight_dequantizes_to_distiq_values(group):
    codes, s, z, reference = _quantized(group=group)
    packed = pack_w4a16(codes, s, z, group, dtype=torch.float32)
    assert packed.packed.dtype == torch.uint8 and packed.packed.shape == (48, 320)
    torch.testing.assert_close(dequantize_w4a16(packed), reference, atol=2e-6, rtol=0)


def test_cpu_linear_matches_reference_and_bias():
    codes, s, z, reference = _quantized()
    packed = pack_w4a16(codes, s, z, 64, dtype=torch.float32)
    x, bias = torch.randn(2, 5, 640), torch.randn(48)
    torch.testing.assert_close(w4a16_linear(x, packed, bias), x @ reference.t() + bias)


def test_rejects_signed_codes_and_bad_groups():
    codes, s, z, _ = _quantized()
    with pytest.raises(ValueError, match="unsigned 4-bit"):
        pack_w4a16(codes - 8, s, z, 64)
    with pytest.raises(ValueError, match="divisible by group_size"):
        pack_w4a16(codes[:, :600], s, z, 64)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_in_interpreter_matches_reference():
    """Runs the real Triton kernel in Triton's CPU interpreter (a subprocess: the interpreter is
    chosen when triton is imported), fixed meta-parameters, ragged N and group counts."""
    code = textwrap.dedent(
        """
        import torch
        from distiq.kernels.w4a16 import _triton_w4a16, pack_w4a16
        from distiq.quant.functional import choose_qparams, dequantize, quantize
        from distiq.quant.spec import PerGroup, QuantSpec
        torch.manual_seed(0)
        spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(64))
        w = torch.randn(48, 640); s, z = choose_qparams(w, spec); c = quantize(w, s, z, spec)
        ref_w = dequantize(c, s, z, spec); x = torch.randn(3, 640)
        packed = pack_w4a16(c, s, z, 64, dtype=torch.float32)
        for cfg in ({"BLOCK_N": 16, "GROUPS_PER_BLOCK": 1, "SPLIT_K": 1},
                    {"BLOCK_N": 32, "GROUPS_PER_BLOCK": 4, "SPLIT_K": 2}):
            err = (_triton_w4a16(x, packed, cfg) - x @ ref_w.t()).abs().max().item()
            assert err < 1e-3, (cfg, err)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.gpu
def test_triton_kernel_on_cuda_matches_reference():
    codes, s, z, reference = _quantized(n=4096, k=4096, group=128)
    packed = pack_w4a16(codes, s, z, 128).to("cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    out = w4a16_linear(x, packed).float()
    want = x.float() @ reference.cuda().t()
    assert (out - want).norm() / want.norm() < 2e-3
