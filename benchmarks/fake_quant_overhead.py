"""Overhead of fake quantization in training: forward + backward of a ``FakeQuantLinear`` vs the
``nn.Linear`` it wraps (goal ≤ 1.3× at 4096², batch 64).

One step = ``y = layer(x)``, ``y.backward(dy)`` with the weight, bias and input requiring grad
(grads cleared before each step). Variants, all sharing the float layer's parameters:

- ``linear`` (baseline): ``nn.Linear``.
- ``w4_per_channel``: int4 symmetric per-channel weights (minmax), the fused chunked path.
- ``w4_per_group128``: int4 symmetric, groups of 128 inputs, fused path.
- ``w8a8_dynamic``: int8 per-channel weights (fused) + int8 per-token dynamic activations.
- ``w4_lsq``: int4 per-channel with a learnable LSQ scale (generic autograd path).
- ``w4_unfused``: the same maths as ``w4_per_channel`` through ``functional.fake_quantize``
  and plain autograd, to show what the fused path saves.

Variants are interleaved in every repeat (drift hits them all alike); the reported time is the
median over repeats of each repeat's median step time; ratios are against ``linear`` of the same
run. Both wall-clock and process CPU time (all threads) are reported: on a shared machine the CPU
time is the steadier measure of work (the load average at start and end is recorded). Writes
``benchmarks/results/fake_quant_overhead.json``.

    .venv/bin/python benchmarks/fake_quant_overhead.py [--size 4096] [--batch 64]
        [--repeats 5] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script
from distiq.quant import FakeQuantLinear, PerChannel, PerGroup, PerToken, QuantSpec

RESULTS = Path(__file__).resolve().parent / "results" / "fake_quant_overhead.json"

W4 = QuantSpec(bits=4, granularity=PerChannel(0))


def build_variants(linear: nn.Linear) -> dict:
    unfused = FakeQuantLinear.from_float(linear, W4)

    def unfused_forward(x):
        return F.linear(x, unfused.weight_quant(unfused.weight), unfused.bias)

    return {
        "linear": linear,
        "w4_per_channel": FakeQuantLinear.from_float(linear, W4),
        "w4_per_group128": FakeQuantLinear.from_float(
            linear, QuantSpec(bits=4, granularity=PerGroup(128))
        ),
        "w8a8_dynamic": FakeQuantLinear.from_float(
            linear,
            QuantSpec(bits=8, granularity=PerChannel(0)),
            QuantSpec(bits=8, dynamic=True, granularity=PerToken()),
        ),
        "w4_lsq": FakeQuantLinear.from_float(linear, W4.replace(learnable=True)),
        "w4_unfused": unfused_forward,
    }


def step(layer, x, grad_out, params) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one forward + backward."""
    for p in params:
        p.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    layer(x).backward(grad_out)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="in = out features")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per repeat")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    linear = nn.Linear(args.size, args.size)
    variants = build_variants(linear)
    x = torch.randn(args.batch, args.size, requires_grad=True)
    grad_out = torch.randn(args.batch, args.size)
    params = {
        name: [x, *(v.parameters() if isinstance(v, nn.Module) else linear.parameters())]
        for name, v in variants.items()
    }
    for name, layer in variants.items():  # warm-up (and LSQ / allocator first touches)
        step(layer, x, grad_out, params[name])

    load_start = os.getloadavg()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, layer in variants.items():
            times = [step(layer, x, grad_out, params[name]) for _ in range(args.steps)]
            wall[name].append(statistics.median(t[0] for t in times))
            cpu[name].append(statistics.median(t[1] for t in times))
    load_end = os.getloadavg()

    base_wall = statistics.median(wall["linear"])
    base_cpu = statistics.median(cpu["linear"])
    rows = []
    for name in variants:
        median_wall, median_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append(
            {
                "variant": name,
                "wall_median_ms": round(median_wall * 1e3, 2),
                "wall_min_ms": round(min(wall[name]) * 1e3, 2),
                "wall_max_ms": round(max(wall[name]) * 1e3, 2),
                "wall_ratio_vs_linear": round(median_wall / base_wall, 3),
                "cpu_median_ms": round(median_cpu * 1e3, 2),
                "cpu_ratio_vs_linear": round(median_cpu / base_cpu, 3),
            }
        )
    print(f"forward+backward, {args.size}x{args.size} linear, batch {args.batch}, "
          f"{args.threads} threads, median of {args.repeats} repeats x {args.steps} steps; "
          f"load average {load_start[0]:.1f} -> {load_end[0]:.1f}")  # fmt: skip
    print(f"{'variant':<18}{'wall ms':>9}{'min':>8}{'max':>8}{'ratio':>8}{'cpu ms':>9}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['variant']:<18}{r['wall_median_ms']:>9.1f}{r['wall_min_ms']:>8.1f}"
            f"{r['wall_max_ms']:>8.1f}{r['wall_ratio_vs_linear']:>7.2f}x"
            f"{r['cpu_median_ms']:>9.1f}{r['cpu_ratio_vs_linear']:>7.2f}x"
        )
    record = {
        "benchmark": "fake_quant_overhead",
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goal": "w4_per_channel forward+backward <= 1.3x nn.Linear at 4096^2, batch 64",
        "load_average_1min": {"start": load_start[0], "end": load_end[0]},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
