"""``quantize_model``: post-training quantization (GPTQ or RTN) of a whole model, block by block.

For each stage (see ``distiq.ptq.blocks``) in the order the model runs them:
1. capture the stage's inputs on every calibration batch (forward hooks, stopped early);
2. for each block: run it on its inputs with hooks on its selected ``nn.Linear`` / ``nn.Conv2d``
   layers that accumulate ``H = 2/n Σ x xᵀ``; quantize those layers (their weights are replaced
   by the dequantized quantized values); run the *quantized* block again to produce the next
   block's inputs.
So every layer is calibrated on inputs that went through the already quantized part of the
model, and memory holds one stage's hidden states (inputs and outputs of one block, over the
calibration batches) plus one Hessian per selected layer of the current block.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from distiq.ptq.blocks import capture_stage, main_output, plan_stages, run_block, to_device
from distiq.ptq.gptq import gptq_quantize
from distiq.ptq.hessian import HessianAccumulator
from distiq.ptq.result import PTQResult, output_energy
from distiq.ptq.rtn import rtn_quantize
from distiq.quant.api import pattern_errors, resolve_specs
from distiq.quant.spec import PerTensor, QuantConfig, QuantSpec

logger = logging.getLogger(__name__)

LAYER_TYPES = (nn.Linear, nn.Conv2d)


@dataclass
class LayerReport:
    """What ``quantize_model`` did to one layer.

    Attributes:
        name: fully qualified module name.
        kind: ``Linear`` or ``Conv2d``.
        shape: the weight's shape.
        method: ``gptq`` or ``rtn`` (``rtn`` also where GPTQ had no inputs: see ``note``).
        bits, group_size: the weight spec (group_size None: per channel / per tensor).
        tokens: calibration rows the Hessian was built from (tokens, or conv output positions).
        squared_error: ``‖(W − Q) X‖²`` over those rows (None without inputs).
        relative_error: ``‖(W − Q) X‖² / ‖W X‖²``.
        seconds: time spent quantizing this layer (Hessian accumulation excluded).
        damp: GPTQ's relative damping used.
        note: why a layer was handled specially, else "".
        scale, zero_point: the weight qparams the codes use (``PTQResult``'s shapes); not
            part of ``to_dict``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    method: str
    bits: int
    group_size: int | None
    tokens: int
    squared_error: float | None
    relative_error: float | None
    seconds: float
    damp: float | None = None
    note: str = ""
    scale: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    zero_point: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("scale", "zero_point")
        }


def select_layers(model: nn.Module, config: QuantConfig) -> dict[str, tuple[nn.Module, QuantSpec]]:
    """The ``nn.Linear`` / ``nn.Conv2d`` layers ``config`` selects, with their weight specs.

    Selection follows ``distiq.quant.quantize_``: fnmatch globs over fully qualified names that
    match a module or one of its ancestors; ``include`` minus ``exclude``; ``overrides`` change
    the weight spec (None leaves a layer unquantized). A pattern that matches no module is an
    error listing near misses."""
    names = [n for n, _ in model.named_modules() if n]
    errors = pattern_errors(config, names)
    if errors:
        raise ValueError("quantize_model: " + "; ".join(errors))
    selected = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, LAYER_TYPES) or not config.selects(name):
            continue
        weight_spec, _ = resolve_specs(name, config)
        if weight_spec is not None:
            selected[name] = (module, weight_spec)
    return selected


