"""The deployment backends the benchmark measures, on one model's parts.

Backends (each where it applies; otherwise reported as unavailable with the reason):

- ``pytorch-fp32``: the model's float twin (each quantized layer a float layer holding its
  dequantized weight, activations unquantized) in eager PyTorch: the float baseline;
- ``pytorch-w8a8``: the model with every W8A8-eligible linear layer (int8 symmetric per-channel
  weights, int8 activations) running ``torch._int_mm`` (``QuantizedLinear(int_matmul=True)``);
  other quantized layers keep their dequantize-then-matmul forward;
- ``ort-fp32``: the float twin exported to ONNX (``precision="fp32"``) in onnxruntime;
- ``ort-int8``: the model exported as int8 QDQ (``precision="int8"``);
- ``ort-int4``: the model exported with INT4 blockwise weights (``precision="int4"``),
  onnxruntime's ``MatMulNBits`` at ``int4_accuracy_level`` (None: onnxruntime's default).

Workloads, batch 1 (``WORKLOAD_NAMES`` says them in words):

- ``language_model``: the *prefill*, ``inputs_embeds (1, L, D)`` → logits of the whole prompt,
  L = image tokens + 16 text tokens by default;
- ``decode``: ONE new token with the KV cache of that prompt (L cached tokens) → its logits:
  the per-token cost of an answer (``distiq.bench.decode``);
- ``vision``: ``pixel_values`` → image features.

``max_abs_diff`` compares a backend's output with the model's own PyTorch output
(fake-quant or quantized layers) on the same input — the export parity; it is left out for the
float baselines, whose difference from the quantized model is the quantization itself.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distiq.bench.decode import OrtDecodeStep, TorchDecodeStep, step_embedding
from distiq.bench.timing import Timing, peak_memory, set_threads, time_interleaved

log = logging.getLogger(__name__)

BACKENDS = ("pytorch-fp32", "pytorch-w8a8", "ort-fp32", "ort-int8", "ort-int4")
WORKLOADS = ("language_model", "decode", "vision")
WORKLOAD_NAMES = {
    "language_model": "prefill",
    "decode": "decode (one token)",
    "vision": "vision",
}
LANGUAGE_WORKLOADS = ("language_model", "decode")
_ORT_PRECISION = {"ort-fp32": "fp32", "ort-int8": "int8", "ort-int4": "int4"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the ``onnx`` extra


def missing_onnx_packages() -> list[str]:
    """The packages of the ``ort-*`` backends (ONNX export and onnxruntime) not installed."""
    import importlib.util

    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


@dataclass
class BackendResult:
    """One backend on one workload."""

    backend: str
    workload: str
    available: bool
    reason: str | None = None
    timing: Timing | None = None
    memory: dict | None = None
    size_bytes: int | None = None
    max_abs_diff: float | None = None
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "available": self.available,
            "reason": self.reason,
            "size_bytes": self.size_bytes,
            "max_abs_diff": self.max_abs_diff,
            **self.detail,
        }
        if self.timing is not None:
            out.update(self.timing.to_dict())
        if self.memory is not None:
            out["memory"] = self.memory
        return out


def w8a8_model(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose W8A8-eligible linear layers use the int8 matmul, and how many."""
    from distiq.quant import FakeQuantLinear, QuantizedLinear
    from distiq.quant.quantized import int_matmul_supported

    clone = copy.deepcopy(model)
    count = 0
    for name, module in list(clone.named_modules()):
        if isinstance(module, QuantizedLinear) and module.int_matmul_supported():
            module.int_matmul = True
            count += 1
        elif (
            isinstance(module, FakeQuantLinear)
            and module.weight_spec is not None
            and not module.token_importance
            and int_matmul_supported(module.weight_spec, module.activation_spec)
        ):
            clone.set_submodule(name, QuantizedLinear.from_fake_quant(module, int_matmul=True))
            count += 1
    return clone.eval(), count


def _state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for value in model.state_dict().values():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.numel())
        if key not in seen:
            seen.add(key)
            total += value.numel() * value.element_size()
    return total


def _fp32_bytes(model: nn.Module) -> int:
    return sum(4 * v.numel() for v in model.state_dict().values() if v.is_floating_point())


# The prompt length of the language workloads for families whose image-token count depends on
# the image (Idefics3 splitting, Qwen2-VL's grid): a typical single-image prompt.
DEFAULT_PROMPT_TOKENS = 128
VISION_ONLY_LLAVA = (
    "the vision workload times LLaVA-layout towers (one fixed-size image); this family's "
    "processor makes its own patches or tiles"
)


