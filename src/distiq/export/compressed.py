"""compressed-tensors checkpoints: a Hugging Face folder that plain transformers and vLLM read.

``save_compressed_tensors(model, path)`` writes the model's VLM as a ``save_pretrained`` folder
whose ``config.json`` carries a compressed-tensors ``quantization_config``: one config group per
distinct (weight, input activation) scheme, its ``targets`` the layers' module names. The
layers are compressed by the ``compressed-tensors`` library itself (``ModelCompressor``; each
layer's format is the one the library infers: ``pack-quantized`` for weight-only integer
layers, ``int-quantized`` for layers with quantized activations, ``dense`` for activation-only
layers). ``AutoModelForImageTextToText.from_pretrained(path)`` then computes exactly what the
distiq model computes (see ``docs/export.md``):

- **Weights: exact by construction.** transformers (``dequantize=False``, its default) builds
  the layers with compressed-tensors, loads the codes and, at the first forward, decompresses
  them as ``codes · scale`` in the model's dtype — the float32 product distiq's
  ``dequantize`` computes, bit for bit. The scale parameters are created in the model's dtype,
  so 16-bit scales (a spec's ``scale_dtype``) are stored in 16 bits and widened exactly.
- **Asymmetric weights** are written as the symmetric codes ``q − z`` with one more bit
  (b-bit asymmetric → (b+1)-bit symmetric, same scales). compressed-tensors 0.20's
  pack-quantized compressor packs asymmetric zero-points when saving, but transformers builds
  the model on the meta device, where the same compressor leaves them unpacked: loading such a
  checkpoint fails with a size mismatch (transformers 5.25). ``q − z`` needs no zero-point and
  dequantizes to the same values.
- **Activations** are fake-quantized by compressed-tensors at every forward (static
  ``input_scale`` / ``input_zero_point``, or dynamic per token / per tensor) with the same
  scales and zero-points, but its rounding is ``round(x / s + z)`` where distiq's is
  ``round(x · (1/s)) + z`` (torch's fake-quantize arithmetic). A code differs by one step
  wherever the two fall on opposite sides of a rounding tie: at every exact tie when the
  zero-point is odd (round half to even), where ``x / s`` and ``x · (1/s)`` differ in the last
  bit across a half-integer (rare for static scales), and — dynamic symmetric scales — at a
  token's extreme value, which sits at ±127.5 codes by construction. So layers with quantized
  activations are refused unless ``allow_activation_ties=True``; the checkpoint then holds the
  trained grid exactly, and ``export_run`` records the logit gap it measured instead of
  requiring zero (``docs/export.md`` has the measurements).

What cannot be written exactly is refused before anything is written (``plan_layers`` lists
every layer and why): nf4 / fp8 weights, convolution layers, weights quantized along the input
axis, act-order group indices, 8-bit asymmetric weights (9-bit ``q − z``), zero-points that are
not integers, activation scales per channel or per group, and (without the opt-in) quantized
activations.

Also written: the processor (tokenizer, image processor, chat template) and ``manifest.json``
(format ``distiq.compressed-tensors``: each layer's scheme and format, the versions used),
which lets a later export recognise and replace this folder.
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

from distiq.export.compressed_plan import CompressedLayer, plan_layers
from distiq.export.files import EXPORT_MANIFEST, check_destination, replace_directory, staging_dir
from distiq.export.layers import float_twin, is_quantized, quantized_weight

log = logging.getLogger(__name__)

COMPRESSED_FORMAT = "distiq.compressed-tensors"
COMPRESSED_VERSION = 1


def _hf_model(model: nn.Module) -> nn.Module:
    from distiq.models import VLMWithHeads

    if isinstance(model, VLMWithHeads):
        log.warning(
            "the detection / segmentation heads are not part of a compressed-tensors checkpoint "
            "(transformers has no class for them): only the VLM is exported"
        )
        model = model.vlm
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        raise ValueError(
            f"a compressed-tensors checkpoint is a Hugging Face model folder; {type(model).__name__}"
            " is not a Hugging Face model (export it with save_packed)"
        )
    return model


def _compress(vlm: nn.Module, layers: list[CompressedLayer]) -> tuple[nn.Module, Any]:
    """A float copy of ``vlm`` whose layers compressed-tensors has compressed, and its
    ``ModelCompressor`` (which writes the ``quantization_config``)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    dense = float_twin(vlm)
    groups: dict[str, list[CompressedLayer]] = {}
    for layer in layers:
        groups.setdefault(layer.key, []).append(layer)
    config_groups = {}
    for index, members in enumerate(groups.values()):
        first = members[0]
        config_groups[f"group_{index}"] = QuantizationScheme(
            targets=[layer.name for layer in members],
            weights=QuantizationArgs(**first.weight_args) if first.weight_args else None,
            input_activations=QuantizationArgs(**first.input_args) if first.input_args else None,
        )
    config = QuantizationConfig(config_groups=config_groups, quantization_status="frozen")
    apply_quantization_config(dense, config, show_progress=False)
    with torch.no_grad():
        for layer in layers:
            module = dense.get_submodule(layer.name)
            _set_qparams(module, layer)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(dense)
    compressor.compress_model(dense)
    return dense, compressor


