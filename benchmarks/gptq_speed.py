"""GPTQ speed and error: distiq's ``gptq_quantize`` vs the GPTQ paper's reference algorithm.

    python benchmarks/gptq_speed.py [--quick] [--device cpu|cuda] [--repeats 3]
                                    [--tokens 262144] [--hessian tokens|wishart]
                                    [--out benchmarks/results/gptq_speed_<device>.json]

Layers (out × in): 1024×1024, 4096×4096 and 4096×11008 (LLaMA-7B's MLP down-projection, the
reference's 11008-input layer); ``--quick``: 256×256 and 512×1024. Two weight specs: 4-bit
asymmetric per channel (the paper's setting) and 4-bit asymmetric groups of 128 with act-order.
Calibration: 128 × 2048 = 262,144 tokens x ~ N(0, Σ) with correlated inputs (a rank-32 mixing)
and unequal channel scales (log-normal, 1 % outlier channels × 10). ``--hessian tokens`` samples
the tokens and accumulates H = 2/n Σ x xᵀ; ``--hessian wishart`` (the default on CPU, where
n·in² flops take half an hour at 11008 inputs) samples H from its exact distribution
(Wishart(Σ, n) by the Bartlett decomposition), the same law without the n·in² cost.

Per layer and spec: seconds (median of ``--repeats``) of
- ``distiq``: ``distiq.ptq.gptq_quantize(..., compute_error=False)``;
- ``reference``: a re-implementation, in this file, of the algorithm of IST-DASLab/gptq's
  ``GPTQ.fasterquant`` and ``Quantizer.find_params`` as the paper's code writes it (float32,
  Cholesky → ``cholesky_inverse`` → upper Cholesky, column loop over W's columns in blocks of
  128, group parameters from ``W`` when a group starts, ``torch.cuda.synchronize`` only on CUDA);
- ``rtn``: ``distiq.ptq.rtn_quantize``;
and the relative reconstruction error ‖(W − Q)X‖² / ‖WX‖² of each, all computed by the same
function from H outside the timed region. A spec whose first distiq + reference run takes longer
than ``--single-run-above`` seconds (slow CPUs, the largest layer) is timed once. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info
from distiq.ptq import gptq_quantize, output_energy, rtn_quantize
from distiq.quant import PerChannel, PerGroup, QuantSpec

SHAPES = [(1024, 1024), (4096, 4096), (4096, 11008)]
QUICK_SHAPES = [(256, 256), (512, 1024)]
SPECS = {
    "w4-channel": (QuantSpec(bits=4, symmetric=False, granularity=PerChannel(0)), False),
    "w4-g128-act": (QuantSpec(bits=4, symmetric=False, granularity=PerGroup(128)), True),
}


# -- calibration data ---------------------------------------------------------------------------


def _mixing(in_features: int, rank: int, g: torch.Generator, device) -> tuple:
    """Σ^{1/2} = diag(d) (I + α V Vᵀ): per-channel scales d and a rank-``rank`` correlation."""
    d = torch.exp(0.5 * torch.randn(in_features, generator=g))
    outliers = torch.randperm(in_features, generator=g)[: max(1, in_features // 100)]
    d[outliers] *= 10.0
    V = torch.linalg.qr(torch.randn(in_features, rank, generator=g))[0]
    return d.to(device), V.to(device), 3.0


def hessian_from_tokens(in_features: int, tokens: int, g: torch.Generator, device) -> torch.Tensor:
    """H = 2/n Σ x xᵀ over ``tokens`` sampled x = Σ^{1/2} z, accumulated in chunks."""
    d, V, alpha = _mixing(in_features, 32, g, device)
    H = torch.zeros(in_features, in_features, device=device)
    g_device = torch.Generator(device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    chunk = 8192
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        z = torch.randn(n, in_features, generator=g_device, device=device)
        x = (z + alpha * (z @ V) @ V.T) * d  # (n, in): rows Σ^{1/2} z
        H.addmm_(x.T, x)
    return H * (2.0 / tokens)


def hessian_wishart(in_features: int, tokens: int, g: torch.Generator, device) -> torch.Tensor:
    """H = 2/n · Σ^{1/2} A Aᵀ Σ^{1/2} with A the Bartlett factor of Wishart(I, n): lower
    triangular, A_ii = sqrt(χ²(n − i)), A_ij ~ N(0, 1) below the diagonal. Equal in law to
    2/n Σ x xᵀ over n tokens x ~ N(0, Σ)."""
    d, V, alpha = _mixing(in_features, 32, g, device)
    A = torch.randn(in_features, in_features, generator=g).tril_(-1)
    dof = torch.tensor([float(tokens - i) for i in range(in_features)])
    chi2 = torch.distributions.Gamma(dof / 2, torch.full_like(dof, 0.5))
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    A.diagonal().copy_(chi2.sample().sqrt())
    A = A.to(device)
    G = (A + alpha * V @ (V.T @ A)) * d[:, None]  # Σ^{1/2} A
    return (G @ G.T) * (2.0 / tokens)


# -- the reference algorithm (IST-DASLab/gptq, re-implemented as the paper's code runs it) ------


def _reference_find_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-row min/max parameters of the reference ``Quantizer`` (weight=True,
    perchannel=True, sym=False, mse=False): scale, zero of shape (rows, 1)."""
    maxq = 2**bits - 1
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1)[0], zeros)
    xmax = torch.maximum(x.max(1)[0], zeros)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero] = -1
    xmax[both_zero] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def _reference_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def reference_fasterquant(
    W: torch.Tensor, H: torch.Tensor, bits: int, *, blocksize=128, percdamp=0.01,
    groupsize=-1, actorder=False,
) -> torch.Tensor:  # fmt: skip
    """The reference's ``fasterquant`` step by step; returns the quantized weight Q."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    maxq = 2**bits - 1
    scale, zero = _reference_find_params(W, bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = _reference_find_params(W[:, (i1 + i) : (i1 + i + groupsize)], bits)
            q = _reference_quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if W.is_cuda:
        torch.cuda.synchronize()
    if actorder:
        Q = Q[:, invperm]
    return Q


# -- timing ------------------------------------------------------------------------------------


def _timed(device, fn, *args, **kwargs) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_layer(out_features: int, in_features: int, args, device) -> list[dict]:
    """Time and score every spec on one layer shape."""
    make_hessian = hessian_from_tokens if args.hessian == "tokens" else hessian_wishart
    g = torch.Generator().manual_seed(out_features * 7 + in_features)
    seconds_h, H = _timed(device, make_hessian, in_features, args.tokens, g, device)
    W = torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)
    W = W.to(device)
    energy = output_energy(W, H)  # ½ tr(W H Wᵀ), shared by the relative errors below
    rows = []
    for spec_name, (spec, act_order) in SPECS.items():
        ours, ref = [], []
        for _ in range(args.repeats):
            t, result = _timed(
                device, gptq_quantize, W, H, spec, act_order=act_order, compute_error=False
            )
            ours.append(t)
            t, Q_ref = _timed(
                device,
                reference_fasterquant,
                W,
                H,
                spec.bits,
                groupsize=spec.group_size or -1,
                actorder=act_order,
            )
            ref.append(t)
            if ours[-1] + ref[-1] > args.single_run_above:
                break  # a long layer on a slow machine: one timing each (see the docstring)
        t_rtn, rtn = _timed(device, rtn_quantize, W, spec)
        err_ours = output_energy(W - result.weight, H) / energy
        err_ref = output_energy(W - Q_ref, H) / energy
        err_rtn = output_energy(W - rtn.weight, H) / energy
        # equal up to float rounding (group scales of updated columns differ in the last bits)
        agree = float(torch.isclose(result.weight, Q_ref, rtol=1e-5, atol=1e-7).float().mean())
        row = {
            "shape": [out_features, in_features],
            "spec": spec_name,
            "act_order": act_order,
            "hessian_seconds": seconds_h,
            "distiq_seconds": ours,
            "distiq_median_s": statistics.median(ours),
            "reference_seconds": ref,
            "reference_median_s": statistics.median(ref),
            "rtn_seconds": t_rtn,
            "speedup_vs_reference": statistics.median(ref) / statistics.median(ours),
            "relative_error": {"distiq": err_ours, "reference": err_ref, "rtn": err_rtn},
            "error_ratio_vs_reference": err_ours / err_ref,
            "error_ratio_vs_rtn": err_ours / err_rtn,
            "weights_close_to_reference": agree,
        }
        rows.append(row)
        print(
            f"{out_features:>5}x{in_features:<6} {spec_name:<12} "
            f"distiq {row['distiq_median_s']:8.2f}s  reference {row['reference_median_s']:8.2f}s"
            f"  speedup {row['speedup_vs_reference']:5.2f}x  rel.err distiq {err_ours:.3e}"
            f" ref {err_ref:.3e} rtn {err_rtn:.3e}  same Q {agree:.1%}",
            flush=True,
        )
    return rows


def run(args) -> dict:
    device = torch.device(args.device)
    warm = torch.randn(64, 64, device=device)  # imports and first-call costs out of the timings
    gptq_quantize(warm, warm @ warm.T, QuantSpec(bits=4), compute_error=False)
    reference_fasterquant(warm, warm @ warm.T, 4)
    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    for out_features, in_features in shapes:
        rows += bench_layer(out_features, in_features, args, device)
    return {
        "benchmark": "gptq_speed",
        "machine": machine_info(),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "settings": {
            "tokens": args.tokens,
            "hessian": args.hessian,
            "repeats": args.repeats,
            "single_run_above_s": args.single_run_above,
            "block_size": 128,
            "damp": 0.01,
            "quick": args.quick,
            "shapes": args.shapes,
        },
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small layers only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--single-run-above",
        type=float,
        default=120.0,
        help="stop repeating a spec once distiq + reference took longer than this (seconds)",
    )
    parser.add_argument("--shapes", default=None, help="e.g. 1024x1024,4096x11008 (out x in)")
    parser.add_argument("--tokens", type=int, default=128 * 2048)
    parser.add_argument("--hessian", choices=["tokens", "wishart"], default=None)
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/gptq_speed_<device>.json"
    )
    args = parser.parse_args()
    if args.hessian is None:
        args.hessian = "tokens" if args.device.startswith("cuda") or args.quick else "wishart"
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs, as the reference sets
    result = run(args)
    device_type = torch.device(args.device).type
    out = Path(
        args.out
        or f"benchmarks/results/gptq_speed_{device_type}{'_quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