def _inputs(model: nn.Module, adapter: Any, seq_len: int | None) -> dict[str, torch.Tensor]:
    """Random prompt embeddings ``(1, L, hidden)``, one decode step's embedding and, for
    LLaVA-layout models, one image ``(1, 3, H, W)`` (``pixel_values``; absent otherwise)."""
    from distiq.export.onnx_parts import image_facts
    from distiq.models.multitask import unwrap_vlm

    vlm = unwrap_vlm(model)
    llava = getattr(adapter, "family", None) == "llava"
    facts = image_facts(model, adapter) if llava else None
    default = facts["num_image_tokens"] + 16 if facts else DEFAULT_PROMPT_TOKENS
    length = min(seq_len or default, adapter.max_length)
    generator = torch.Generator().manual_seed(0)
    vocab = vlm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, length), generator=generator)
    with torch.no_grad():
        embeds = vlm.get_input_embeddings()(ids).float()
    inputs = {"inputs_embeds": embeds, "step_embeds": step_embedding(model)}
    if facts is not None:
        height, width = facts["image_size"]
        inputs["pixel_values"] = torch.randn(1, 3, height, width, generator=generator)
    return inputs


def _torch_call(
    model: nn.Module, adapter: Any, workload: str, inputs: dict
) -> Callable[[], torch.Tensor]:
    """The zero-argument call that runs ``workload`` of ``model`` in eager PyTorch."""
    if workload == "decode":
        return TorchDecodeStep(model, adapter, inputs["inputs_embeds"], inputs["step_embeds"])
    part = _part(model, adapter, workload)
    if workload == "language_model":
        embeds = inputs["inputs_embeds"]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return part(embeds, mask)
    else:
        pixels = inputs["pixel_values"]

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return part(pixels)

    return run


def _part(model: nn.Module, adapter: Any, workload: str) -> nn.Module:
    from distiq.export.onnx_parts import language_graph, vision_graph

    part = (
        language_graph(model, adapter)
        if workload == "language_model"
        else vision_graph(model, adapter)
    )
    return part.eval()


def _ort_call(path: Path, workload: str, inputs: dict, threads: int, level: int | None):
    import onnxruntime as ort

    from distiq.export.ort import decoder_feed, session_options

    name = "language_model" if workload in LANGUAGE_WORKLOADS else "vision"
    session = ort.InferenceSession(
        str(path / f"{name}.onnx"),
        session_options(threads, level, spinning=False),
        ["CPUExecutionProvider"],
    )
    if workload == "decode":
        return OrtDecodeStep(
            session, inputs["inputs_embeds"].numpy(), inputs["step_embeds"].numpy()
        )
    if workload == "language_model":
        feed = decoder_feed(session, inputs["inputs_embeds"].numpy())  # the prompt, no cache
    else:
        feed = {"pixel_values": inputs["pixel_values"].numpy()}
    return lambda: session.run(None, feed)[0]


def _first_problem(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]


def _export_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.onnx*"))  # graphs and their .data


def _diff(output, reference: torch.Tensor) -> float:
    value = torch.as_tensor(np.asarray(output)) if not isinstance(output, torch.Tensor) else output
    return float((value.float() - reference.float()).abs().max())


def export_backends(
    model: nn.Module,
    adapter: Any,
    root: str | Path,
    *,
    backends: tuple[str, ...] = BACKENDS,
    int8_weights: str = "auto",
    twin: nn.Module | None = None,
) -> dict[str, Path | str]:
    """Write the ONNX models that the ``ort-*`` backends among ``backends`` time, each under
    ``root/onnx-<precision>``. Returns ``{backend: its directory}``, or ``{backend: why it
    cannot export}`` (e.g. 2-bit weights in int8 QDQ, or the ``onnx`` extra not installed:
    :func:`missing_onnx_packages`). ``ort-fp32`` exports ``twin`` (default:
    the model's float twin). :func:`measure_model` calls it, or takes its result
    (``exports=``): ``distiq demo`` exports in the worker process that trained the model, side
    by side with the other worker's runs."""
    from distiq.export.onnx import export_onnx
    from distiq.export.onnx_quant import plan_model
    from distiq.export.rundir import float_twin

    root = Path(root)
    exports: dict[str, Path | str] = {}
    missing = missing_onnx_packages()
    for backend in backends:
        if backend not in _ORT_PRECISION:
            continue
        if missing:
            exports[backend] = f"needs {', '.join(missing)}: pip install 'distiq[onnx]'"
            continue
        precision = _ORT_PRECISION[backend]
        if precision == "fp32" and twin is None:
            twin = float_twin(model)
        source = twin if precision == "fp32" else model
        try:
            plan_model(source, precision, int8_weights)
        except ValueError as exc:
            exports[backend] = _first_problem(str(exc))
            continue
        target = root / f"onnx-{precision}"
        try:
            export_onnx(
                source, target, adapter=adapter, precision=precision,
                int8_weights=int8_weights, overwrite=True,
            )  # fmt: skip
        except ValueError as exc:  # a family the ONNX export does not cover: said, not fatal
            exports[backend] = _first_problem(str(exc))
            continue
        exports[backend] = target
    return exports


