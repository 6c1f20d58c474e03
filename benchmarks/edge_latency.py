"""Per-token decode and prefill latency of distiq's exports against their float teacher, on the
language-model shapes of real edge VLMs, in onnxruntime and in llama.cpp.

    .venv/bin/python benchmarks/edge_latency.py [--shapes smolvlm-256m qwen2-vl-2b]
        [--qwen-layers 8] [--prompt 256] [--threads 2 1] [--decode-repeats 30]
        [--prefill-repeats 8] [--llama-cpp /tmp/llcpp/build/bin]
        [--out benchmarks/results/edge_latency.json]

Models (random weights: latency does not depend on the values), built from config objects as
LLaVA VLMs whose language model has the shape of a real one (the vision tower is a 1-layer toy:
only the language model is timed):

- ``smolvlm-256m``: SmolVLM-256M's language model (Llama: hidden 576, 30 layers, 9 heads, 3
  key/value heads, MLP 1536, vocabulary 49280, tied embeddings, rope theta 100000);
- ``qwen2-vl-2b``: Qwen2-VL-2B's language model (Qwen2: hidden 1536, 28 layers, 12 heads, 2
  key/value heads, MLP 8960, vocabulary 151936, tied embeddings; plain 1-D RoPE here instead of
  M-RoPE, which costs the same per token). ``--qwen-layers`` keeps fewer layers: the fp32
  decoder of all 28 does not fit this machine's memory beside the exports (see the JSON's note).

Exports, all through distiq (``distiq.quant.quantize_`` with RTN weights on the language model
and the ``lm_head``, then ``export_onnx`` / ``export_gguf``):

- onnxruntime (the decoder graph with its KV cache, ``language_model.onnx``): ``fp32`` (the
  teacher), ``int4-g32`` / ``int4-g64`` (4-bit weights, symmetric, groups of 32 / 64:
  ``MatMulNBits`` at onnxruntime's default accuracy level for fused QDQ, 4 = int8 activations
  inside the kernel), ``int4-g32-acc0`` (the same file at accuracy level 0: float
  activations), ``int8-wo`` (int8 weights per channel, weight-only: 8-bit ``MatMulNBits``) and
  ``w8a8`` (7-bit symmetric weights, static int8 activations calibrated on a few prompts:
  ``MatMulIntegerToFloat``);
- llama.cpp (``llama-bench``): ``F32`` and ``F16`` (the teacher), ``Q8_0`` and ``Q4_0`` (the
  weights quantized by distiq on llama.cpp's grid, written code for code).

Workloads, batch 1: ``decode`` = ONE new token with the KV cache of a ``--prompt``-token prompt
(onnxruntime: ``distiq.bench.decode.OrtDecodeStep``; llama.cpp: ``tg`` at depth ``--prompt``),
``prefill`` = the prompt in one call (onnxruntime: the decoder with an empty cache; llama.cpp:
``pp``). onnxruntime variants are timed interleaved (``time_interleaved``) per thread count and
workload, medians; llama.cpp runs in interleaved rounds of ``llama-bench`` calls (one repetition
of each file in turn), medians over the rounds' samples. Ratios are the fp32 (F32) median over
the variant's, measured in the same rounds. The kernels each backend ran are recorded: the op
types of onnxruntime's optimized graph (with ``MatMulNBits``' bits, block size and accuracy
level) and llama.cpp's system info line, its tensor types and its buffer types (repacked ``Q4_0``
shows as ``CPU_REPACK``). The machine is shared: its load average is recorded before and after
each phase.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _llama_bench import llama_cpp_phase, load_average
from _machine import machine_info
from distiq.bench.decode import OrtDecodeStep
from distiq.bench.timing import time_interleaved
from distiq.quant import PerChannel, PerGroup, PerTensor, QuantSpec, calibration, quantize_

WORDS = ["how", "many", "red", "squares", "are", "there", "what", "colour", "is", "the", "shape"]


@dataclass(frozen=True)
class Shape:
    """A real VLM's language model: the numbers of its public config.json."""

    kind: str  # "llama" | "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    rope_theta: float
    rms_eps: float
    source: str


