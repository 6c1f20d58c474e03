"""llama.cpp runs distiq's GGUF exports: tokenizer, text logits, the vision projector.

For tiny models of each family with llama.cpp support (LLaVA, SmolVLM, Idefics3, Qwen2-VL,
Qwen2.5-VL, Gemma 3; the test suite's models with a byte-level BPE tokenizer), quantized to
Q4_0's grid (symmetric 4-bit, groups of 32, float16 scales) in the language model and the vision
tower and exported with ``distiq.export.export_gguf``, this checks what llama.cpp does with the
files:

1. ``llama-tokenize``: llama.cpp's token ids for a few prompts against the Hugging Face
   tokenizer's.
2. text logits (llama.cpp's C API through llama-cpp-python's ctypes bindings, when given): one
   forward pass over a prompt's ids in llama.cpp and in the run's PyTorch model; max |Δ| of the
   logits, relative to their range, and agreement of the arg-max token at every position. An
   F32 export (``fallback="f32"``, ``float_type="f32"``: no llama.cpp quantization at all) is
   measured beside the Q4_0 one: the difference between the two is llama.cpp's own arithmetic
   (its quantized matrix products round the activations to 8 bits per block of 32).
3. ``llama-mtmd-cli``: the language model + mmproj load and answer a question about an image.
4. image embeddings (bindings): the mmproj's output for one image against the PyTorch model's
   projected image features (comparable where llama.cpp's image preprocessing yields the same
   number of tokens as the model's processor).

Where llama.cpp itself computes something else than the model, the script says what, by
comparing with a PyTorch emulation of llama.cpp's choice: LLaVA's class token placed after the
patches (llama.cpp issue 25814), Qwen2-VL's text RMSNorm run without its epsilon.

It also measures, without llama.cpp, what re-quantizing would cost: llama.cpp's own Q4_0
quantizer (gguf-py's ``quants.quantize``, the Python twin of ggml's reference quantizer) applied
to a trained run's dequantized weights, against the run's codes — the share of 4-bit codes that
change and the weight error that adds.

Usage (a llama.cpp build, e.g. the one llama-cpp-python's source distribution vendors, built
with shared libraries; the bindings are that distribution's ``llama_cpp`` package)::

    .venv/bin/python benchmarks/gguf_llama_cpp.py --llama-cpp BUILD/bin \\
        --bindings LLAMA_CPP_PYTHON_SRC [--out benchmarks/results/gguf_llama_cpp.json]
    .venv/bin/python benchmarks/gguf_llama_cpp.py --requant-only

This script runs llama.cpp's programs; it does not build them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["llava", "smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "gemma3"]
PROMPTS = ["how many red squares are there?", "what colour is the shape at the top left"]


def test_helpers():
    """tests/export/test_export_gguf.py as a module (``make_run``, ``bpe_tokenizer``, ``Q4``)."""
    name = "distiq_gguf_test_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "tests" / "export" / "test_export_gguf.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def export(run: Path, out: Path, **options) -> dict:
    from distiq.export import load_run
    from distiq.export.gguf import export_gguf

    loaded = load_run(run)
    return export_gguf(loaded.model, out, adapter=loaded.adapter, overwrite=True, **options)


def export_all_float(run: Path, out: Path) -> dict:
    """The run with every layer as F32 (the dequantized weights: the same values, no llama.cpp
    quantized kernels): ``to_blocks`` refuses every layer and ``fallback="f32"`` takes over."""
    from unittest import mock

    from distiq.export import gguf as gguf_export
    from distiq.export.gguf_grid import GridError

    def refuse(*args, **kwargs):
        raise GridError("written as F32 for the comparison")

    with mock.patch.object(gguf_export, "to_blocks", refuse):
        return export(run, out, fallback="f32")


# ---------------------------------------------------------------------- 1. tokenizer
def llama_tokenize(bin_dir: Path, model: Path, text: str) -> list[int]:
    result = subprocess.run(
        [str(bin_dir / "llama-tokenize"), "-m", str(model), "-p", text, "--ids", "--log-disable"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"llama-tokenize failed: {result.stderr[-2000:]}")
    found = re.findall(r"\[[\d, ]*\]", result.stdout)
    return json.loads(found[-1]) if found else []


def check_tokenizer(bin_dir: Path, model: Path, tokenizer) -> dict:
    rows = []
    for text in PROMPTS:
        hf = tokenizer(text)["input_ids"]
        ours = llama_tokenize(bin_dir, model, text)
        rows.append({"text": text, "hf": hf, "llama_cpp": ours, "identical": hf == ours})
    return {"prompts": rows, "all_identical": all(r["identical"] for r in rows)}


# ---------------------------------------------------------------------- 2. text logits
def llama_cpp_logits(bindings, model: Path, ids: list[int]) -> np.ndarray:
    """Logits ``(len(ids), vocab)`` of one llama.cpp forward pass over ``ids``."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model), n_ctx=128, n_batch=128, logits_all=True, n_threads=2,
        verbose=False, seed=0,
    )  # fmt: skip
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def torch_logits(run: Path, ids: list[int]) -> np.ndarray:
    from distiq.models import load

    model, _ = load(run, attn_implementation="eager")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)))
    return out.logits[0].float().numpy()


