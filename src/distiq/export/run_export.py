"""``export_run``: a run directory's model in a runtime's format (what ``distiq export`` calls).

``export_run(run_dir, format)`` writes ``run_dir/export/<packed | onnx-<precision> |
compressed-tensors>`` (or ``out``) into a temporary sibling folder, verifies it there on a few
synthetic questions (random images, questions drawn from the tokenizer's words) and only then
renames it into place, so a failed export leaves an earlier one untouched. The packed checkpoint
is reloaded and its logits compared with the run's model (identical with the exact storage
options, else it raises); the compressed-tensors checkpoint is loaded with plain transformers
and must give identical logits, else it raises (checkpoints written with
``allow_activation_ties`` record the gap instead); the ONNX graphs go through ``check_parity``
(logits and greedy answers). The result is stored under ``"verification"`` in the export's
``manifest.json``. The output folder may only replace an earlier distiq export, and never the
run directory or a folder that contains it (``distiq.export.files.check_destination``).

A format is one entry of ``EXPORT_WRITERS``: ``writer(run, path, options, verify)`` writes the
new folder ``path`` and returns its verification record.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.export.files import check_destination, replace_directory, staging_dir
from distiq.export.rundir import EXPORT_DIR, QUANT_MANIFEST, LoadedRun, load_run

log = logging.getLogger(__name__)


def auto_precision(model: nn.Module) -> str:
    """The ONNX precision that holds the model's quantized weights: ``int8`` if every layer fits
    it, else ``int4``; ``fp32`` for a model without quantized weights. Weights that neither
    holds (2/3/5/6-bit, nf4, fp8, mixed widths) raise: silently writing them as float32 would
    hide that the file is not low-bit — ask for ``precision="fp32"`` explicitly."""
    from distiq.export.layers import is_quantized, quantized_weight
    from distiq.export.onnx_quant import plan_model

    quantized = [m for m in model.modules() if is_quantized(m) and quantized_weight(m) is not None]
    if not quantized:
        return "fp32"
    problems = []
    for precision in ("int8", "int4"):
        try:
            plan_model(model, precision)
        except ValueError as exc:
            lines = str(exc).splitlines()  # a header line, then one line per layer
            problems.append(lines[min(1, len(lines) - 1)].strip())
            continue
        return precision
    raise ValueError(
        "the model's quantized weights fit neither ONNX int8 nor int4 ("
        + "; ".join(problems)
        + "); export with precision='fp32' (dequantized float weights, exact) or the packed "
        "format (2-8 bits)"
    )


def synthetic_samples(adapter: Any, n: int = 4, seed: int = 0) -> list[dict]:
    """``n`` VQA samples: noise images and 5-word questions from the tokenizer's plain words."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    special = set(getattr(adapter.tokenizer, "all_special_tokens", []))
    words = sorted(w for w in adapter.tokenizer.get_vocab() if w.isalnum() and w not in special)
    if not words:
        raise ValueError("the tokenizer has no plain words to build verification questions from")
    size = 64
    return [
        {
            "image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            "question": " ".join(rng.choice(words, size=5)),
        }
        for _ in range(n)
    ]


def _verify_packed(run: LoadedRun, path: Path, samples: list[dict], exact: bool) -> dict:
    from distiq.export.packed import load_packed

    batch = run.adapter.build_inputs(samples, with_answers=False)
    loaded = load_packed(path)
    with torch.no_grad():
        expected = run.model(**batch)
        got = loaded(**batch)
    expected = getattr(expected, "logits", expected)
    got = getattr(got, "logits", got)
    gap = float((got - expected).abs().max())
    if exact and gap != 0.0:
        raise RuntimeError(
            f"the packed checkpoint at {path} reloads with logits {gap:.3g} away from the run's "
            "model; this is a bug in distiq's packing, please report it"
        )
    return {"samples": len(samples), "max_abs_logit_diff": gap, "identical": gap == 0.0}


def _record(path: Path, verification: dict) -> None:
    from distiq.config import atomic_write

    file = path / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["verification"] = verification
    atomic_write(file, json.dumps(manifest, separators=(",", ":")))


def _write_packed(run: LoadedRun, path: Path, options: dict, verify: bool) -> dict | None:
    from distiq.export.packed import save_packed

    scale_dtype, leftover_dtype = options["scale_dtype"], options["leftover_dtype"]
    sizes = save_packed(
        run.model, path, adapter=run.adapter, scale_dtype=scale_dtype,
        leftover_dtype=leftover_dtype,
    )  # fmt: skip
    log.info("packed checkpoint %s\n%s", path, sizes.table())
    if not verify:
        return None
    exact = scale_dtype in (None, "float32") and leftover_dtype == "float32"
    return _verify_packed(run, path, synthetic_samples(run.adapter), exact)


def _write_onnx(run: LoadedRun, path: Path, options: dict, verify: bool) -> dict | None:
    from distiq.export.onnx import export_onnx
    from distiq.models import is_dense_model

    if is_dense_model(run.adapter):  # segmentation, detection, depth: one graph
        return _write_onnx_dense(run, path, options, verify)

    export_onnx(
        run.model, path, adapter=run.adapter, precision=options["precision"],
        int8_weights=options["int8_weights"],
    )  # fmt: skip
    if not verify:
        return None
    from distiq.export.parity import check_parity

    samples = synthetic_samples(run.adapter)
    report = check_parity(run.model, path, samples, adapter=run.adapter, max_new_tokens=4)
    return report.to_dict()


