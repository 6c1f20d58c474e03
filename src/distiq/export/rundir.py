"""Run directories -> exportable models, and ``export_run`` (what ``distiq export`` calls).

A run directory is what ``distiq.train`` writes (``distiq.train.runs``)::

    config.json, model.safetensors, processor files   the model (Hugging Face directory) with
                                                       its *effective* weights: a quantized
                                                       layer's weight stored dequantized
    distiq_heads.json / .safetensors                   task heads (optional)
    quantization.json                                  {"version": 1, "modules": {name: {"type",
                                                       "weight": QuantSpec | null, "activation":
                                                       QuantSpec | null, "weights_from"}}}
    quant_state.safetensors                            <name>.weight_scale / .weight_zero_point,
                                                       <name>.act.scale / .act.zero_point
    results.json                                       distiq.results records

A teacher (float) run has no ``quantization.json``. ``load_run`` rebuilds the evaluated model
with real quantized layers: the integer codes are recovered from the effective weight as
``clamp(round(Ŵ · (1/s)) + z)`` and checked — ``dequantize(codes) == Ŵ`` bit for bit — so the
packed / ONNX model computes what was evaluated. A layer without stored qparams (nf4, fp8, some
PTQ layers) gets them from ``choose_qparams(Ŵ)`` and the same check; if that check fails the
layer cannot be exported exactly and ``load_run`` says which.

``export_run(run_dir, format)`` writes ``run_dir/export/packed`` or
``run_dir/export/onnx-<precision>`` (replacing an earlier export there), then verifies it on a few
synthetic questions (random images, questions drawn from the tokenizer's words): the packed
checkpoint is reloaded from its directory and its logits compared with the run's model (they
must be identical with the exact storage options, else it raises), the ONNX graphs go through
``check_parity`` (logits and greedy answers). The result is stored under ``"verification"`` in
the export's ``manifest.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.export.layers import QuantizedConv2d
from distiq.quant import (
    FakeQuantConv2d,
    FakeQuantLinear,
    QuantizedLinear,
    QuantSpec,
    choose_qparams,
    dequantize,
    quantize,
)

log = logging.getLogger(__name__)

QUANT_MANIFEST = "quantization.json"
QUANT_STATE = "quant_state.safetensors"
RESULTS_FILE = "results.json"
EXPORT_DIR = "export"


class RunDirError(ValueError):
    """A run directory that cannot be exported: no model, or a corrupt quantization record."""


@dataclass
class LoadedRun:
    """A run's model with real quantized layers.

    Attributes:
        model: the Hugging Face VLM or ``VLMWithHeads`` (eval mode), quantized layers as
            ``QuantizedLinear`` / ``QuantizedConv2d`` (activation-only layers stay
            ``FakeQuantLinear`` with static qparams).
        adapter: the model's (unprefixed) adapter.
        modules: ``quantization.json``'s module entries ({} for a float run).
        path: the run directory.
    """

    model: nn.Module
    adapter: Any
    modules: dict[str, dict] = field(default_factory=dict)
    path: Path | None = None

    @property
    def quantized(self) -> bool:
        return bool(self.modules)


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run directory as a Path; raises ``RunDirError`` when it holds no model."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist (or is not a directory)")
    if not (path / "config.json").is_file():
        raise RunDirError(
            f"{path} holds no model (no config.json): point to a run directory written by "
            "`distiq teacher` / `distiq compress` (or any save_pretrained directory)"
        )
    return path


def read_quant_manifest(path: Path) -> dict[str, dict]:
    """``quantization.json``'s modules ({} when absent), every entry checked."""
    file = path / QUANT_MANIFEST
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{file} is not valid JSON ({exc}); the run is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        raise RunDirError(f"{file} must be an object with a 'modules' mapping")
    if data.get("version") != 1:
        raise RunDirError(f"{file}: version {data.get('version')!r} is not supported (1)")
    errors = []
    for name, entry in data["modules"].items():
        if not isinstance(entry, dict):
            errors.append(f"{name}: entry must be a mapping")
            continue
        for key in ("weight", "activation"):
            value = entry.get(key)
            if value is None:
                continue
            try:
                QuantSpec.from_dict(value)
            except (ValueError, TypeError) as exc:
                errors.append(f"{name}.{key}: {exc}")
    if errors:
        raise RunDirError(f"{file} is not a valid quantization record:\n  " + "\n  ".join(errors))
    return data["modules"]


