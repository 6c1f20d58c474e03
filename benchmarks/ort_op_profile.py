"""Where onnxruntime spends the language model's time, fp32 against int8 QDQ, by operator type.

    python benchmarks/ort_op_profile.py [--presets tiny small base] [--threads 1]
                                        [--out benchmarks/results/ort_op_profile.json]

For each preset's edge VLM (random weights; ``deploy.py``'s W7A8 model: 7-bit per-channel
weights and 8-bit per-tensor activations, the exact int8 form with onnxruntime's fast u8 x s8
kernel) the language-model graph (``inputs_embeds (1, L, D)``, L = image tokens + 16, batch 1)
is exported fp32 and int8, run with onnxruntime's profiler (10 warm-up runs left out), and the kernel time of every node is
summed by operator type (mean per run). It answers why the int8 graph is not 2x faster: the
matrix products (``MatMul`` against ``MatMulIntegerToFloat`` + the ``QuantizeLinear`` of their
inputs) and everything else (layout, normalisation, rotary embeddings), which int8 does not
speed up. Profiled kernel times are longer than unprofiled latencies; ratios within one run
are what this script reports. Latency itself (warm-up, median) is ``deploy.py``'s.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info
from deploy import CONFIGS, WORDS, synthetic_samples
from distiq.export import export_onnx
from distiq.export.ort import decoder_feed
from distiq.quant import calibration, quantize_

MATMUL_OPS = ("MatMul", "FusedMatMul", "MatMulIntegerToFloat", "QuantizeLinear", "Gemm")


def _models(preset: str):
    from distiq.models import build_edge_vlm

    teacher, adapter = build_edge_vlm(WORDS, preset)
    teacher.eval()
    size = teacher.config.vision_config.image_size
    model = copy.deepcopy(teacher)
    weight, activation = CONFIGS["w7a8"]
    for part in ("vision", "projector", "language_model"):
        quantize_(
            model, adapter.quant_config(part, weight=weight, activation=activation, model=model)
        )
    with calibration(model), torch.no_grad():
        model(**adapter.build_inputs(synthetic_samples(8, size)))
    tokens = (size // teacher.config.vision_config.patch_size) ** 2 + 16
    return teacher, model.eval(), adapter, tokens


def profile_graph(path: Path, feed: dict, threads: int, runs: int, warmup: int = 10) -> dict:
    """``{op_type: {"us_per_run", "nodes"}}`` from onnxruntime's profiler over ``runs`` runs
    after ``warmup`` runs (left out by their time stamps)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, ["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    if len(starts) != warmup + runs:
        raise RuntimeError(f"expected {warmup + runs} model_run events, found {len(starts)}")
    first = starts[warmup]
    time_us: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    for event in events:
        kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if kernel and event["ts"] >= first:
            op = event["args"]["op_name"]
            time_us[op] += event["dur"]
            nodes[op] += 1
    return {
        op: {"us_per_run": time_us[op] / runs, "nodes": nodes[op] // runs}
        for op, _ in time_us.most_common()
    }


def summarise(ops: dict) -> dict:
    """Total, matrix-product and other kernel time (µs per run)."""
    total = sum(v["us_per_run"] for v in ops.values())
    matmul = sum(v["us_per_run"] for op, v in ops.items() if op in MATMUL_OPS)
    return {"total_us": total, "matmul_us": matmul, "other_us": total - matmul}


def run_preset(preset: str, threads: int, runs: int) -> dict:
    teacher, model, adapter, tokens = _models(preset)
    dim = teacher.config.text_config.hidden_size
    embeds = np.random.default_rng(0).standard_normal((1, tokens, dim)).astype(np.float32)
    out: dict = {"tokens": tokens, "hidden_size": dim}
    with tempfile.TemporaryDirectory(prefix="distiq-ort-profile-") as tmp:
        for name, source, precision in (("fp32", teacher, "fp32"), ("int8", model, "int8")):
            target = Path(tmp) / name
            export_onnx(source, target, adapter=adapter, precision=precision, overwrite=True)
            graph = target / "language_model.onnx"  # the prompt step: an empty KV cache
            feed = decoder_feed(onnxruntime.InferenceSession(str(graph)), embeds)
            ops = profile_graph(graph, feed, threads, runs)
            out[name] = {"ops": ops, **summarise(ops)}
    fp32, int8 = out["fp32"], out["int8"]
    out["ratios"] = {
        "total_fp32_over_int8": fp32["total_us"] / int8["total_us"],
        "matmul_fp32_over_int8": fp32["matmul_us"] / int8["matmul_us"],
        "other_share_int8": int8["other_us"] / int8["total_us"],
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_op_profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": machine_info(), "threads": args.threads, "runs": args.runs}
    print(f"{'preset':<7}{'L':>5}{'fp32 ms':>9}{'int8 ms':>9}{'total x':>9}{'matmul x':>10}"
          f"{'int8 other':>12}")  # fmt: skip
    for preset in args.presets:
        row = results[preset] = run_preset(preset, args.threads, args.runs)
        r = row["ratios"]
        print(
            f"{preset:<7}{row['tokens']:>5}{row['fp32']['total_us'] / 1e3:>9.2f}"
            f"{row['int8']['total_us'] / 1e3:>9.2f}{r['total_fp32_over_int8']:>9.2f}"
            f"{r['matmul_fp32_over_int8']:>10.2f}{100 * r['other_share_int8']:>11.0f}%"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
