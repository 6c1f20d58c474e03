"""W4A16 decode GEMV variants on a CUDA GPU: which kernel and config is fastest, per shape and M.

    PYTHONPATH=src python benchmarks/w4a16_variants.py --out $OUT/w4a16_variants.json

For each weight shape (out N × in K: 4096×4096, 11008×4096, 4096×11008) and each batch
M ∈ {1, 4, 8}, with 4-bit asymmetric weights in groups of 128 (distiq's ``QuantSpec(bits=4,
symmetric=False, granularity=PerGroup(128))``):
- ``bf16``: ``F.linear`` in bf16 on the unquantized weight (the baseline; ``× bf16`` is measured
  against it in the same run; its error is against ``x @ Wᵀ`` in fp32);
- ``tinygemm``: PyTorch's ``torch._weight_int4pack_mm`` on the same quantized values;
- ``distiq``: ``distiq.kernels.w4a16_linear`` as a user gets it (Triton autotune on first call;
  the autotune time and the chosen config are recorded);
- ``fma_*`` / ``dot_*``: distiq's Triton kernel with fixed meta-parameters (one kernel launch,
  ``x.dtype`` stored straight into ``torch.empty``; ``(K/8, N)`` int32 words):
  ``fma`` = CUDA-core inner loop (nibbles → float with the ``0x4B000000`` trick; ``nomagic``:
  int→float conversions; ``m2``: two nibbles per shift placed at the top of a 1.0f mantissa,
  no per-weight subtraction), ``ls3`` = ``tl.range(num_stages=3)`` (cp.async pipelining of the
  weight loads), ``un4``/``un8`` = loop unrolled 4/8×; ``dot`` = tensor cores (``tl.dot``, rows
  padded to 16, weight loads pipelined by ``num_stages``).
  Names read ``<path>_n<BLOCK_N>_k<BLOCK_K>_w<num_warps>_s<num_stages>[...]``.

Every output is first checked against ``x @ dequantize(W)ᵀ`` in fp32 (relative Frobenius error;
``ok`` below 2e-2), so a wrong fast kernel shows as wrong and is never "best". Each variant is
guarded: an exception (compile error, out of resources) is recorded and the sweep goes on; a
watchdog ends the process if one variant hangs for ``--hang-s`` seconds, and the JSON is rewritten
after every record, so what ran before is kept. Timing as ``benchmarks/cuda_kernels.py``: 32 calls
captured in one CUDA graph, weights rotating over copies that exceed the L2 cache, median over
``--repeats`` replays. ``--budget-s`` stops the sweep (recording what was skipped) when exceeded.
Imports torch, triton, distiq.kernels / distiq.quant and the timing of cuda_kernels.py.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cuda_kernels import time_kernel  # benchmarks/ is on sys.path when run as a script
from distiq.kernels import W4A16Weight, pack_w4a16, w4a16_linear
from distiq.kernels.w4a16 import _triton_kernel, _triton_w4a16
from distiq.quant.functional import choose_qparams, dequantize, quantize
from distiq.quant.spec import PerGroup, QuantSpec

W4 = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128))
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (1, 4, 8)
L2_BYTES_TO_BEAT = 512 * 2**20
OK_REL_ERR = 2e-2
DEVICE = "cuda"


def _cfg(path, bn, bk, warps, stages, ls=1, un=1, magic=1):
    name = f"{path}_n{bn}_k{bk}_w{warps}_s{stages}"
    name += (f"_ls{ls}" if ls > 1 else "") + (f"_un{un}" if un > 1 else "")
    name += {0: "_nomagic", 1: "", 2: "_m2"}[magic]
    cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": int(path == "dot"), "MAGIC": magic}
    cfg.update(LOOP_STAGES=ls, UNROLL=un, num_warps=warps, num_stages=stages)
    return name, cfg


# One row (M = 1): CUDA-core variants, plus tensor cores with the row padded to 16.
SWEEP_M1 = [
    _cfg("fma", 32, 256, 4, 1),
    _cfg("fma", 32, 256, 4, 1, magic=0),
    _cfg("fma", 32, 256, 4, 1, magic=2),
    _cfg("fma", 16, 512, 4, 1, magic=2),
    _cfg("fma", 32, 256, 4, 1, ls=3),
    _cfg("fma", 32, 256, 4, 1, ls=3, magic=2),
    _cfg("fma", 16, 512, 4, 1, ls=3, magic=2),
    _cfg("fma", 64, 256, 8, 1, ls=3, magic=2),
    _cfg("fma", 8, 1024, 4, 1, ls=3, magic=2),  # more programs (N/8), 32-byte row segments
    _cfg("fma", 16, 1024, 8, 1, ls=3, magic=2),
    _cfg("fma", 16, 256, 2, 1, ls=4, magic=2),
    _cfg("fma", 32, 256, 4, 1, un=4, magic=2),
    _cfg("fma", 16, 512, 4, 1, un=8, magic=2),
    _cfg("dot", 32, 128, 4, 3),
    _cfg("dot", 64, 128, 4, 4),
    _cfg("dot", 16, 128, 4, 4),
]
# Several rows: tensor cores (one unpack for all rows) vs CUDA cores (one FMA per row and weight).
SWEEP_MANY = [
    _cfg("dot", 32, 128, 4, 3),
    _cfg("dot", 64, 128, 4, 4),
    _cfg("dot", 16, 128, 4, 4),
    _cfg("dot", 32, 64, 4, 4),
    _cfg("dot", 128, 128, 8, 3),
    _cfg("fma", 16, 128, 4, 1, ls=3),
    _cfg("fma", 32, 64, 4, 1),
]


def clone_w4(w: W4A16Weight) -> W4A16Weight:
    return W4A16Weight(w.packed.clone(), w.scale.clone(), w.zero_scaled.clone(), w.group_size)


def tinygemm_pack(codes, s, z):
    """tinygemm's int4 layout for the same quantized values (as benchmarks/cuda_kernels.py)."""
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2)
    w_packed = torch._convert_weight_to_int4pack(packed, 8)
    scale = s.squeeze(-1)  # (N, G); tinygemm: (q - 8) * scale + zero, ours (q - z) * scale
    zero = (8 - z.squeeze(-1)) * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return w_packed, sz


