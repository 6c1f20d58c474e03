"""Low-bit GEMM kernels on a CUDA GPU: bf16 vs W8A8 (int8) vs fp8 vs W4A16, decode and prefill.

    python benchmarks/cuda_kernels.py [--out benchmarks/results/cuda_kernels.json] [--quick]
        [--batches 1,8,16,64,128,256,2048]

For each weight shape (out N × in K) and each batch M (1 = one decode step, 2048 = a prefill;
the rows between place the limit of ``distiq.kernels.tinygemm.TINYGEMM_MAX_ROWS``):
- ``bf16``: ``F.linear`` in bf16 (the baseline);
- ``w8a8``: weights int8 per output channel (distiq's symmetric int8 spec), activations int8 per
  token quantized *inside the timed region*, ``torch._int_mm`` (int32 accumulate), rescale to bf16;
  M is padded to 32 rows where ``_int_mm`` needs it (M ≤ 16);
- ``fp8``: ``torch._scaled_mm`` with float8_e4m3 weights and activations, row-wise scales,
  activation cast inside the timed region; M padded to 16 where needed;
- ``w4a16_tinygemm``: 4-bit asymmetric weights in groups of 128 (distiq's ``QuantSpec(bits=4,
  symmetric=False, granularity=PerGroup(128))``) run by PyTorch's tinygemm kernel
  (``torch._weight_int4pack_mm``) called directly on scales built from the fp32 qparams, bf16
  activations (a reference: what the library path costs on top of the bare op);
- ``w4a16_distiq``: the same weights through ``distiq.kernels.w4a16_linear``, whatever path it
  picks (recorded as ``path``: tinygemm up to ``TINYGEMM_MAX_ROWS`` rows, dequantize + cuBLAS
  above); its tinygemm cache is built before timing, as a server would build it at load;
- ``w4a16_distiq_dequant``: the same weights dequantized and multiplied by cuBLAS every call
  (``w4a16_linear``'s fallback, forced), so each batch shows both sides of the row limit;
- ``w4a16_triton``: distiq's Triton GEMV at up to ``GEMV_MAX_ROWS`` rows (the path fp16
  activations and group sizes tinygemm lacks take), bf16 activations.

Every kernel's output is first checked against ``x @ dequantize(W)ᵀ`` computed in fp32 from
distiq's own quantized codes, so a layout mistake shows as an error, not as a fast wrong number.
Timing: CUDA events, median of repeats; weights rotate over enough copies to exceed the L2 cache
(otherwise a 32 MB bf16 weight would be served from the H100/H200's 50 MB L2 at decode).
Needs a CUDA GPU; prints a table and writes JSON with the card's name.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info
from distiq.kernels import dequantize_w4a16, pack_w4a16, w4a16_linear
from distiq.kernels.tinygemm import cuda_capability
from distiq.kernels.w4a16 import GEMV_MAX_ROWS, _triton_kernel, _triton_w4a16, select_w4a16_kernel
from distiq.quant.functional import choose_qparams, dequantize, quantize
from distiq.quant.spec import PerChannel, PerGroup, QuantSpec

W8 = QuantSpec(bits=8, symmetric=True, granularity=PerChannel(0))
W4 = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128))
L2_BYTES_TO_BEAT = 512 * 2**20


def _pad_rows(x: torch.Tensor, multiple: int, minimum: int, value: float = 0.0) -> torch.Tensor:
    """Pad rows to a multiple of ``multiple`` (at least ``minimum``), as the int8/fp8 GEMMs need."""
    m = max(minimum, math.ceil(x.shape[0] / multiple) * multiple)
    if m == x.shape[0]:
        return x
    return torch.cat([x, x.new_full((m - x.shape[0], *x.shape[1:]), value)])


class W8A8:
    def __init__(self, w: torch.Tensor):
        s, z = choose_qparams(w.float(), W8)
        self.codes_t = quantize(w.float(), s, z, W8).to(torch.int8).t()  # (K, N), column-major
        self.w_scale = s.reshape(1, -1).float()  # (1, N)
        self.reference = dequantize(quantize(w.float(), s, z, W8), s, z, W8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        x_scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0  # (M, 1)
        x_i8 = torch.round(x.float() / x_scale).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(_pad_rows(x_i8, 8, 32), self.codes_t)[:m]  # (M, N) int32
        return (acc.float() * x_scale * self.w_scale).to(torch.bfloat16)


class FP8:
    def __init__(self, w: torch.Tensor):
        self.w_scale = (w.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(
            min=1e-12
        )  # (N, 1)
        w8 = (w.float() / self.w_scale).to(torch.float8_e4m3fn)
        self.w_t = w8.t()  # (K, N) column-major, as _scaled_mm wants
        self.w_scale_row = self.w_scale.reshape(1, -1).contiguous()
        self.reference = w8.float() * self.w_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        x_scale = (x.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)  # (M, 1)
        x8 = _pad_rows((x.float() / x_scale).to(torch.float8_e4m3fn), 16, 16)
        x_scale = _pad_rows(x_scale, 16, 16, value=1.0)
        out = torch._scaled_mm(
            x8, self.w_t, scale_a=x_scale, scale_b=self.w_scale_row, out_dtype=torch.bfloat16
        )
        return out[:m]


class W4A16:
    def __init__(self, w: torch.Tensor, inner_k_tiles: int = 8):
        s, z = choose_qparams(w.float(), W4)  # (N, K/128, 1)
        codes = quantize(w.float(), s, z, W4)  # (N, K) int32 in [0, 15]
        self.reference = dequantize(codes, s, z, W4)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2)
        self.w_packed = torch._convert_weight_to_int4pack(packed, inner_k_tiles)
        # tinygemm computes (q - 8) * scale + zero; ours is (q - z) * scale => zero = (8 - z) * s
        scale = s.squeeze(-1)  # (N, G)
        zero = (8 - z.squeeze(-1)) * scale
        self.scales_and_zeros = (
            torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        )  # (G, N, 2)
        self.group = W4.group_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, self.w_packed, self.group, self.scales_and_zeros)


class W4A16Distiq:
    """distiq's library path (``distiq.kernels.w4a16_linear``) on the same quantized values as
    ``W4A16`` (tinygemm). Calls at construction build the tinygemm cache (and compile and
    autotune Triton where that path is taken), so that neither happens inside the timed graph."""

    def __init__(self, w: torch.Tensor):
        s, z = choose_qparams(w.float(), W4)
        codes = quantize(w.float(), s, z, W4)
        self.reference = dequantize(codes, s, z, W4)
        self.weight = pack_w4a16(codes, s, z, W4.group_size, dtype=torch.bfloat16)
        for rows in (1, GEMV_MAX_ROWS):
            self(torch.zeros(rows, w.shape[1], device=w.device, dtype=w.dtype))

    def path(self, x: torch.Tensor) -> str:
        return select_w4a16_kernel(
            device_type=x.device.type,
            dtype=x.dtype,
            group_size=self.weight.group_size,
            shape=self.weight.shape,
            rows=x.shape[0],
            capability=cuda_capability(x.device),
            triton_available=_triton_kernel() is not None,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(x, self.weight)


class W4A16Dequant(W4A16Distiq):
    """``w4a16_linear``'s fallback, forced: dequantize to bf16, then cuBLAS."""

    def path(self, x: torch.Tensor) -> str:
        return "dequantize"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_w4a16(self.weight, x.dtype))