def compare(got: np.ndarray, expected: np.ndarray) -> dict:
    gap = float(np.abs(got - expected).max())
    span = float(expected.max() - expected.min())
    return {
        "max_abs_diff": gap,
        "max_abs_diff_over_range": gap / span if span else None,
        "argmax_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()),
    }


# ---------------------------------------------------------------------- 3. llama-mtmd-cli
def mtmd_cli(bin_dir: Path, model: Path, mmproj: Path, image: Path) -> dict:
    command = [
        str(bin_dir / "llama-mtmd-cli"), "-m", str(model), "--mmproj", str(mmproj),
        "--image", str(image), "-p", PROMPTS[0], "-n", "4", "--temp", "0", "-t", "2",
        "--no-warmup", "--chat-template", "chatml",  # the tiny tokenizers carry no template
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, timeout=300)
    stdout = result.stdout.decode(errors="replace")  # a random tiny model emits any bytes
    stderr = result.stderr.decode(errors="replace")
    log = stdout + stderr
    return {
        "returncode": result.returncode,
        "seconds": round(time.perf_counter() - started, 2),
        "image_encoded": "batch encoding done" in log or "image slice encoded" in log,
        "generated": stdout.strip()[-200:],
        "log_tail": log.strip().splitlines()[-6:],
    }


# ---------------------------------------------------------------------- 4. image embeddings
def mtmd_image_embeddings(model: Path, mmproj: Path, image) -> np.ndarray:
    """The mmproj's output embeddings ``(n_tokens, n_embd)`` for the PIL ``image``."""
    import ctypes

    from llama_cpp import llama_cpp as lc
    from llama_cpp import mtmd_cpp as mt

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    llama_model = lc.llama_model_load_from_file(str(model).encode(), params)
    mparams = mt.mtmd_context_params_default()
    mparams.use_gpu = False
    mparams.n_threads = 2
    mparams.print_timings = False
    ctx = mt.mtmd_init_from_file(str(mmproj).encode(), llama_model, mparams)
    if not ctx:
        raise RuntimeError(f"mtmd could not load {mmproj}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    data = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
    bitmap = mt.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0], data)
    chunks = mt.mtmd_input_chunks_init()
    marker = mt.mtmd_default_marker()
    text = mt.mtmd_input_text(marker, len(marker), False, True)
    bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
        raise RuntimeError("mtmd_tokenize failed")
    for i in range(mt.mtmd_input_chunks_size(chunks)):
        chunk = mt.mtmd_input_chunks_get(chunks, i)
        image_tokens = mt.mtmd_input_chunk_get_tokens_image(chunk)
        if image_tokens:
            n_tokens = mt.mtmd_image_tokens_get_n_tokens(image_tokens)
            if mt.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            n_embd = lc.llama_model_n_embd(llama_model)
            pointer = mt.mtmd_get_output_embd(ctx)
            out = np.ctypeslib.as_array(pointer, shape=(n_tokens * n_embd,)).copy()
            break
    else:
        raise RuntimeError("no image chunk")
    mt.mtmd_input_chunks_free(chunks)
    mt.mtmd_bitmap_free(bitmap)
    mt.mtmd_free(ctx)
    lc.llama_model_free(llama_model)
    return out.reshape(n_tokens, n_embd)