def quantize_layer(
    layer: nn.Module,
    spec: QuantSpec,
    hessian: torch.Tensor | None,
    method: str,
    **gptq_options: Any,
) -> PTQResult:
    """Quantize one layer's weight (the layer is not changed).

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv2d``.
        spec: its weight spec.
        hessian: ``(in, in)``; ``(G, d, d)`` for a convolution with ``G`` groups (each group of
            output channels is quantized on its own and the result's tensors are concatenated
            over output channels, ``g_idx`` stacked to ``(G, d)``); None rounds to nearest.
        method: ``gptq`` or ``rtn``.
        gptq_options: keyword options of ``gptq_quantize``.
    """
    weight = layer.weight.detach()
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    if groups == 1:
        return _quantize_weight(weight, spec, hessian, method, gptq_options)
    if isinstance(spec.granularity, PerTensor):
        raise ValueError(
            f"per-tensor weights are not supported for a convolution with groups={groups}; "
            "use PerChannel(0)"
        )
    start = time.perf_counter()
    chunks = weight.chunk(groups)
    parts = [
        _quantize_weight(w, spec, hessian[g] if hessian is not None else None, method, gptq_options)
        for g, w in enumerate(chunks)
    ]
    result = PTQResult(
        weight=torch.cat([p.weight for p in parts]),
        codes=torch.cat([p.codes for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero_point=torch.cat([p.zero_point for p in parts]),
        spec=parts[0].spec,
        g_idx=torch.stack([p.g_idx for p in parts]) if parts[0].g_idx is not None else None,
        damp=max((p.damp for p in parts if p.damp is not None), default=None),
    )
    if hessian is not None:
        error = sum(p.error for p in parts)
        energy = sum(output_energy(w, hessian[g]) for g, w in enumerate(chunks))
        result.error, result.relative_error = error, error / energy if energy > 0 else 0.0
    result.seconds = time.perf_counter() - start
    return result


def _quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None, method: str, options: dict
) -> PTQResult:
    if method == "gptq" and hessian is not None:
        return gptq_quantize(weight, hessian, spec, **options)
    return rtn_quantize(weight, spec, hessian)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                seen[id(param)] = seen.get(id(param), 0) + 1
    return {k for k, count in seen.items() if count > 1}


def _replace_weight(name: str, layer: nn.Module, new: torch.Tensor, shared: set[int]) -> None:
    if id(layer.weight) in shared:
        warnings.warn(
            f"{name}.weight is shared with another module (tied weights); it is untied so that "
            "only this layer gets the quantized weight",
            RuntimeWarning,
            stacklevel=3,
        )
        layer.weight = nn.Parameter(new.clone(), requires_grad=layer.weight.requires_grad)
    else:
        layer.weight.data.copy_(new)


def _check_batches(calib_batches: Iterable[Any]) -> list[Any]:
    if isinstance(calib_batches, torch.Tensor | dict):
        raise TypeError(
            "calib_batches must be an iterable of batches (a list of dicts of keyword arguments "
            "or tuples of positional arguments for model(...)), not a single batch: wrap it in "
            "a list"
        )
    batches = list(calib_batches)
    if not batches:
        raise ValueError(
            "the calibration set is empty: pass at least one batch (e.g. 128 sequences from the "
            "training data) in calib_batches"
        )
    return batches


def quantize_model(
    model: nn.Module,
    calib_batches: Iterable[Any],
    config: QuantConfig,
    method: Literal["gptq", "rtn"] = "gptq",
    *,
    convert: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    blocks: Sequence[str] | None = None,
) -> list[LayerReport]:
    """Quantize the weights of ``model``'s selected layers in place with GPTQ or RTN.

    Args:
        model: any ``nn.Module`` (a Hugging Face VLM included).
        calib_batches: calibration batches, each a dict of keyword arguments or a tuple of
            positional arguments for ``model(...)``; tensors are moved to the model's device.
        config: which ``nn.Linear`` / ``nn.Conv2d`` layers and which weight specs (globs and
            overrides as in ``distiq.quant.quantize_``). Activation specs are not applied here.
        method: ``gptq`` or ``rtn``. RTN ignores the data for the weights but still measures
            each layer's reconstruction error on the calibration inputs.
        convert: replace each quantized ``nn.Linear`` by a ``distiq.quant.QuantizedLinear``
            holding packed codes (convolutions keep their dequantized weights).
        block_size, damp, act_order, static_groups: GPTQ options (see ``gptq_quantize``).
        blocks: globs naming the containers whose children are the sequential blocks; default:
            every outermost ``nn.ModuleList`` holding a selected layer.

    Returns:
        One ``LayerReport`` per quantized layer, in the order they were quantized. Layers the
        calibration batches never reach are rounded to nearest (with a warning).
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a distiq.quant.QuantConfig, got {type(config).__name__}")
    batches = _check_batches(calib_batches)
    layers = select_layers(model, config)
    if not layers:
        raise ValueError(
            "quantize_model: the config selects no nn.Linear / nn.Conv2d layer with a weight "
            "spec; check include / exclude and that config.weight is set"
        )
    if config.activation is not None:
        warnings.warn(
            "quantize_model quantizes weights only; the activation spec is not applied (use "
            "distiq.quant.quantize_ for fake-quantized activations)",
            UserWarning,
            stacklevel=2,
        )
    device = next(iter(model.parameters())).device
    batches = [to_device(b, device) for b in batches]
    gptq_options = dict(
        block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups
    )
    shared = _shared_parameter_ids(model)
    reports: list[LayerReport] = []

    def finish(name: str, hessian: torch.Tensor | None, tokens: int, note: str = "") -> None:
        layer, spec = layers[name]
        used = method if hessian is not None else "rtn"
        result = quantize_layer(layer, spec, hessian, used, **gptq_options)
        _replace_weight(name, layer, result.weight, shared)
        if convert:
            _convert(model, name, layer, result)
        report = LayerReport(
            name=name,
            kind=type(layer).__name__,
            shape=tuple(layer.weight.shape),
            method=used,
            bits=spec.bits,
            group_size=spec.group_size,
            tokens=tokens,
            squared_error=result.error * tokens if result.error is not None else None,
            relative_error=result.relative_error,
            seconds=result.seconds,
            damp=result.damp,
            note=note,
            scale=result.scale,
            zero_point=result.zero_point,
        )
        reports.append(report)
        logger.info(
            "%s: %s %d-bit, relative error %s, %.2fs%s",
            name,
            used,
            spec.bits,
            f"{report.relative_error:.3g}" if report.relative_error is not None else "n/a",
            report.seconds,
            f" ({note})" if note else "",
        )

    was_training = model.training
    configs = {
        id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")
    }
    use_cache = {key: c.use_cache for key, c in configs.items()}
    model.eval()
    for c in configs.values():
        c.use_cache = False  # a key/value cache would be mutated by the replayed blocks
    try:
        with torch.no_grad():
            stages = plan_stages(model, list(layers), batches[0], blocks)
            for stage in stages:
                _quantize_stage(model, stage, batches, finish)
    finally:
        model.train(was_training)
        for key, c in configs.items():
            c.use_cache = use_cache[key]

    return reports


def _quantize_stage(model: nn.Module, stage, batches: list[Any], finish) -> None:
    """Capture the stage's inputs, then quantize its blocks one after the other."""
    captured = [c for c in (capture_stage(model, stage, b) for b in batches) if c is not None]
    if not captured:
        for names in stage.layers:
            for name in names:
                warnings.warn(
                    f"{name} is never reached by the calibration batches; rounded to nearest",
                    RuntimeWarning,
                    stacklevel=4,
                )
                finish(name, None, 0, note="not reached by calibration: rounded to nearest")
        return
    hidden = [c.hidden for c in captured]
    last = len(stage.blocks) - 1
    for k, (block, names) in enumerate(zip(stage.blocks, stage.layers)):
        if names:
            accumulators = {n: HessianAccumulator(_layer(model, n)) for n in names}
            handles = [
                acc.layer.register_forward_pre_hook(acc.hook, with_kwargs=True)
                for acc in accumulators.values()
            ]
            try:
                for c, h in zip(captured, hidden):
                    run_block(block, c.calls[k], h)
            finally:
                for handle in handles:
                    handle.remove()
            for name, acc in accumulators.items():
                if acc.tokens == 0:
                    finish(name, None, 0, note="not called by its block: rounded to nearest")
                else:
                    finish(name, acc.hessian(), acc.tokens)
            del accumulators
        if k < last:
            outputs = []
            for c, h in zip(captured, hidden):
                out = main_output(run_block(block, c.calls[k], h))
                if out is None:
                    raise TypeError(f"block {stage.names[k]!r} returned no tensor output")
                outputs.append(out)
            hidden = outputs


def _layer(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _convert(model: nn.Module, name: str, layer: nn.Module, result: PTQResult) -> None:
    """Replace the ``nn.Linear`` ``name`` by a ``QuantizedLinear`` holding ``result``'s packed
    codes (its forward equals the layer's with the dequantized weight)."""
    from distiq.quant.quantized import QuantizedLinear

    if not isinstance(layer, nn.Linear):
        logger.info("%s: %s keeps its dequantized weight", name, type(layer).__name__)
        return
    bias = layer.bias.detach() if layer.bias is not None else None
    new = QuantizedLinear.from_quantized(
        result.codes, result.scale, result.zero_point, result.spec, bias, result.g_idx
    )
    model.set_submodule(name, new)