def _load_model(path: Path) -> tuple[nn.Module, Any]:
    from distiq.models import VLMWithHeads, load
    from distiq.models.multitask import HEADS_CONFIG

    if (path / HEADS_CONFIG).is_file():
        model = VLMWithHeads.from_pretrained(path, attn_implementation="eager")
        return model, model.base_adapter
    vlm, adapter = load(path, attn_implementation="eager")
    return vlm, adapter


def _codes(name: str, weight: torch.Tensor, spec: QuantSpec, state: dict):
    """(codes, scale, zero) of an effective weight (2-D view), checked to dequantize to it."""
    w2d = weight.detach().float().reshape(weight.shape[0], -1)
    if f"{name}.weight_scale" in state:
        scale = state[f"{name}.weight_scale"].float()
        zero = state[f"{name}.weight_zero_point"].float()
    else:
        scale, zero = choose_qparams(w2d, spec)
    try:
        codes = quantize(w2d, scale, zero, spec)
        exact = torch.equal(dequantize(codes, scale, zero, spec), w2d)
    except (RuntimeError, ValueError):
        exact = False
    if not exact:
        raise RunDirError(
            f"layer {name!r}: its stored weight is not on the {spec.bits}-bit grid of its "
            f"qparams ({'stored' if f'{name}.weight_scale' in state else 'recomputed'}), so its "
            "codes cannot be recovered exactly; the run's quant_state.safetensors needs "
            f"{name}.weight_scale / .weight_zero_point"
        )
    return codes, scale, zero


def _activation(name: str, spec: QuantSpec | None, state: dict, features: int, axis: int):
    from distiq.quant.quantizers import ActivationQuantizer

    if spec is None:
        return None
    quantizer = ActivationQuantizer(spec.replace(learnable=False), features, axis)
    if quantizer.static:
        if f"{name}.act.scale" not in state:
            raise RunDirError(
                f"layer {name!r}: static activation scales are missing from {QUANT_STATE} (the "
                "model was never calibrated); calibrate and save the run again"
            )
        with torch.no_grad():
            quantizer.scale.copy_(state[f"{name}.act.scale"].reshape(quantizer.scale.shape))
            quantizer.zero_point.copy_(
                state[f"{name}.act.zero_point"].reshape(quantizer.zero_point.shape)
            )
            quantizer.calibrated.fill_(True)
            quantizer.num_batches.fill_(1)
    return quantizer