def torch_image_features(run: Path, image) -> np.ndarray:
    from distiq.models import load

    model, adapter = load(run, attn_implementation="eager")
    inputs, _ = adapter.image_inputs([image])
    with torch.no_grad():
        features = model.get_image_features(**inputs)
    features = getattr(features, "pooler_output", features)
    if isinstance(features, list | tuple):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1]).float().numpy()


# ---------------------------------------------------------------------- llama.cpp's own choices
def torch_logits_rms_eps(run: Path, ids: list[int], eps: float) -> np.ndarray:
    """The run's logits with every text RMSNorm's epsilon set to ``eps`` (llama.cpp's qwen2vl
    architecture in the vendored version never reads layer_norm_rms_epsilon: it runs with 0)."""
    from distiq.models import load

    model, _ = load(run, attn_implementation="eager")
    for module in model.model.language_model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.variance_epsilon = eps
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def llava_cls_last(run: Path, image) -> np.ndarray:
    """LLaVA's image features computed the way llama.cpp's llava graph (vendored version) does:
    the class embedding appended *after* the patches, positions 0..n in that order, rows 1..n
    kept (the first patch dropped, the class token kept)."""
    from distiq.models import load

    model, adapter = load(run, attn_implementation="eager")
    pixels = adapter.image_inputs([image])[0]["pixel_values"]
    tower = model.model.vision_tower
    layers = model.config.vision_config.num_hidden_layers + model.config.vision_feature_layer + 1
    with torch.no_grad():
        patches = tower.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = tower.embeddings.class_embedding.reshape(1, 1, -1)
        x = torch.cat([patches, cls], 1) + tower.embeddings.position_embedding.weight[None]
        x = tower.pre_layrnorm(x)
        for layer in tower.encoder.layers[:layers]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        return model.model.multi_modal_projector(x[:, 1:])[0].float().numpy()


# ---------------------------------------------------------------------- re-quantization
def requant_cost(run: Path) -> dict:
    """llama.cpp's Q4_0 quantizer on the run's dequantized weights vs the run's own codes."""
    import gguf

    from distiq.export import load_run
    from distiq.export.gguf_grid import to_blocks
    from distiq.export.layers import is_quantized, quantized_weight

    model = load_run(run).model
    changed = total = 0
    errors = []
    for _, module in model.named_modules():
        if not is_quantized(module):
            continue
        qw = quantized_weight(module)
        blocks = to_blocks("layer", qw.codes, qw.scale, qw.zero_point, qw.spec)
        effective = blocks.dequantize().numpy()
        packed = gguf.quants.quantize(effective, gguf.GGMLQuantizationType.Q4_0)
        requant = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_0)
        raw = packed.reshape(-1, 18)[:, 2:]
        codes = np.concatenate([raw & 0x0F, raw >> 4], axis=1).astype(np.int32) - 8
        changed += int((codes.reshape(-1) != blocks.codes.numpy().reshape(-1)).sum())
        total += codes.size
        errors.append(float(np.abs(requant - effective).mean() / np.abs(effective).mean()))
    return {
        "codes_changed": changed / total,
        "codes": total,
        "mean_rel_weight_change": float(np.mean(errors)),
    }


