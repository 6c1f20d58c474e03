"""Deployment benchmark: size, latency and memory of the demo model on every backend.

    python benchmarks/deploy.py [--preset tiny] [--threads 2] [--repeats 60] [--quick]
                                [--run-dir RUN ...] [--out benchmarks/results/deploy.json]
    python benchmarks/deploy.py --sizes-only [--size-presets tiny small base]
                                [--out benchmarks/results/deploy_sizes.json]

Models: the demo model's architecture (``build_edge_vlm(preset)``, random weights: latency and
size do not depend on the values) as a float teacher and compressed to W8A8 (int8 per-channel
weights, int8 per-tensor static activations, calibrated), W7A8 (7-bit "reduced range" weights:
the int8 form that is exact *and* takes onnxruntime's fast u8 x s8 kernel on AVX2 CPUs), W4A16 g64
(4-bit weights in groups of 64) and W4A8 g64 — or the models of given run directories. Each model goes through
``distiq.bench.measure_model``: PyTorch fp32, PyTorch W8A8 (``torch._int_mm``), onnxruntime
fp32, int8 QDQ and int4 (``MatMulNBits``), batch 1, threads fixed, warm-up then interleaved timed
runs, medians. Workloads: the language model on a prompt (``inputs_embeds (1, L, D)``,
L = image tokens + 16) and the vision encoder on one image. A W8A8 row with ``int8_weights=
"int8"`` shows the fast s8-weight form and its error on CPUs without VNNI (see
``distiq.export.onnx_quant``).

Ratios are speed-ups against onnxruntime fp32 measured in the same call (same machine state).
Goal: onnxruntime int8 >= 2.0x onnxruntime fp32 on the language model at batch 1.
Sizes: the packed checkpoint of each compressed model with its breakdown (float32 scales, exact;
float16 scales, smaller) against the fp32 tensors, and every ONNX export. The 4-bit g64 table by
preset adds ``exact-fp16-scales``: the model quantized with ``QuantSpec(scale_dtype="float16")``
(it trains with float16 scales), whose checkpoint holds 16-bit scales and is still exact, and
``exact-fp16-scales-every-matrix``: the same with the patch projection and ``lm_head`` in 4 bits
too (the parts ``patch_embedding`` and ``lm_head``).
``--sizes-only`` measures that table alone (no latency; default output
``benchmarks/results/deploy_sizes.json``).

CUDA (only when a GPU is present): runs ``benchmarks/cuda_kernels.py`` (bf16 / W8A8 / fp8 /
W4A16 at decode and prefill) and stores its JSON under ``cuda``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info
from distiq.bench import BACKENDS, measure_model
from distiq.export import load_run, save_packed
from distiq.quant import PerChannel, PerGroup, PerTensor, QuantSpec, calibration, quantize_

WORDS = [
    *("how", "many", "red", "blue", "green", "yellow", "squares", "circles", "triangles"),
    *("are", "there", "what", "colour", "is", "the", "shape", "at", "top", "left", "right"),
    *("bottom", "centre", "digit", "yes", "no", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
]
W8 = QuantSpec(bits=8, granularity=PerChannel(0))
A8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
W7 = QuantSpec(bits=7, granularity=PerChannel(0))
W4G64 = QuantSpec(bits=4, granularity=PerGroup(64))
W4G64_FP16_SCALES = W4G64.replace(scale_dtype="float16")
CONFIGS = {
    "w8a8": (W8, A8),
    "w7a8": (W7, A8),
    "w4a16-g64": (W4G64, None),
    "w4a8-g64": (W4G64, A8),
}


def synthetic_samples(n: int, size: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    questions = ["how many red squares are there", "what colour is the shape at the top left"]
    return [
        {
            "image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
            "question": questions[i % 2],
            "answer": "2",
        }
        for i in range(n)
    ]


def build_models(preset: str) -> tuple[dict, object]:
    from distiq.models import build_edge_vlm

    teacher, adapter = build_edge_vlm(WORDS, preset)
    teacher.eval()
    size = teacher.config.vision_config.image_size
    batch = adapter.build_inputs(synthetic_samples(8, size))
    models = {"teacher": teacher}
    for name, (weight, activation) in CONFIGS.items():
        model = copy.deepcopy(teacher)
        for part in ("vision", "projector", "language_model"):
            config = adapter.quant_config(part, weight=weight, activation=activation, model=model)
            quantize_(model, config)
        if activation is not None:
            with calibration(model), torch.no_grad():
                model(**batch)
        models[name] = model.eval()
    return models, adapter


SIZE_VARIANTS = {
    "exact": {},  # float32 scales and leftovers: the loaded model is identical
    "fp16-scales": {"scale_dtype": "float16"},
    "fp16-scales+leftovers": {"scale_dtype": "float16", "leftover_dtype": "float16"},
}
# quantized with W4G64_FP16_SCALES (float16 scales in training), saved with the defaults: exact
EXACT_FP16 = "exact-fp16-scales"
# the same, with the patch projection and lm_head in 4 bits too (every weight matrix; only
# the embedding tables, norms and biases stay in float)
EVERY_MATRIX = "exact-fp16-scales-every-matrix"
PRESET_VARIANTS = [EXACT_FP16, EVERY_MATRIX, *SIZE_VARIANTS]


def sizes_of(model, adapter) -> dict:
    """Packed size of ``model`` in each storage variant (dicts, plus the exact one's table)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, options in SIZE_VARIANTS.items():
            sizes = save_packed(model, Path(tmp) / variant, adapter=adapter, **options)
            out[variant] = sizes.to_dict()
            if variant == "exact":
                out["table"] = sizes.table()
    return out


def preset_sizes(presets: list[str]) -> dict:
    """4-bit g64 packed sizes of each preset's edge VLM: the adapter's default parts (vision,
    projector, language model; patch projection, embeddings and lm_head in full precision) in
    every storage variant, and every weight matrix (``distiq.models.PARTS``: the patch
    projection and lm_head too) with float16 scales."""
    from distiq.models import DEFAULT_PARTS, PARTS, build_edge_vlm

    out = {}
    for preset in presets:
        model, adapter = build_edge_vlm(WORDS, preset)
        exact_models = {EXACT_FP16: copy.deepcopy(model), EVERY_MATRIX: copy.deepcopy(model)}
        for part in PARTS:
            if part in DEFAULT_PARTS:
                quantize_(model, adapter.quant_config(part, weight=W4G64, model=model))
            for variant, exact_model in exact_models.items():
                if part in DEFAULT_PARTS or variant == EVERY_MATRIX:
                    config = adapter.quant_config(part, weight=W4G64_FP16_SCALES, model=exact_model)
                    quantize_(exact_model, config)
        entry = sizes_of(model.eval(), adapter)
        with tempfile.TemporaryDirectory() as tmp:
            for variant, exact_model in exact_models.items():
                exact = save_packed(exact_model.eval(), Path(tmp) / variant, adapter=adapter)
                entry[variant] = exact.to_dict()
                entry[f"{variant}_table"] = exact.table()
                entry[f"{variant}_identical"] = _identical_after_load(
                    exact_model, Path(tmp) / variant, adapter
                )
        out[preset] = entry
        del model, exact_models
    return out


def _identical_after_load(model, path: Path, adapter) -> bool:
    """Whether the packed checkpoint at ``path`` reloads to logits equal (``torch.equal``) to
    ``model``'s on one synthetic question."""
    from distiq.export import load_packed

    size = model.config.vision_config.image_size
    batch = adapter.build_inputs(synthetic_samples(1, size))
    loaded = load_packed(path)
    with torch.no_grad():
        return bool(torch.equal(loaded(**batch).logits, model(**batch).logits))


def print_preset_sizes(by_preset: dict) -> None:
    print("\n4-bit g64 packed / fp32, by preset (target <= 0.16):")
    for preset, entry in by_preset.items():
        ratios = ", ".join(f"{v} {entry[v]['ratio']:.4f}x" for v in PRESET_VARIANTS)
        same = ", ".join(
            f"{v} {'identical' if entry[f'{v}_identical'] else 'NOT identical'}"
            for v in (EXACT_FP16, EVERY_MATRIX)
        )
        print(f"  {preset:<6} {ratios}  (reloaded: {same})")


def _without_tables(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.endswith("table")}


def sizes_only(args, started: float) -> None:
    """Measure only the 4-bit g64 size table by preset and write it to ``args.out``."""
    by_preset = preset_sizes(args.size_presets)
    for preset, entry in by_preset.items():
        for variant in (EXACT_FP16, EVERY_MATRIX):
            print(f"\npacked {preset} ({variant}):\n{entry[f'{variant}_table']}")
    print_preset_sizes(by_preset)
    report = {
        "benchmark": "deploy_sizes",
        "machine": machine_info(),
        "weights": "random (sizes do not depend on values)",
        "weight_spec": W4G64.to_dict(),
        "variants": {
            EXACT_FP16: "QuantSpec scale_dtype=float16 (trained with float16 scales), saved "
            "with the defaults: float16 scales, float32 leftovers, exact",
            EVERY_MATRIX: f"{EXACT_FP16} with the patch projection and lm_head in 4 bits too "
            "(distiq.models.PARTS): only embedding tables, norms and biases in float",
            "exact": "float32 scales and leftovers, exact",
            "fp16-scales": "float32-trained scales stored in float16 (not exact)",
            "fp16-scales+leftovers": "and full-precision tensors in float16 (not exact)",
        },
        "sizes_4bit_g64_by_preset": {p: _without_tables(v) for p, v in by_preset.items()},
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


def _row(name: str, results) -> dict:
    rows = {}
    for workload in sorted({r.workload for r in results}):
        base = next(
            (r for r in results if r.workload == workload and r.backend == "ort-fp32"), None
        )
        base_ms = base.timing.median_ms if base is not None and base.timing else None
        rows[workload] = {}
        for r in results:
            if r.workload != workload:
                continue
            entry = r.to_dict()
            if r.timing is not None and base_ms:
                entry["speedup_vs_ort_fp32"] = base_ms / r.timing.median_ms
            rows[workload][r.backend] = entry
    return {"model": name, "workloads": rows}


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<14}{'workload':<16}{'backend':<14}{'median ms':>10}{'x ort-fp32':>11}"
    header += f"{'peak MB':>9}{'size KB':>10}{'max|diff|':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for workload, backends in row["workloads"].items():
            for backend, entry in backends.items():
                if not entry["available"]:
                    print(
                        f"{row['model']:<14}{workload:<16}{backend:<14}  n/a: {entry['reason'][:70]}"
                    )
                    continue
                diff = entry["max_abs_diff"]
                print(
                    f"{row['model']:<14}{workload:<16}{backend:<14}{entry['median_ms']:>10.3f}"
                    f"{entry.get('speedup_vs_ort_fp32', float('nan')):>10.2f}x"
                    f"{entry['memory']['delta_mb']:>9.1f}{entry['size_bytes'] / 1024:>10.1f}"
                    f"{'' if diff is None else f'{diff:.2e}':>11}"
                )


def run_cuda(quick: bool, out: Path) -> dict | str:
    if not torch.cuda.is_available():
        return "not run: no CUDA device"
    target = out.with_name(out.stem + "_cuda_kernels.json")
    command = [
        sys.executable,
        str(Path(__file__).with_name("cuda_kernels.py")),
        "--out",
        str(target),
    ]
    subprocess.run(command + (["--quick"] if quick else []), check=True)
    return json.loads(target.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="edge VLM preset (tiny = the demo's)")
    parser.add_argument("--run-dir", nargs="*", default=None, help="measure these runs instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    parser.add_argument("--size-presets", nargs="*", default=["tiny", "small"])
    parser.add_argument(
        "--backends", nargs="*", default=list(BACKENDS), choices=list(BACKENDS),
        help="backends to measure (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--workloads", nargs="*", default=["language_model", "vision"],
        choices=["language_model", "vision"],
    )  # fmt: skip
    parser.add_argument(
        "--sizes-only", action="store_true",
        help="only the 4-bit g64 packed sizes of --size-presets (no latency); default --out "
        "benchmarks/results/deploy_sizes.json",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON output (default: see --sizes-only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    if args.sizes_only:
        args.out = args.out or "benchmarks/results/deploy_sizes.json"
        sizes_only(args, started)
        return
    args.out = args.out or "benchmarks/results/deploy.json"
    if args.quick:
        args.warmup, args.repeats = 2, 5
    out = Path(args.out)
    load_at_start = list(os.getloadavg())
    if args.run_dir:
        models = {}
        for run_dir in args.run_dir:
            run = load_run(run_dir)
            models[Path(run_dir).name] = run.model
            adapter = run.adapter
    else:
        models, adapter = build_models(args.preset)
    common = dict(threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    rows, sizes = [], {}
    for name, model in models.items():
        print(f"measuring {name} ...", flush=True)
        results = measure_model(
            model, adapter, backends=tuple(args.backends), workloads=tuple(args.workloads),
            **common,
        )  # fmt: skip
        rows.append(_row(name, results))
        if name != "teacher" and any(p.numel() for p in model.parameters()):
            try:
                sizes[name] = sizes_of(model, adapter)
            except ValueError as exc:  # a float run: nothing to pack
                sizes[name] = str(exc)
    if "w8a8" in models:
        print("measuring w8a8 with s8 weights (int8_weights='int8') ...", flush=True)
        results = measure_model(
            models["w8a8"], adapter, backends=("ort-fp32", "ort-int8"),
            workloads=("language_model",), int8_weights="int8", **common,
        )  # fmt: skip
        rows.append(_row("w8a8-s8", results))
    print()
    print_table(rows)
    for name, entry in sizes.items():
        if isinstance(entry, dict):
            print(f"\npacked {name} (exact: float32 scales and leftovers):\n{entry['table']}")
            for variant in list(SIZE_VARIANTS)[1:]:
                print(f"packed {name} ({variant}): ratio {entry[variant]['ratio']:.4f}x")
    by_preset = preset_sizes(args.size_presets)
    print_preset_sizes(by_preset)
    goal = None
    for row in rows:
        if row["model"] == "w8a8":
            entry = row["workloads"]["language_model"].get("ort-int8", {})
            speedup = entry.get("speedup_vs_ort_fp32")
            goal = {"target": 2.0, "speedup": speedup, "met": bool(speedup and speedup >= 2.0)}
            print(
                f"\ngoal: ort int8 / ort fp32 on the language model = {speedup:.2f}x (target 2.0x)"
            )
    cuda = run_cuda(args.quick, out)
    machine = machine_info()
    machine["load_average_1_5_15"] = list(os.getloadavg())
    machine["load_average_at_start"] = load_at_start
    report = {
        "benchmark": "deploy",
        "machine": machine,
        "preset": args.preset if not args.run_dir else None,
        "run_dirs": args.run_dir,
        "threads": args.threads,
        "backends": args.backends,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "batch_size": 1,
        "weights": "random (latency and size do not depend on values)" if not args.run_dir else "runs",
        "rows": rows,
        "sizes": {k: {kk: vv for kk, vv in v.items() if kk != "table"}
                  if isinstance(v, dict) else v for k, v in sizes.items()},
        "sizes_4bit_g64_by_preset": {p: _without_tables(v) for p, v in by_preset.items()},
        "goal_ort_int8_vs_fp32_language_model": goal,
        "cuda": cuda,
        "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
