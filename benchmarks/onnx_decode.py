"""Decoding cost per new token against prompt length, with and without the ONNX KV cache.

    python benchmarks/onnx_decode.py [--preset small] [--lengths 64 128 256 512 1024]
                                     [--precisions fp32 int8] [--threads 1] [--repeats 30]
                                     [--out benchmarks/results/onnx_decode.json]

Model: the built-in edge VLM (``build_edge_vlm(preset)``, random weights: time does not depend
on the values; ``small``: a 256-wide, 6-layer Llama-style language model), its context widened
to the longest prompt. ``fp32`` exports the float model, ``int8`` the model quantized W8A8
(int8 per-channel weights, static int8 per-tensor activations, calibrated: onnxruntime's
``MatMulIntegerToFloat``). Each goes through ``export_onnx`` (the decoder with its KV cache).

For each prompt length P, one new token costs:

- ``cached``: the decoder on that one token with the cache of the P tokens before it
  (``past_key_values.N.*`` of length P) — what ``OrtVLM`` and onnxruntime-genai run;
- ``uncached``: the decoder on all P + 1 tokens with an empty cache — what a decoder without a
  cache re-runs for every new token (the earlier layout of distiq's export);
- ``genai`` (when onnxruntime-genai is installed): ``generate_next_token`` of
  onnxruntime-genai on a text prompt of P random tokens (decoder step, cache bookkeeping and
  greedy search), median over the steps after the first.

Decoder calls are timed interleaved (warm-up, then rounds of each), medians in milliseconds;
``speedup`` is uncached / cached at the same P, measured in the same rounds. The machine (CPU,
cores, load) and the command are written with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info
from distiq.bench.timing import time_interleaved
from distiq.export import export_onnx
from distiq.export.ort import decoder_feed, session_options
from distiq.quant import PerChannel, PerTensor, QuantSpec, calibration, quantize_

WORDS = [
    *("how", "many", "red", "blue", "green", "squares", "circles", "are", "there", "what"),
    *("colour", "is", "the", "shape", "at", "top", "left", "right", "yes", "no", "0", "1", "2"),
]
W8 = QuantSpec(bits=8, granularity=PerChannel(0))
A8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())


def build_models(preset: str, context: int) -> tuple[dict, object]:
    """``{"fp32": float model, "int8": W8A8 model}`` and the adapter."""
    from PIL import Image

    from distiq.models import build_edge_vlm

    teacher, adapter = build_edge_vlm(WORDS, preset, max_length=context)
    teacher.eval()
    model = copy.deepcopy(teacher)
    for part in ("vision", "projector", "language_model"):
        quantize_(model, adapter.quant_config(part, weight=W8, activation=A8, model=model))
    size = teacher.config.vision_config.image_size
    rng = np.random.default_rng(0)
    samples = [
        {"image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
         "question": "how many red squares are there", "answer": "2"}
        for _ in range(4)
    ]  # fmt: skip
    with calibration(model), torch.no_grad():
        model(**adapter.build_inputs(samples))
    return {"fp32": teacher, "int8": model.eval()}, adapter


def decoder_calls(path: Path, lengths: list[int], threads: int) -> dict:
    """``{(P, "cached" | "uncached"): zero-argument callable}`` on the export's decoder."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(path / "language_model.onnx"),
        session_options(threads, spinning=False),
        ["CPUExecutionProvider"],
    )
    spec = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    hidden = next(i for i in session.get_inputs() if i.name == "inputs_embeds").shape[2]
    layers = sum(i.name.startswith("past_key_values.") for i in session.get_inputs()) // 2
    rng = np.random.default_rng(0)
    calls = {}
    for length in lengths:
        past = [
            rng.standard_normal((1, spec.shape[1], length, spec.shape[3])).astype(np.float32)
            for _ in range(2 * layers)
        ]
        step = rng.standard_normal((1, 1, hidden)).astype(np.float32)
        cached = decoder_feed(
            session, step, position_ids=np.asarray([[length]], np.int64), past=past
        )
        whole = rng.standard_normal((1, length + 1, hidden)).astype(np.float32)
        uncached = decoder_feed(session, whole)
        calls[length, "cached"] = lambda feed=cached: session.run(["logits"], feed)
        calls[length, "uncached"] = lambda feed=uncached: session.run(["logits"], feed)
    return calls


def genai_step_ms(path: Path, length: int, threads: int, steps: int, words: list[int]) -> float:
    """Median ms of onnxruntime-genai's ``generate_next_token`` after a prompt of ``length``
    tokens drawn from ``words`` (plain word ids: no image token)."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=length + steps + 2)
    generator = og.Generator(model, params)
    prompt = np.random.default_rng(length).choice(words, (1, length)).astype(np.int32)
    generator.append_tokens(prompt)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        generator.generate_next_token()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]) * 1000)  # the first only samples the prompt's logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--genai-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = sorted(args.lengths)
    models, adapter = build_models(args.preset, lengths[-1] + args.genai_steps + 8)
    text = models["fp32"].config.text_config
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    words = adapter.tokenizer.convert_tokens_to_ids(WORDS)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="distiq-onnx-decode-") as tmp:
        for precision in args.precisions:
            path = Path(tmp) / precision
            export_onnx(models[precision], path, adapter=adapter, precision=precision)
            timings = time_interleaved(
                decoder_calls(path, lengths, args.threads),
                warmup=args.warmup, repeats=args.repeats,
            )  # fmt: skip
            rows = []
            for length in lengths:
                cached = timings[length, "cached"].median_ms
                uncached = timings[length, "uncached"].median_ms
                row = {"prompt_tokens": length, "cached_ms": cached, "uncached_ms": uncached,
                       "speedup": uncached / cached}  # fmt: skip
                if genai:
                    row["genai_ms"] = genai_step_ms(
                        path, length, args.threads, args.genai_steps, words
                    )
                rows.append(row)
                print(
                    f"{precision:5s} P={length:5d}  cached {cached:7.3f} ms  uncached "
                    f"{uncached:8.3f} ms  x{uncached / cached:6.1f}"
                    + (f"  genai {row['genai_ms']:7.3f} ms" if genai else "")
                )
            first, last = rows[0], rows[-1]
            results[precision] = {
                "rows": rows,
                "growth_cached": last["cached_ms"] / first["cached_ms"],
                "growth_uncached": last["uncached_ms"] / first["uncached_ms"],
                **({"growth_genai": last["genai_ms"] / first["genai_ms"]} if genai else {}),
            }
    import onnxruntime
    import transformers

    versions = {"onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}
    if genai:
        import onnxruntime_genai

        versions["onnxruntime_genai"] = onnxruntime_genai.__version__
    record = {
        "benchmark": "onnx_decode",
        "machine": machine_info(),
        "versions": versions,
        "model": {
            "preset": args.preset,
            "text_hidden_size": int(text.hidden_size),
            "text_layers": int(text.num_hidden_layers),
            "vocab_size": int(text.vocab_size),
        },
        "settings": {
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "genai_steps": args.genai_steps if genai else None,
            "lengths": lengths,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    for precision, result in results.items():
        print(
            f"{precision}: from P={lengths[0]} to P={lengths[-1]} a cached step grows "
            f"x{result['growth_cached']:.2f}, an uncached one x{result['growth_uncached']:.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