def _rebuild(model: nn.Module, name: str, entry: dict, state: dict) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise RunDirError(f"{QUANT_MANIFEST} names {name!r}, which the model lacks") from None
    weight_spec = QuantSpec.from_dict(entry["weight"]) if entry.get("weight") else None
    act_spec = QuantSpec.from_dict(entry["activation"]) if entry.get("activation") else None
    is_conv = isinstance(module, nn.Conv2d)
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise RunDirError(f"{name!r} is a {type(module).__name__}, not a linear or conv layer")
    features = module.in_channels if is_conv else module.in_features
    act = _activation(name, act_spec, state, features, 1 if is_conv else -1)
    if weight_spec is None:
        if act is None:
            return module
        cls = FakeQuantConv2d if is_conv else FakeQuantLinear
        fake = cls.from_float(module, None, act_spec)
        fake.act_quant = act
        return fake
    codes, scale, zero = _codes(name, module.weight, weight_spec, state)
    bias = module.bias.detach() if module.bias is not None else None
    if not is_conv:
        return QuantizedLinear.from_quantized(codes, scale, zero, weight_spec, bias, activation=act)
    layer = QuantizedConv2d(
        module.in_channels, module.out_channels, module.kernel_size, weight_spec,
        stride=module.stride, padding=module.padding, dilation=module.dilation,
        groups=module.groups, bias=bias is not None, activation_spec=act_spec,
    )  # fmt: skip
    layer.load_quantized(codes, scale, zero, bias)
    if act is not None:
        layer.act_quant = act
    return layer


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a run directory's model with real quantized layers (see the module docstring)."""
    path = check_run_dir(run_dir)
    modules = read_quant_manifest(path)
    state: dict[str, torch.Tensor] = {}
    if (path / QUANT_STATE).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / QUANT_STATE))
        except (SafetensorError, OSError) as exc:
            raise RunDirError(f"cannot read {path / QUANT_STATE}: {exc}") from None
    elif any(e.get("activation") or e.get("weight") for e in modules.values()):
        log.info("%s has no %s: weight qparams are recomputed", path, QUANT_STATE)
    model, adapter = _load_model(path)
    layers = {name: _rebuild(model, name, entry, state) for name, entry in modules.items()}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    model.eval()
    return LoadedRun(model, adapter, modules, path)


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized layer replaced by a float layer holding its
    dequantized weight (activation quantization dropped): the same network in fp32, the speed
    baseline of the benchmark."""
    import copy

    from distiq.export.layers import float_layer, is_quantized

    twin = copy.deepcopy(model)
    for name, module in [(n, m) for n, m in twin.named_modules() if is_quantized(m)]:
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, float_layer(module))
    return twin.eval()


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


def export_run(
    run_dir: str | os.PathLike,
    format: str = "packed",
    *,
    out: str | os.PathLike | None = None,
    precision: str = "auto",
    scale_dtype: str | None = None,
    leftover_dtype: str = "float32",
    int8_weights: str = "auto",
    verify: bool = True,
) -> Path:
    """Export a run's model; what ``distiq export RUN_DIR --format packed|onnx`` calls.

    Args:
        run_dir: a run directory (see the module docstring).
        format: ``packed`` (``save_packed``) or ``onnx`` (``export_onnx``).
        out: output directory (default ``run_dir/export/packed`` or
            ``run_dir/export/onnx-<precision>``); replaced if it exists.
        precision: ONNX only: ``int8``, ``int4``, ``fp32`` or ``auto`` (int8 if every
            quantized layer fits it, else int4, else fp32).
        scale_dtype, leftover_dtype: packed only (see ``save_packed``; the default ``None``
            stores each layer's scales in its spec's ``scale_dtype``: exact).
        int8_weights: ONNX int8 only (see ``distiq.export.onnx_quant``).
        verify: check the export on synthetic questions and record it (module docstring).

    Returns:
        The output directory.

    Raises:
        RunDirError: no model / a corrupt quantization record; ValueError: what the format
            cannot hold (e.g. 3-bit weights to ONNX) — all before anything is written.
    """
    from distiq.export.onnx import export_onnx
    from distiq.export.packed import save_packed

    if format not in ("packed", "onnx"):
        raise ValueError(f"format must be 'packed' or 'onnx', got {format!r}")
    run = load_run(run_dir)
    base = Path(run_dir) / EXPORT_DIR
    if format == "packed":
        if not run.quantized:
            raise ValueError(
                f"{run_dir} holds a float model (no {QUANT_MANIFEST}): there are no low-bit "
                "codes to pack; export it with --format onnx"
            )
        target = Path(out) if out is not None else base / "packed"
        sizes = save_packed(
            run.model, target, adapter=run.adapter, scale_dtype=scale_dtype,
            leftover_dtype=leftover_dtype, overwrite=True,
        )  # fmt: skip
        log.info("packed checkpoint %s\n%s", target, sizes.table())
        if verify:
            exact = scale_dtype in (None, "float32") and leftover_dtype == "float32"
            result = _verify_packed(run, target, synthetic_samples(run.adapter), exact)
            _record(target, result)
            log.info("verified %s: %s", target, result)
        return target
    if precision == "auto":
        precision = auto_precision(run.model)
    target = Path(out) if out is not None else base / f"onnx-{precision}"
    export_onnx(
        run.model, target, adapter=run.adapter, precision=precision,
        int8_weights=int8_weights, overwrite=True,
    )  # fmt: skip
    if verify:
        from distiq.export.parity import check_parity

        samples = synthetic_samples(run.adapter)
        report = check_parity(run.model, target, samples, adapter=run.adapter, max_new_tokens=4)
        _record(target, report.to_dict())
        log.info("verified %s against the run's model: %s", target, report.to_dict())
    return target