def _set_qparams(module: nn.Module, layer: CompressedLayer) -> None:
    def put(name: str, value: torch.Tensor | None) -> None:
        if hasattr(module, name):
            delattr(module, name)
        if value is not None:
            module.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))

    if layer.codes is not None:
        # the float weight is exactly codes · scale: compressed-tensors recovers the codes
        weight = layer.codes.to(torch.float32) * _expanded(layer.scale.float(), layer.codes)
        module.weight.copy_(weight)
        put("weight_scale", layer.scale)
        put("weight_zero_point", None)  # symmetric codes: no zero-point
    if layer.input_args is not None and not layer.input_args["dynamic"]:
        put("input_scale", layer.input_scale)
        put("input_zero_point", None if layer.input_args["symmetric"] else layer.input_zero_point)


def _expanded(scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``scale`` broadcast to ``codes`` (out, in): per tensor (1,), channel (out, 1), group
    (out, G)."""
    if scale.ndim == 2 and scale.shape[1] > 1:
        return scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
    return scale


def _check_layers(dense: nn.Module, layers: list[CompressedLayer], source: nn.Module) -> None:
    """Decompress each compressed layer with compressed-tensors (scales in the model's float32,
    as transformers loads them) and compare with the distiq layer's weight, bit for bit."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict

    for layer in layers:
        if layer.codes is None:
            continue
        module = dense.get_submodule(layer.name)
        scheme = module.quantization_scheme
        state = dict(get_direct_state_dict(module))
        state["weight_scale"] = state["weight_scale"].to(torch.float32)
        weight = BaseCompressor.get_value_from_registry(scheme.format).decompress(state, scheme)
        expected = quantized_weight(source.get_submodule(layer.name)).dequantized()
        if not torch.equal(weight["weight"].to(torch.float32), expected):
            raise RuntimeError(
                f"layer {layer.name!r}: compressed-tensors decompresses a weight that differs "
                "from distiq's; this is a bug in distiq's compressed-tensors export, please "
                "report it"
            )


def save_compressed_tensors(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter: Any = None,
    overwrite: bool = False,
    allow_activation_ties: bool = False,
) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint (see the module docstring).

    Args:
        model: a Hugging Face VLM (or ``VLMWithHeads``: its VLM) with ``QuantizedLinear`` /
            ``FakeQuantLinear`` layers (``distiq.export.load_run`` gives one).
        path: the folder to write (written to a temporary sibling, renamed when complete).
        adapter: the model's adapter: its processor is saved beside the weights.
        overwrite: replace an earlier distiq export in ``path`` (nothing else is replaced).
        allow_activation_ties: write layers with quantized input activations, whose rounding
            in compressed-tensors differs from distiq's at ties (module docstring).

    Returns:
        ``path``.

    Raises:
        ValueError: layers without an exact compressed-tensors form (all listed), a model
            that is not a Hugging Face model — before anything is written.
        FileExistsError: ``path`` is not empty and not replaceable (``check_destination``).
        ModuleNotFoundError: ``compressed-tensors`` is not installed
            (``pip install 'distiq[compressed-tensors]'``).
    """
    import compressed_tensors
    import transformers

    import distiq

    path = check_destination(path, overwrite=overwrite)
    vlm = _hf_model(model)
    layers = plan_layers(vlm, allow_activation_ties=allow_activation_ties)
    dense, compressor = _compress(vlm, layers)
    _check_layers(dense, layers, vlm)
    tmp = staging_dir(path)
    try:
        dense.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if adapter is not None:
            adapter.save_pretrained(tmp)
        formats = {}
        for layer in layers:
            fmt = dense.get_submodule(layer.name).quantization_scheme.format
            formats[layer.name] = str(getattr(fmt, "value", fmt))
        manifest = {
            "format": COMPRESSED_FORMAT,
            "format_version": COMPRESSED_VERSION,
            "distiq_version": distiq.__version__,
            "compressed_tensors_version": compressed_tensors.__version__,
            "transformers_version": transformers.__version__,
            "model_class": type(vlm).__name__,
            "exact_by_construction": all(layer.input_args is None for layer in layers),
            "layers": {
                layer.name: {
                    "weight": layer.weight_args,
                    "input_activations": layer.input_args,
                    "format": formats[layer.name],
                }
                for layer in layers
            },
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("compressed-tensors checkpoint of %d layers in %s", len(layers), path)
    return path


def load_compressed_tensors(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The checkpoint loaded with plain transformers (``AutoModelForImageTextToText
    .from_pretrained(path, **kwargs)``, local files only), in eval mode."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kwargs).eval()


def verify_compressed_tensors(
    model: nn.Module,
    path: str | os.PathLike,
    batch: dict,
    *,
    attn_implementation: str = "eager",
    require_identical: bool = True,
) -> dict:
    """Load ``path`` with plain transformers and compare its logits with ``model``'s on
    ``batch`` (the adapter's inputs).

    Args:
        model: the distiq model the checkpoint was written from.
        path: the checkpoint folder.
        batch: model inputs (``adapter.build_inputs(samples, with_answers=False)``).
        attn_implementation: the attention both models run (the run's model: ``eager``).
        require_identical: raise when the logits differ (off for checkpoints written with
            ``allow_activation_ties``: the gap is then measured and returned).

    Returns:
        ``{"samples", "max_abs_logit_diff", "identical", "attn_implementation"}`` and, when
        they differ, ``"first_difference"`` (the first quantized layer whose output differs).

    Raises:
        RuntimeError: with ``require_identical``, the logits differ anywhere; the message names
            the first quantized layer whose output differs (same inputs to both models).
    """
    vlm = _hf_model(model)
    loaded = load_compressed_tensors(path, attn_implementation=attn_implementation)
    with torch.no_grad():
        expected = vlm(**batch).logits
        got = loaded(**batch).logits
    gap = float((got.float() - expected.float()).abs().max())
    identical = gap == 0.0 and got.dtype == expected.dtype
    result = {
        "samples": int(batch["input_ids"].shape[0]),
        "max_abs_logit_diff": gap,
        "identical": identical,
        "attn_implementation": attn_implementation,
    }
    if identical:
        return result
    result["first_difference"] = where = _first_difference(vlm, loaded, batch)
    if require_identical:
        raise RuntimeError(
            f"the compressed-tensors checkpoint at {path} gives logits {gap:.3g} away from the "
            f"run's model in transformers (first differing layer: {where}); this is a bug in "
            "distiq's compressed-tensors export, please report it (--format packed is exact)"
        )
    log.warning("%s: logits differ from the run's model by %.3g (%s)", path, gap, where)
    return result


def _first_difference(vlm: nn.Module, loaded: nn.Module, batch: dict) -> str:
    """``NAME (same input, scheme ...)``: the first quantized layer (in module order) whose
    output differs between the two models, found by recording every quantized layer's input and
    output in both; ``"none"`` when no layer output differs."""
    names = [name for name, module in vlm.named_modules() if is_quantized(module)]
    records: dict[str, dict[str, tuple]] = {"distiq": {}, "transformers": {}}
    hooks = []
    for side, net in (("distiq", vlm), ("transformers", loaded)):
        for name in names:
            module = net.get_submodule(name)

            def hook(_module, args, output, side=side, name=name):
                records[side].setdefault(name, (args[0].detach(), output.detach()))

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            vlm(**batch)
            loaded(**batch)
    finally:
        for handle in hooks:
            handle.remove()
    for name in names:
        ours, theirs = records["distiq"].get(name), records["transformers"].get(name)
        if ours is None or theirs is None or torch.equal(ours[1], theirs[1]):
            continue
        scheme = getattr(loaded.get_submodule(name), "quantization_scheme", None)
        same_input = torch.equal(ours[0], theirs[0])
        args = (
            None
            if scheme is None
            else scheme.model_dump(mode="json", exclude={"targets"}, exclude_none=True)
        )
        return f"{name} ({'same' if same_input else 'different'} input, scheme {args})"
    return "none"