SHAPES = {
    "smolvlm-256m": Shape(
        "llama", 576, 30, 9, 3, 1536, 49280, True, 100000.0, 1e-5,
        "HuggingFaceTB/SmolVLM-256M-Instruct config.json, text_config (SmolLM2-135M)",
    ),
    "qwen2-vl-2b": Shape(
        "qwen2", 1536, 28, 12, 2, 8960, 151936, True, 1000000.0, 1e-6,
        "Qwen/Qwen2-VL-2B-Instruct config.json",
    ),
}  # fmt: skip

W4G32 = QuantSpec(bits=4, granularity=PerGroup(32), scale_dtype="float16")  # = Q4_0's grid
W4G64 = QuantSpec(bits=4, granularity=PerGroup(64))
W8 = QuantSpec(bits=8, granularity=PerChannel(0))
W7 = QuantSpec(bits=7, granularity=PerChannel(0))  # INT8 weights no AVX2 kernel saturates
A8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
Q8_0 = QuantSpec(bits=8, granularity=PerGroup(32), scale_dtype="float16")
# ONNX export name -> (weight spec, activation spec, precision); None weight: the float model
ONNX_EXPORTS = {
    "fp32": (None, None, "fp32"),
    "int4-g32": (W4G32, None, "int4"),
    "int4-g64": (W4G64, None, "int4"),
    "int8-wo": (W8, None, "int8"),
    "w8a8": (W7, A8, "int8"),
}
# timed variant -> (export, MatMulNBits accuracy level: None = onnxruntime's default)
ORT_VARIANTS = {
    "fp32": ("fp32", None),
    "int4-g32": ("int4-g32", None),
    "int4-g32-acc0": ("int4-g32", 0),
    "int4-g64": ("int4-g64", None),
    "int8-wo": ("int8-wo", None),
    "w8a8": ("w8a8", None),
}


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained offline (llama.cpp needs BPE merges; the GGUF pads
    its token list to the model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(special) + 256 + 40, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator([" ".join(WORDS)] * 8 + WORDS + ["\n\n"] * 64, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip


def text_config(shape: Shape, layers: int, tokenizer, context: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max(context, 2048),
        rms_norm_eps=shape.rms_eps, tie_word_embeddings=shape.tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
    )  # fmt: skip
    if shape.kind == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, head_dim=shape.hidden // shape.heads)


def build_model(shape: Shape, layers: int, context: int):
    """(LLaVA model with a toy vision tower and ``shape``'s language model, its adapter)."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    from distiq.models.edge_vlm import EDGE_CHAT_TEMPLATE, edge_llava_config, edge_vlm_config
    from distiq.models.llava import LlavaAdapter

    tokenizer = bpe_tokenizer()
    edge = edge_vlm_config(
        "tiny", image_size=32, patch_size=8, vision_hidden_size=64, vision_layers=1,
        vision_heads=2, vision_intermediate_size=128, max_length=context,
    )  # fmt: skip
    size = {"height": edge.image_size, "width": edge.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False),
        tokenizer=tokenizer, patch_size=edge.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=EDGE_CHAT_TEMPLATE,
    )  # fmt: skip
    config = edge_llava_config(edge, tokenizer)
    config.text_config = text_config(shape, layers, tokenizer, context)
    config.tie_word_embeddings = shape.tied
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    adapter = LlavaAdapter(
        model.config, tokenizer, processor.image_processor, processor=processor,
        chat_template=processor.chat_template,
    )  # fmt: skip
    return model.eval(), adapter


def quantized(model, adapter, weight: QuantSpec, activation: QuantSpec | None):
    """A fake-quant copy: RTN ``weight`` on the language model and the lm_head; static
    ``activation`` calibrated on a few image + question prompts."""
    from PIL import Image

    copied = copy.deepcopy(model)
    for part in ("language_model", "lm_head"):
        config = adapter.quant_config(part, weight=weight, activation=activation, model=copied)
        quantize_(copied, config)
    if activation is not None:
        rng = np.random.default_rng(0)
        samples = [
            {"image": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
             "question": "how many red squares are there", "answer": "2"}
            for _ in range(4)
        ]  # fmt: skip
        with calibration(copied), torch.no_grad():
            copied(**adapter.build_inputs(samples))
    return copied.eval()


def onnx_ops(path: Path, level: int | None) -> dict:
    """Op types of onnxruntime's optimized decoder graph and its ``MatMulNBits`` settings."""
    import onnx
    import onnxruntime as ort

    from distiq.export.ort import session_options

    with tempfile.TemporaryDirectory(prefix="distiq-edge-opt-") as tmp:
        options = session_options(1, level, spinning=False)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path / "language_model.onnx"), options, ["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node)
    nbits = Counter()
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            key = (attrs.get("bits", 4), attrs.get("block_size"), attrs.get("accuracy_level", 0))
            nbits[f"bits={key[0]} block={key[1]} accuracy_level={key[2]}"] += 1
    matmuls = ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul", "FusedGemm")  # fmt: skip
    return {
        "matmul_ops": {op: n for op, n in counts.items() if op in matmuls},
        "matmulnbits": dict(nbits),
        "all_ops": dict(counts.most_common()),
    }


def decode_profile(path: Path, level: int | None, prompt: np.ndarray, step: np.ndarray,
                   steps: int) -> dict:  # fmt: skip
    """Where one decode step's time goes (1 thread): onnxruntime's profiler, kernel time per op
    type in ms per step, over ``steps`` steps (the prefill that fills the cache left out)."""
    import onnxruntime as ort

    from distiq.export.ort import session_options

    with tempfile.TemporaryDirectory(prefix="distiq-edge-prof-") as tmp:
        options = session_options(1, level, spinning=False)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(
            str(path / "language_model.onnx"), options, ["CPUExecutionProvider"]
        )
        decode = OrtDecodeStep(session, prompt, step)
        for _ in range(steps):
            decode()
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    prefill_end = runs[0]["ts"] + runs[0]["dur"]  # the first run is the prefill
    per_op: Counter = Counter()
    for event in events:
        kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if kernel and event["ts"] > prefill_end:
            per_op[event["args"]["op_name"]] += event["dur"]
    step_ms = sorted(e["dur"] / 1e3 for e in runs[1:])
    kernel_ms = {op: round(us / steps / 1e3, 3) for op, us in per_op.most_common()}
    return {
        "steps": steps,
        "median_step_ms": step_ms[len(step_ms) // 2],
        "kernel_ms_per_step": kernel_ms,
        "kernel_total_ms_per_step": round(sum(kernel_ms.values()), 3),
    }


def ort_phase(exports: dict, threads_list: list[int], prompt: np.ndarray, step: np.ndarray,
              args) -> dict:  # fmt: skip
    """Decode and prefill medians of every variant, per thread count, interleaved."""
    import onnxruntime as ort

    from distiq.export.ort import decoder_feed, session_options

    out: dict = {"kernels": {}, "threads": {}}
    for name, (export, level) in ORT_VARIANTS.items():
        out["kernels"][name] = {
            "accuracy_level": "onnxruntime default (4)" if level is None else level,
            **onnx_ops(exports[export], level),
            "decode_profile_1_thread": decode_profile(
                exports[export], level, prompt, step, args.profile_steps
            ),
        }
    for threads in threads_list:
        sessions = {
            name: ort.InferenceSession(
                str(exports[export] / "language_model.onnx"),
                session_options(threads, level, spinning=False), ["CPUExecutionProvider"],
            )
            for name, (export, level) in ORT_VARIANTS.items()
        }  # fmt: skip
        decode = {name: OrtDecodeStep(s, prompt, step) for name, s in sessions.items()}
        feeds = {name: decoder_feed(s, prompt) for name, s in sessions.items()}
        prefill = {
            name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()
        }
        record: dict = {"load_average_before": load_average()}
        started = time.perf_counter()
        decode_t = time_interleaved(decode, warmup=3, repeats=args.decode_repeats)
        prefill_t = time_interleaved(prefill, warmup=1, repeats=args.prefill_repeats, chunk=2)
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["load_average_after"] = load_average()
        base_d, base_p = decode_t["fp32"].median_ms, prefill_t["fp32"].median_ms
        record["variants"] = {
            name: {
                "decode_ms": decode_t[name].to_dict(),
                "prefill_ms": prefill_t[name].to_dict(),
                "decode_speedup_vs_fp32": base_d / decode_t[name].median_ms,
                "prefill_speedup_vs_fp32": base_p / prefill_t[name].median_ms,
            }
            for name in ORT_VARIANTS
        }
        out["threads"][str(threads)] = record
        for name, row in record["variants"].items():
            print(
                f"  ort {threads}t {name:14s} decode {row['decode_ms']['median_ms']:8.2f} ms "
                f"(x{row['decode_speedup_vs_fp32']:.2f})  prefill "
                f"{row['prefill_ms']['median_ms']:9.1f} ms (x{row['prefill_speedup_vs_fp32']:.2f})",
                flush=True,
            )
        del sessions, decode, prefill
        gc.collect()
    return out


def measure_shape(key: str, layers: int, args, root: Path) -> dict:
    from distiq.bench.decode import step_embedding
    from distiq.export import export_onnx
    from distiq.export.gguf import export_gguf

    shape = SHAPES[key]
    print(f"{key}: {layers} of {shape.layers} layers", flush=True)
    model, adapter = build_model(shape, layers, args.prompt + 64)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (1, args.prompt), generator=generator)
    with torch.no_grad():
        prompt = model.get_input_embeddings()(ids).float().numpy()
    step = step_embedding(model).numpy()
    exports, ggufs, sizes, started = {}, {}, {}, time.perf_counter()
    for name, (weight, activation, precision) in ONNX_EXPORTS.items():
        source = model if weight is None else quantized(model, adapter, weight, activation)
        exports[name] = root / key / f"onnx-{name}"
        export_onnx(source, exports[name], adapter=adapter, precision=precision)
        sizes[f"onnx-{name}"] = sum(
            f.stat().st_size for f in exports[name].glob("language_model.onnx*")
        )  # the graph and, above 2 GB, its external data
        if args.llama_cpp and name in ("fp32", "int4-g32"):
            kinds = {"F32": "f32", "F16": "f16"} if name == "fp32" else {"Q4_0": "f32"}
            for kind, float_type in kinds.items():
                ggufs[kind] = root / key / f"gguf-{kind}"
                export_gguf(source, ggufs[kind], adapter=adapter, float_type=float_type,
                            verify=False)  # fmt: skip
        del source
        gc.collect()
        print(f"  exported {name} ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.llama_cpp:
        q8 = quantized(model, adapter, Q8_0, None)
        ggufs["Q8_0"] = root / key / "gguf-Q8_0"
        export_gguf(q8, ggufs["Q8_0"], adapter=adapter, verify=False)
        del q8
    decoder_params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith("model.vision")
        and not n.startswith("model.multi_modal_projector")
        and "embed_tokens" not in n
    )  # the matrices and norms one decode step reads (the embedding lookup is outside it)
    if shape.tied:
        decoder_params += model.lm_head.weight.numel()
    del model
    gc.collect()
    result = {
        "shape": asdict(shape),
        "layers_measured": layers,
        "decoder_parameters_millions": round(decoder_params / 1e6, 1),
        "export_seconds": round(time.perf_counter() - started, 1),
        "onnx_decoder_bytes": sizes,
        "onnxruntime": ort_phase(exports, args.threads, prompt, step, args),
    }
    if args.llama_cpp:
        result["llama_cpp"] = llama_cpp_phase(Path(args.llama_cpp), ggufs, args)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--qwen-layers", type=int, default=8)
    parser.add_argument("--smolvlm-layers", type=int, default=30)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--decode-repeats", type=int, default=30)
    parser.add_argument("--prefill-repeats", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--llama-cpp", default="/tmp/llcpp/build/bin")
    parser.add_argument("--llama-rounds", type=int, default=4)
    parser.add_argument("--llama-tg", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edge_latency.json"))
    args = parser.parse_args()
    if args.llama_cpp and not (Path(args.llama_cpp) / "llama-bench").is_file():
        raise SystemExit(f"no llama-bench in {args.llama_cpp}; pass --llama-cpp '' to skip it")
    import onnxruntime
    import transformers

    record = {
        "benchmark": "edge_latency",
        "machine": machine_info(),
        "versions": {"onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {},
    }  # fmt: skip
    layers = {"smolvlm-256m": args.smolvlm_layers, "qwen2-vl-2b": args.qwen_layers}
    with tempfile.TemporaryDirectory(prefix="distiq-edge-", dir=args.workdir) as tmp:
        for key in args.shapes:
            record["shapes"][key] = measure_shape(key, layers[key], args, Path(tmp))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))
    record["machine"]["load_average_end"] = load_average()
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