def _write_onnx_dense(run: LoadedRun, path: Path, options: dict, verify: bool) -> dict | None:
    from distiq.export.onnx_dense import dense_parity, export_dense_onnx

    export_dense_onnx(
        run.model, path, adapter=run.adapter, precision=options["precision"],
        int8_weights=options["int8_weights"],
    )  # fmt: skip
    if not verify:
        return None
    return dense_parity(run.model, run.adapter, path, synthetic_images(run.adapter))


def synthetic_images(adapter: Any, n: int = 4, seed: int = 0) -> list:
    """``n`` noise images at the dense model's input size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = adapter.input_size
    return [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)
    ]


def _write_compressed(run: LoadedRun, path: Path, options: dict, verify: bool) -> dict | None:
    from distiq.export.compressed import save_compressed_tensors, verify_compressed_tensors

    ties = options["allow_activation_ties"]
    save_compressed_tensors(run.model, path, adapter=run.adapter, allow_activation_ties=ties)
    if not verify:
        return None
    exact = json.loads((path / "manifest.json").read_text())["exact_by_construction"]
    samples = synthetic_samples(run.adapter)
    batch = run.adapter.build_inputs(samples, with_answers=False)
    return verify_compressed_tensors(run.model, path, batch, require_identical=exact)


def _write_gguf(run: LoadedRun, path: Path, options: dict, verify: bool) -> dict | None:
    from distiq.export.gguf import export_gguf

    manifest = export_gguf(
        run.model, path, adapter=run.adapter, name=Path(run.path or "model").name,
        fallback=options["gguf_fallback"], verify=verify,
    )  # fmt: skip
    return manifest.get("verification")


EXPORT_WRITERS = {
    "packed": _write_packed,
    "onnx": _write_onnx,
    "compressed-tensors": _write_compressed,
    "gguf": _write_gguf,
}
"""Format name -> ``writer(run, path, options, verify) -> verification record | None``: writes
the export into the new folder ``path`` and verifies it (raising when it is wrong)."""


def export_run(
    run_dir: str | os.PathLike,
    format: str = "packed",
    *,
    out: str | os.PathLike | None = None,
    precision: str = "auto",
    scale_dtype: str | None = None,
    leftover_dtype: str = "float32",
    int8_weights: str = "auto",
    allow_activation_ties: bool = False,
    gguf_fallback: str | None = None,
    verify: bool = True,
) -> Path:
    """Export a run's model; what ``distiq export RUN_DIR --format ...`` calls.

    Args:
        run_dir: a run directory (see the module docstring).
        format: ``packed`` (``save_packed``), ``onnx`` (``export_onnx``),
            ``compressed-tensors`` (``save_compressed_tensors``) or ``gguf`` (``export_gguf``).
        out: output folder (default ``run_dir/export/packed``, ``.../onnx-<precision>`` or
            ``.../compressed-tensors``). An earlier distiq export there is replaced once the
            new one is verified; a folder holding anything else, the run directory and any
            folder containing it are refused.
        precision: ONNX only: ``int8``, ``int4``, ``fp32`` or ``auto`` (int8 if every
            quantized layer fits it, else int4, else fp32).
        scale_dtype, leftover_dtype: packed only (see ``save_packed``; the default ``None``
            stores each layer's scales in its spec's ``scale_dtype``: exact).
        int8_weights: ONNX int8 only (see ``distiq.export.onnx_quant``).
        allow_activation_ties: compressed-tensors only: write layers with quantized activations,
            which transformers rounds differently at ties (``distiq.export.compressed``); the
            verification then records the logit gap instead of requiring zero.
        gguf_fallback: gguf only: ``None`` refuses layers on grids llama.cpp lacks, ``"f32"`` /
            ``"f16"`` writes them as float (``distiq.export.gguf``).
        verify: check the export on synthetic questions and record it (module docstring).

    Returns:
        The output folder.

    Raises:
        RunDirError: no model / a corrupt quantization record / a run file that leads outside
            the run; ValueError: what the format cannot hold (e.g. 3-bit weights to ONNX, nf4
            to compressed-tensors), an output folder that may not be replaced — all before
            anything is written; RuntimeError: an export that fails its verification (the
            previous export, if any, is left as it was).
    """
    if format not in EXPORT_WRITERS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_WRITERS)}, got {format!r}")
    run = load_run(run_dir)
    if format not in ("onnx", "gguf") and not run.quantized:
        raise ValueError(
            f"{run_dir} holds a float model (no {QUANT_MANIFEST}): there are no low-bit "
            f"codes to write as {format}; export it with --format onnx (or use the run "
            "directory itself, a Hugging Face folder)"
        )
    if format == "onnx" and precision == "auto":
        precision = auto_precision(run.model)
    default = f"onnx-{precision}" if format == "onnx" else format
    target = Path(out) if out is not None else Path(run_dir) / EXPORT_DIR / default
    check_destination(target, overwrite=True, protect=(run_dir,))
    options = {
        "precision": precision, "scale_dtype": scale_dtype, "leftover_dtype": leftover_dtype,
        "int8_weights": int8_weights, "allow_activation_ties": allow_activation_ties,
        "gguf_fallback": gguf_fallback,
    }  # fmt: skip
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    work = staging_dir(target)
    staged = work / target.name
    try:
        verification = EXPORT_WRITERS[format](run, staged, options, verify)
        if verification is not None:
            _record(staged, verification)
            log.info("verified %s against the run's model: %s", target, verification)
        replace_directory(staged, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in created:  # the folders made for the export, deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(work, ignore_errors=True)
    return target