class W4A16Triton(W4A16Distiq):
    """distiq's Triton GEMV, forced (autotuned at construction)."""

    def path(self, x: torch.Tensor) -> str:
        return "triton"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _triton_w4a16(x, self.weight)


class BF16:
    def __init__(self, w: torch.Tensor):
        self.w = w
        self.reference = w.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


KERNELS = {
    "bf16": BF16,
    "w8a8": W8A8,
    "fp8": FP8,
    "w4a16_tinygemm": W4A16,
    "w4a16_distiq": W4A16Distiq,
    "w4a16_distiq_dequant": W4A16Dequant,
    "w4a16_triton": W4A16Triton,
}


def weight_bytes(name: str, n: int, k: int) -> int:
    return {"bf16": 2 * n * k, "w8a8": n * k, "fp8": n * k}.get(name, n * k // 2)


def time_kernel(fns, x, repeats: int, inner: int = 32) -> tuple[float, str]:
    """Median milliseconds of one call, rotating over ``fns`` (copies of one kernel).

    ``inner`` calls are captured in one CUDA graph (so the CPU's launch cost of multi-op kernels
    such as W8A8's activation quantization is not what is measured) and the graph is replayed
    ``repeats`` times; falls back to eager launches if capture fails. Returns (ms, mode)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns[:3]:
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(inner):
                fns[i % len(fns)](x)
        run, mode = graph.replay, "cuda_graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for i in range(inner):
                fns[i % len(fns)](x)

        mode = "eager"
    run()  # one untimed replay
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times), mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cuda_kernels.json")
    parser.add_argument("--quick", action="store_true", help="one shape, fewer repeats")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--batches", default="1,8,16,64,128,256,2048", help="comma-separated rows of x (M)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    batches = [int(b) for b in args.batches.split(",")]
    repeats = 20 if args.quick else args.repeats
    records = []
    print(
        f"{'N×K':>12} {'M':>5} {'kernel':>20} {'path':>10} {'ms':>9} {'× bf16':>7} "
        f"{'TB/s(w)':>8} {'rel.err':>8}"
    )
    for n, k in shapes:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in batches}
        base_ms = {}
        for name, cls in KERNELS.items():  # bf16 first: the baseline of every batch
            copies = max(1, math.ceil(L2_BYTES_TO_BEAT / weight_bytes(name, n, k)))
            fns = [cls(w) for _ in range(min(copies, 64))]
            kernel = fns[0]
            for m, x in xs.items():
                if name == "w4a16_triton" and m > GEMV_MAX_ROWS:
                    continue
                got = kernel(x).float()
                want = x.float() @ kernel.reference.t()
                rel_err = float((got - want).norm() / want.norm())
                ms, mode = time_kernel(fns, x, repeats)
                base_ms.setdefault(m, ms)
                tbps = weight_bytes(name, n, k) / (ms * 1e-3) / 1e12
                rec = {
                    "n": n,
                    "k": k,
                    "m": m,
                    "kernel": name,
                    "path": kernel.path(x) if hasattr(kernel, "path") else None,
                    "ms": ms,
                    "speedup_vs_bf16": base_ms[m] / ms,
                    "weight_tb_per_s": tbps,
                    "rel_error_vs_dequantized": rel_err,
                    "ok": rel_err < 2e-2,
                    "timing": mode,
                }
                records.append(rec)
                print(
                    f"{n:>5}×{k:<6} {m:>5} {name:>20} {rec['path'] or '':>10} {ms:9.4f} "
                    f"{base_ms[m] / ms:7.2f} {tbps:8.2f} {rel_err:8.1e}"
                )
            del fns, kernel
            torch.cuda.empty_cache()
    result = {
        "benchmark": "cuda_kernels",
        "machine": machine_info(),
        "repeats": repeats,
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