def requant_synthetic(rows: int = 1024, cols: int = 4096, seed: int = 0) -> dict:
    """The same on a Gaussian ``(rows, cols)`` weight put on the Q4_0 grid by distiq's minmax
    observer (what a QAD run starts from)."""
    import gguf

    from distiq.export.gguf_grid import to_blocks
    from distiq.quant import choose_qparams, quantize

    spec = test_helpers().Q4
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    scale, zero = choose_qparams(weight, spec)
    blocks = to_blocks("w", quantize(weight, scale, zero, spec), scale, zero, spec)
    effective = blocks.dequantize().numpy()
    packed = gguf.quants.quantize(effective, gguf.GGMLQuantizationType.Q4_0)
    raw = packed.reshape(-1, 18)[:, 2:]
    codes = np.concatenate([raw & 0x0F, raw >> 4], axis=1).astype(np.int32) - 8
    requant = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_0)
    return {
        "shape": [rows, cols],
        "codes_changed": float((codes.reshape(-1) != blocks.codes.numpy().reshape(-1)).mean()),
        "mean_rel_weight_change": float(
            np.abs(requant - effective).mean() / np.abs(effective).mean()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp build's bin folder")
    parser.add_argument("--bindings", type=Path, help="llama-cpp-python source (ctypes bindings)")
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--requant-only", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gguf_llama_cpp.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    helpers = test_helpers()
    record: dict = {"machine": machine_info(), "families": {}}
    record["requant_synthetic"] = requant_synthetic()
    print("llama.cpp's Q4_0 quantizer on a minmax Q4_0-grid weight:", record["requant_synthetic"])
    if args.bindings is not None:
        sys.path.insert(0, str(args.bindings))
        os.environ["LLAMA_CPP_LIB_PATH"] = str(args.llama_cpp)
        os.environ["MTMD_CPP_LIB"] = str(args.llama_cpp)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from transformers import AutoTokenizer

        image_path = root / "scene.png"
        image = helpers.family_module().scene(0, size=32)
        image.save(image_path)
        for family in args.families:
            entry: dict = {}
            run = helpers.make_run(root, family, helpers.Q4, parts=("language_model", "vision"))
            entry["requant"] = requant_cost(run)
            print(f"{family}: llama.cpp's Q4_0 re-quantization of the run: {entry['requant']}")
            if args.requant_only:
                record["families"][family] = entry
                continue
            q4, f32 = root / f"{family}-q4", root / f"{family}-f32"
            entry["export"] = export(run, q4)["summary"]
            export_all_float(run, f32)
            tokenizer = AutoTokenizer.from_pretrained(run)
            entry["tokenizer"] = check_tokenizer(args.llama_cpp, q4 / "model.gguf", tokenizer)
            if args.bindings is not None:
                ids = tokenizer(PROMPTS[0])["input_ids"]
                expected = torch_logits(run, ids)
                entry["logits_q4_0"] = compare(
                    llama_cpp_logits(args.bindings, q4 / "model.gguf", ids), expected
                )
                f32_logits = llama_cpp_logits(args.bindings, f32 / "model.gguf", ids)
                entry["logits_f32"] = compare(f32_logits, expected)
                if family in ("qwen2_vl", "qwen2_5_vl"):
                    entry["logits_f32_vs_rms_eps_0"] = compare(
                        f32_logits, torch_logits_rms_eps(run, ids, 0.0)
                    )
                try:
                    got = mtmd_image_embeddings(q4 / "model.gguf", q4 / "mmproj.gguf", image)
                    ref = torch_image_features(run, image)
                    entry["image_embeddings"] = (
                        compare(got, ref) if got.shape == ref.shape
                        else {"shapes": [list(got.shape), list(ref.shape)]}
                    )  # fmt: skip
                    if family == "llava":
                        emulated = llava_cls_last(run, image)
                        entry["image_embeddings_vs_cls_last"] = compare(got, emulated)
                except Exception as exc:
                    entry["image_embeddings"] = {"error": repr(exc)[:500]}
            entry["mtmd_cli"] = mtmd_cli(
                args.llama_cpp, q4 / "model.gguf", q4 / "mmproj.gguf", image_path
            )
            record["families"][family] = entry
            print(family, json.dumps({k: v for k, v in entry.items() if k != "export"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