def _tinygemm(x, packed, group):
    if isinstance(packed, Exception):
        raise packed
    return torch._weight_int4pack_mm(x, packed[0], group, packed[1])


def _fmt(ratio: float | None) -> str:
    return "     -" if ratio is None else f"{ratio:6.2f}"


def _copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(L2_BYTES_TO_BEAT / nbytes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/w4a16_variants.json")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=210.0, help="stop sweeping after this")
    parser.add_argument("--hang-s", type=float, default=120.0, help="one variant's time limit")
    parser.add_argument("--quick", action="store_true", help="first shape, M = 1 only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("w4a16_variants.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    import triton

    t_start = time.perf_counter()
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "w4a16_variants",
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "group_size": W4.group_size,
        "repeats": args.repeats,
        "records": [],
        "best": {},
        "autotuned": {},
    }

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)

    print(f"card: {result['card']}  torch {torch.__version__}  triton {triton.__version__}")
    print(
        f"{'N×K':>11} {'M':>2} {'variant':>34} {'us':>7} {'× bf16':>6} {'× tiny':>6} {'rel.err':>8}"
    )
    shapes = SHAPES[:1] if args.quick else SHAPES
    batches = (1,) if args.quick else BATCHES
    prepared = {}  # all shapes up front (~1.5 GB each), so the sweep can go M-major
    for n, k in shapes:
        w = (torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16)
        s, z = choose_qparams(w.float(), W4)
        codes = quantize(w.float(), s, z, W4)
        reference = dequantize(codes, s, z, W4)  # (N, K) fp32
        w4 = pack_w4a16(codes, s, z, W4.group_size, dtype=torch.bfloat16)
        w4_copies = [w4] + [clone_w4(w4) for _ in range(_copies(n * k // 2) - 1)]
        try:  # a reference that cannot run here is recorded as an error, not fatal
            tg = tinygemm_pack(codes, s, z)
            tg_copies = [tg] + [
                (tg[0].clone(), tg[1].clone()) for _ in range(_copies(n * k // 2) - 1)
            ]
        except Exception as e:
            tg_copies = [e]
        bf_copies = [w] + [w.clone() for _ in range(_copies(2 * n * k) - 1)]
        prepared[n, k] = (w, reference, w4_copies, tg_copies, bf_copies)
        del codes
    # M-major: if the time budget runs out, what is skipped is the larger-M end of the sweep
    for m in batches:
        for n, k in shapes:
            w, reference, w4_copies, tg_copies, bf_copies = prepared[n, k]
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            want = x.float() @ reference.t()  # the 4-bit kernels' reference
            want_bf16 = x.float() @ w.float().t()  # bf16 F.linear multiplies the unquantized w
            variants = [
                ("bf16", "bf16", [lambda x, c=c: F.linear(x, c) for c in bf_copies], None),
                (
                    "tinygemm",
                    "tinygemm",
                    [lambda x, c=c: _tinygemm(x, c, W4.group_size) for c in tg_copies],
                    None,
                ),
                ("distiq", "distiq", [lambda x, c=c: w4a16_linear(x, c) for c in w4_copies], None),
            ]
            for name, cfg in SWEEP_M1 if m == 1 else SWEEP_MANY:
                fns = [lambda x, c=c, cfg=cfg: _triton_w4a16(x, c, None, cfg) for c in w4_copies]
                variants.append((name, name.split("_")[0], fns, cfg))
            base = {}
            for name, family, fns, cfg in variants:
                rec = {"n": n, "k": k, "m": m, "variant": name, "family": family, "config": cfg}
                elapsed = time.perf_counter() - t_start
                if elapsed > args.budget_s and family not in ("bf16", "tinygemm"):
                    rec["error"] = f"skipped: time budget {args.budget_s} s spent"
                    result["records"].append(rec)
                    continue
                faulthandler.dump_traceback_later(args.hang_s, exit=True)
                try:
                    t0 = time.perf_counter()
                    got = fns[0](x).float()
                    torch.cuda.synchronize()
                    rec["first_call_s"] = time.perf_counter() - t0
                    ref = want_bf16 if family == "bf16" else want
                    rel = float((got - ref).norm() / ref.norm())
                    rec["rel_error_vs_dequantized"] = rel
                    rec["ok"] = rel < OK_REL_ERR
                    chosen = getattr(_triton_kernel()[1], "best_config", None)
                    if family == "distiq" and chosen is not None:  # the autotuner's choice
                        rec["config"] = chosen.all_kwargs()
                    ms, mode = time_kernel(fns, x, args.repeats)
                    rec.update(us=ms * 1e3, timing=mode)
                    rec["weight_tb_per_s"] = (
                        (n * k * (2 if family == "bf16" else 0.5)) / (ms * 1e-3) / 1e12
                    )
                except Exception as e:  # record and go on: one bad variant must not end the sweep
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
                    rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                finally:
                    faulthandler.cancel_dump_traceback_later()
                if "us" in rec and family in ("bf16", "tinygemm"):
                    base[family] = rec["us"]
                if "us" in rec:
                    for ref_name in ("bf16", "tinygemm"):  # None where the reference failed
                        ratio = base[ref_name] / rec["us"] if ref_name in base else None
                        rec[f"speedup_vs_{ref_name}"] = ratio
                    print(
                        f"{n:>5}×{k:<5} {m:>2} {name:>34} {rec['us']:7.2f} "
                        f"{_fmt(rec['speedup_vs_bf16'])} {_fmt(rec['speedup_vs_tinygemm'])} "
                        f"{rec['rel_error_vs_dequantized']:8.1e}" + ("" if rec["ok"] else " WRONG")
                    )
                else:
                    print(f"{n:>5}×{k:<5} {m:>2} {name:>34}  {rec['error'][:120]}")
                result["records"].append(rec)
                save()
                torch.cuda.empty_cache()
            ours = [
                r
                for r in result["records"]
                if (r["n"], r["k"], r["m"]) == (n, k, m)
                and r.get("ok")
                and r["family"] not in ("bf16", "tinygemm")
            ]
            if ours:
                best = min(ours, key=lambda r: r["us"])
                result["best"][f"{n}x{k}_m{m}"] = {
                    key: best.get(key)
                    for key in ("variant", "config", "us", "speedup_vs_bf16", "speedup_vs_tinygemm")
                }
            tuned = _triton_kernel()[1]
            result["autotuned"] = {str(key): str(c) for key, c in tuned.cache.items()}
            save()
    result["total_s"] = time.perf_counter() - t_start
    save()
    print("best per shape and M (distiq kernels, correct outputs only):")
    for key, b in result["best"].items():
        print(
            f"  {key:>16}: {b['variant']:>34} {b['us']:7.2f} us  {_fmt(b['speedup_vs_bf16'])}× bf16"
        )
    print(f"total {result['total_s']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