def measure_model(
    model: nn.Module,
    adapter: Any = None,
    *,
    backends: tuple[str, ...] = BACKENDS,
    workloads: tuple[str, ...] = ("language_model",),
    threads: int = 2,
    warmup: int = 5,
    repeats: int = 30,
    seq_len: int | None = None,
    int4_accuracy_level: int | None = None,
    int8_weights: str = "auto",
    workdir: str | Path | None = None,
    exports: dict[str, Path | str] | None = None,
) -> list[BackendResult]:
    """Measure ``backends`` on ``workloads`` of one model (see the module docstring).

    Args:
        model: a LLaVA-architecture VLM or ``VLMWithHeads`` (float, fake-quant, or with
            ``QuantizedLinear`` layers).
        adapter: its adapter (not needed for ``VLMWithHeads``).
        threads: torch intra-op threads and onnxruntime ``intra_op_num_threads``.
        warmup, repeats: untimed and timed runs per backend (timed runs interleaved).
        workloads: ``language_model`` (the prefill), ``decode`` (one token after the
            prompt's cache), ``vision``.
        seq_len: the prompt length L of the language workloads (default: image tokens + 16 for
            LLaVA-layout models, :data:`DEFAULT_PROMPT_TOKENS` for the others).
        workdir: where ONNX exports go (default: a temporary directory, removed after).
        exports: the ONNX models of the ``ort-*`` backends, exported before by
            :func:`export_backends` from this model for the same ``backends`` (then nothing is
            exported here and ``workdir`` is not used).

    Returns:
        One ``BackendResult`` per (workload, backend), unavailable ones with their reason.
    """
    from distiq.export.rundir import float_twin

    unknown = sorted(set(backends) - set(BACKENDS)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise ValueError(
            f"unknown backend/workload {unknown}; backends: {', '.join(BACKENDS)}; "
            f"workloads: {', '.join(WORKLOADS)}"
        )
    previous = set_threads(threads)
    model.eval()
    own_dir = workdir is None and exports is None
    root = Path(tempfile.mkdtemp(prefix="distiq-bench-")) if own_dir else workdir
    try:
        inputs = _inputs(model, adapter, seq_len)
        twin = float_twin(model) if "pytorch-fp32" in backends else None
        w8a8, w8a8_layers = w8a8_model(model) if "pytorch-w8a8" in backends else (None, 0)
        if exports is None:  # root is a folder then
            exports = export_backends(
                model, adapter, root, backends=backends, int8_weights=int8_weights, twin=twin
            )
        results = []
        prompt_tokens = int(inputs["inputs_embeds"].shape[1])
        for workload in workloads:
            if workload == "vision" and "pixel_values" not in inputs:
                results += [
                    BackendResult(b, workload, False, reason=VISION_ONLY_LLAVA) for b in backends
                ]
                continue
            try:
                reference = _torch_call(model, adapter, workload, inputs)()
            except ValueError as exc:  # a family whose parts the timing cannot isolate
                reason = _first_problem(str(exc))
                results += [BackendResult(b, workload, False, reason=reason) for b in backends]
                continue
            calls: dict[str, Callable] = {}
            for backend in backends:
                result = BackendResult(backend, workload, True)
                if workload in LANGUAGE_WORKLOADS:
                    result.detail["prompt_tokens"] = prompt_tokens
                if workload == "decode":
                    result.detail["new_tokens"] = 1
                with peak_memory() as memory:
                    if backend == "pytorch-fp32":
                        calls[backend] = _torch_call(twin, adapter, workload, inputs)
                        result.size_bytes = _fp32_bytes(twin)
                    elif backend == "pytorch-w8a8":
                        if w8a8_layers == 0:
                            result.available = False
                            result.reason = (
                                "no W8A8 layer: needs int8 symmetric per-channel weights and int8 "
                                "activations"
                            )
                        else:
                            calls[backend] = _torch_call(w8a8, adapter, workload, inputs)
                            result.size_bytes = _state_bytes(w8a8)
                            result.detail["int8_layers"] = w8a8_layers
                    elif isinstance(exports.get(backend), Path):
                        path = exports[backend]
                        calls[backend] = _ort_call(
                            path, workload, inputs, threads, int4_accuracy_level
                        )
                        result.size_bytes = _export_size(path)
                    else:
                        result.available = False
                        result.reason = exports.get(backend, "not applicable")
                    if backend in calls:
                        output = calls[backend]()  # first run: session / kernel set-up
                if backend in calls:
                    result.memory = memory.to_dict()
                    if backend not in ("pytorch-fp32", "ort-fp32"):
                        result.max_abs_diff = _diff(output, reference)
                results.append(result)
            timings = time_interleaved(calls, warmup=warmup, repeats=repeats)
            for result in results:
                if result.workload == workload and result.backend in timings:
                    result.timing = timings[result.backend]
            log.info("measured %s on %d backend(s)", workload, len(calls))
        return results
    finally:
        set_threads(previous)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
