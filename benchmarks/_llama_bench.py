"""llama.cpp's side of ``benchmarks/edge_latency.py``: ``llama-bench`` on distiq's GGUF exports.

Each GGUF file runs ``pp`` (the prompt of ``--prompt`` tokens from an empty cache: the prefill)
and ``tg`` at depth ``--prompt`` (``--llama-tg`` new tokens after a cache of ``--prompt``
tokens: the per-token decode), in interleaved rounds: each round runs every file once per test
(2 repetitions), so background load falls on every file alike. Per-token decode time is a tg
sample divided by its token count. Also recorded: llama.cpp's system info line (the CPU
features its kernels use), each file's tensor types (from distiq's GGUF manifest) and the
buffer types llama.cpp loaded them into (``CPU_REPACK``: weights repacked for its AVX2 /
AVX-512 matrix kernels).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import statistics
import subprocess
from collections import Counter
from pathlib import Path


def system_info(bin_dir: Path) -> str:
    """``llama_print_system_info()`` of the build's ``libllama.so``."""
    lib = ctypes.CDLL(str(bin_dir / "libllama.so"))
    lib.llama_backend_init()
    lib.llama_print_system_info.restype = ctypes.c_char_p
    return lib.llama_print_system_info().decode().strip()


def _run(bin_dir: Path, model: Path, threads: int, *options: str, verbose: bool = False):
    command = [str(bin_dir / "llama-bench"), "-m", str(model / "model.gguf"), "-t", str(threads),
               "-o", "json", *options] + (["-v"] if verbose else [])  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout), done.stderr


def _loaded_buffers(log: str) -> list[str]:
    """The lines where llama.cpp says which buffers hold the model (and repacking)."""
    keep = re.compile(r"(buffer size|repack|REPACK|CPU_Mapped|model type|file type)")
    return sorted({line.strip() for line in log.splitlines() if keep.search(line)})


def _tensor_types(model: Path) -> dict:
    manifest = json.loads((model / "manifest.json").read_text())
    entries = manifest.get("model", {}).get("tensors") or manifest.get("tensors") or []
    counts = Counter()
    for entry in entries if isinstance(entries, list) else entries.values():
        if isinstance(entry, dict) and "ggml_type" in entry:
            counts[entry["ggml_type"]] += 1
    return {"counts": dict(counts), "summary": manifest.get("summary")}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def llama_cpp_phase(bin_dir: Path, models: dict[str, Path], args) -> dict:
    """Per-token decode (tg at depth) and prefill (pp) of every GGUF file, 2 threads (and the
    other ``--threads``), interleaved rounds; medians and ratios against ``F32``."""
    out: dict = {"system_info": system_info(bin_dir), "files": {}, "threads": {}}
    for name, model in models.items():
        rows, log = _run(bin_dir, model, 2, "-p", "0", "-n", "1", "-r", "1", verbose=True)
        out["files"][name] = {
            "model_type": rows[0].get("model_type"),
            "model_size_bytes": rows[0].get("model_size"),
            "model_n_params": rows[0].get("model_n_params"),
            "cpu_info": rows[0].get("cpu_info"),
            "backends": rows[0].get("backends"),
            "build": f"{rows[0].get('build_commit')} ({rows[0].get('build_number')})",
            "flash_attn": rows[0].get("flash_attn"),
            "tensor_types": _tensor_types(model),
            "loaded_buffers": _loaded_buffers(log),
        }
    prompt, tg = str(args.prompt), str(args.llama_tg)
    for threads in args.threads:
        samples: dict[str, dict[str, list[float]]] = {
            n: {"decode": [], "prefill": []} for n in models
        }
        record: dict = {"load_average_before": load_average()}
        for _ in range(args.llama_rounds):
            for name, model in models.items():
                rows, _ = _run(bin_dir, model, threads, "-p", prompt, "-n", "0", "-r", "2")
                samples[name]["prefill"] += [ns / 1e6 for ns in rows[0]["samples_ns"]]
                rows, _ = _run(
                    bin_dir, model, threads, "-p", "0", "-n", tg, "-d", prompt, "-r", "2"
                )
                samples[name]["decode"] += [ns / 1e6 / int(tg) for ns in rows[0]["samples_ns"]]
        record["load_average_after"] = load_average()
        medians = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
        base = medians.get("F32")
        record["files"] = {}
        for name in models:
            row = {
                "decode_ms_per_token": medians[name]["decode"],
                "prefill_ms": medians[name]["prefill"],
                "decode_samples_ms": samples[name]["decode"],
                "prefill_samples_ms": samples[name]["prefill"],
            }
            if base:
                row["decode_speedup_vs_f32"] = base["decode"] / medians[name]["decode"]
                row["prefill_speedup_vs_f32"] = base["prefill"] / medians[name]["prefill"]
            record["files"][name] = row
        out["threads"][str(threads)] = record
        for name, row in record["files"].items():
            print(
                f"  llama.cpp {threads}t {name:5s} decode {row['decode_ms_per_token']:8.2f} ms/token "
                f"(x{row.get('decode_speedup_vs_f32', float('nan')):.2f})  prefill "
                f"{row['prefill_ms']:9.1f} ms (x{row.get('prefill_speedup_vs_f32', float('nan')):.2f})",
                flush=True,
            )
    return out
