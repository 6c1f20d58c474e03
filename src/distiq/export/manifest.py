"""The packed checkpoint's JSON manifest: what it holds, and the checks made before loading.

``manifest.json`` (format ``distiq.packed``, version 2)::

    {
      "format": "distiq.packed", "format_version": 2, "distiq_version": "0.1.0",
      "weights_file": "packed.safetensors", "weights_sha256": "<hex>",
      "scale_dtype": "float32", "leftover_dtype": "float32",
      "specs": [{QuantSpec fields}, ...],        # each distinct spec once
      "model": {"kind": "hf" | "hf+heads" | "module", "class": "LlavaForConditionalGeneration",
                "attn_implementation": "eager" | null},
      "modules": {
        "<fully qualified name>": {
          "type": "linear" | "conv2d" | "fake_linear" | "fake_conv2d",
          "weight_shape": [out, in] | [out, C/groups, kh, kw],
          "bias": true,
          "bits": 4, "format": "int", "granularity": "per_group(64)", "group_size": 64,
          "symmetric": true, "signed": true,
          "weight_spec": 0 | null,         # index into "specs"
          "activation_spec": 1 | null,
          "zero_point": "implicit" | "packed" | "float32" | null,
          "num_groups": null | G,          # act-order (g_idx) layers
          "conv": {"stride": [1, 1], "padding": [0, 0] | "same", "dilation": [1, 1], "groups": 1}
        }
      },
      "size": {SizeBreakdown.to_dict()}
    }

``bits`` … ``signed`` repeat the weight spec's fields for readers that do not parse QuantSpec;
the spec in ``specs`` is authoritative. ``weights_file`` must be a plain file name inside the
checkpoint (``distiq.export.files.member_file``), checked before anything is opened.

Version 2 keeps a Hugging Face model's configuration in ``hf_config.json`` and writes a guard
``config.json`` (:func:`guard_config`) whose ``model_type`` no transformers release knows, and
its weights under a name transformers does not look for: plain
``AutoModelForImageTextToText.from_pretrained`` on the folder raises (with a message naming
``distiq.export.load_packed`` and the compressed-tensors export) instead of loading a model with
random weights. Version 1 (``config.json`` + ``model.safetensors``) is still read. ``fake_linear`` / ``fake_conv2d`` are layers with only their
activations quantized (the float weight is stored as a full-precision tensor).

Tensors in the safetensors file, for a quantized layer ``m`` (``pack``'s little-endian bit-stream
layout for packed codes; every other tensor keeps its state-dict name and dtype):

    m.qweight           uint8   packed codes of the (out, in) weight view, ``bits`` bits each
    m.scales            float32 (or float16 / bfloat16 with ``scale_dtype``), QParams shape
    m.qzeros            uint8   packed zero-points, ``bits`` bits each   (zero_point "packed")
    m.zeros             float32 zero-points                           (zero_point "float32")
    m.g_idx             int32   (in,) group of each input column       (act-order only)
    m.input_scale       float32 (C,) static activation scale
    m.input_zero_point  float32 (C,) static activation zero-point
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distiq.export.files import EXPORT_MANIFEST, UnsafeFileError, member_file
from distiq.quant.spec import QuantSpec

PACKED_FORMAT = "distiq.packed"
PACKED_VERSION = 2
MANIFEST_FILE = EXPORT_MANIFEST
WEIGHTS_FILE = "packed.safetensors"
HF_CONFIG_FILE = "hf_config.json"
"""Where version 2 keeps the Hugging Face config (``config.json`` is the guard)."""
GUARD_MODEL_TYPE = (
    "distiq.packed (a distiq packed checkpoint: transformers cannot read its packed weights; "
    "load it with distiq.export.load_packed, or export the run with "
    "'distiq export RUN_DIR --format compressed-tensors' for transformers and vLLM)"
)
MODULE_TYPES = ("linear", "conv2d", "fake_linear", "fake_conv2d")
MODEL_KINDS = ("hf", "hf+heads", "module")
ZERO_POINT_MODES = ("implicit", "packed", "float32")
SCALE_DTYPES = ("float32", "float16", "bfloat16")


class PackedCheckpointError(ValueError):
    """A packed checkpoint that cannot be read: missing, corrupt or inconsistent."""


def guard_config(model_class: str) -> dict:
    """The ``config.json`` of a version-2 packed checkpoint: a ``model_type`` transformers'
    ``AutoConfig`` refuses (its error quotes it, so the reader learns what to do instead) and
    no architecture to instantiate. ``model_class`` is recorded for people reading the file."""
    return {
        "model_type": GUARD_MODEL_TYPE,
        "distiq_packed_model_class": model_class,
        "architectures": [],
    }


def implied_zero_point(spec: QuantSpec) -> float | None:
    """The zero-point every group has under ``spec`` when the spec fixes it (symmetric specs,
    and formats without one), else None (asymmetric: stored per group)."""
    if spec.format != "int":
        return 0.0
    if spec.symmetric:
        return 0.0 if spec.is_signed else float((spec.quant_max + spec.quant_min + 1) // 2)
    return None


def _check_module(name: str, entry: Any, n_specs: int) -> list[str]:
    where = f"modules[{name!r}]"
    if not isinstance(entry, dict):
        return [f"{where} must be a mapping, got {type(entry).__name__}"]
    errors = []
    kind = entry.get("type")
    if kind not in MODULE_TYPES:
        errors.append(f"{where}.type must be one of {', '.join(MODULE_TYPES)}, got {kind!r}")
    shape = entry.get("weight_shape")
    if not (
        isinstance(shape, list)
        and len(shape) in (2, 4)
        and all(isinstance(v, int) and v > 0 for v in shape)
    ):
        errors.append(f"{where}.weight_shape must be 2 or 4 positive integers, got {shape!r}")
    if not isinstance(entry.get("bias"), bool):
        errors.append(f"{where}.bias must be true or false")
    for key in ("weight_spec", "activation_spec"):
        value = entry.get(key)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_specs
        ):
            errors.append(f"{where}.{key} must be null or an index into specs, got {value!r}")
    quantized_weight = kind in ("linear", "conv2d")
    if quantized_weight and entry.get("weight_spec") is None:
        errors.append(f"{where}: a {kind} layer needs a weight_spec")
    if kind in ("fake_linear", "fake_conv2d") and entry.get("activation_spec") is None:
        errors.append(f"{where}: a {kind} layer needs an activation_spec")
    if quantized_weight and entry.get("zero_point") not in ZERO_POINT_MODES:
        errors.append(
            f"{where}.zero_point must be one of {', '.join(ZERO_POINT_MODES)}, "
            f"got {entry.get('zero_point')!r}"
        )
    groups = entry.get("num_groups")
    if groups is not None and not (isinstance(groups, int) and groups > 0):
        errors.append(f"{where}.num_groups must be null or a positive integer, got {groups!r}")
    if kind in ("conv2d", "fake_conv2d"):
        conv = entry.get("conv")
        if not isinstance(conv, dict) or set(conv) != {"stride", "padding", "dilation", "groups"}:
            errors.append(f"{where}.conv must hold stride, padding, dilation and groups")
    return errors


def validate_manifest(manifest: Any, source: str = MANIFEST_FILE) -> dict:
    """Check a manifest's structure; raise ``PackedCheckpointError`` listing every problem."""
    if not isinstance(manifest, dict):
        raise PackedCheckpointError(f"{source}: a manifest is a JSON object, got {manifest!r:.80}")
    errors = []
    if manifest.get("format") != PACKED_FORMAT:
        errors.append(f"format must be {PACKED_FORMAT!r}, got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= PACKED_VERSION:
        errors.append(
            f"format_version {version!r} is not supported (this distiq reads 1-{PACKED_VERSION}); "
            "upgrade distiq or re-export the checkpoint"
        )
    for key in ("weights_file", "weights_sha256", "distiq_version"):
        if not isinstance(manifest.get(key), str) or not manifest.get(key):
            errors.append(f"{key} must be a non-empty string")
    if isinstance(manifest.get("weights_file"), str) and manifest.get("weights_file"):
        try:
            member_file(Path(source).parent, manifest["weights_file"], "weights_file")
        except UnsafeFileError as exc:
            errors.append(str(exc))
    for key in ("scale_dtype", "leftover_dtype"):
        if manifest.get(key) not in SCALE_DTYPES:
            errors.append(f"{key} must be one of {', '.join(SCALE_DTYPES)}")
    specs = manifest.get("specs")
    if not isinstance(specs, list):
        errors.append("specs must be a list of QuantSpec mappings")
        specs = []
    for index, value in enumerate(specs):
        try:
            QuantSpec.from_dict(value)
        except (ValueError, TypeError) as exc:
            errors.append(f"specs[{index}]: {exc}")
    model = manifest.get("model")
    if not isinstance(model, dict) or model.get("kind") not in MODEL_KINDS:
        errors.append(f"model.kind must be one of {', '.join(MODEL_KINDS)}")
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        errors.append("modules must be a mapping of module name to layer entry")
    else:
        for name, entry in modules.items():
            errors += _check_module(name, entry, len(specs))
    if errors:
        lines = "\n  - ".join(errors)
        raise PackedCheckpointError(f"{source} is not a valid distiq manifest:\n  - {lines}")
    return manifest


def module_specs(manifest: dict, name: str) -> tuple[QuantSpec | None, QuantSpec | None]:
    """The (weight, activation) specs of layer ``name`` of a validated manifest."""
    entry, specs = manifest["modules"][name], manifest["specs"]
    return tuple(
        QuantSpec.from_dict(specs[entry[key]]) if entry.get(key) is not None else None
        for key in ("weight_spec", "activation_spec")
    )


def read_manifest(path: str | Path) -> dict:
    """Read and validate ``path/manifest.json`` (``path`` a packed checkpoint directory)."""
    path = Path(path)
    if not path.is_dir():
        raise PackedCheckpointError(
            f"{path} is not a directory; a packed checkpoint is the directory save_packed wrote"
        )
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise PackedCheckpointError(
            f"{path} has no {MANIFEST_FILE}: it is not a packed checkpoint (write one with "
            "distiq.export.save_packed or `distiq export RUN_DIR --format packed`)"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackedCheckpointError(
            f"{file} is not valid JSON ({exc}); the file is corrupt"
        ) from None
    return validate_manifest(manifest, str(file))
