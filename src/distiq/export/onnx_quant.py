"""Quantized layers as ONNX QDQ: the export-time stand-ins and the graph post-processing.

Before tracing, every quantized layer (``FakeQuantLinear``, ``QuantizedLinear``,
``FakeQuantConv2d``, ``QuantizedConv2d``) is swapped for a stand-in whose ONNX form is:

activations (static, 8-bit, per tensor or per channel; the learned or calibrated qparams), in
``int8`` graphs as QDQ::

    x ─ Mul(1/s) ─ QuantizeLinear(scale=1, z) ─ DequantizeLinear(s, z) ─ x̂

  ``QuantizeLinear`` computes ``round(x / scale)``; distiq (like ``torch.fake_quantize_*``)
  computes ``round(x · (1/s))``, which differs for values near a rounding tie (measured: 7 % of
  the codes of values placed at ``(k + ½)·s``). Multiplying by the stored float32 ``1/s`` first
  and quantizing with scale 1 reproduces distiq's codes bit for bit. In ``int4`` and ``fp32``
  graphs, and for per-channel activations (whose scales vary along the matmul's reduction axis,
  so no integer GEMM can use them; onnxruntime would fuse such a QDQ MatMul and then fail at run
  time), the same arithmetic is written with float ops,
  ``Mul(1/s) ─ Round ─ Add(z) ─ Clip ─ Sub(z) ─ Mul(s)`` (bit for bit distiq's): onnxruntime does
  not fuse a ``DequantizeLinear``-fed MatMul into ``MatMulNBits``, and nothing consumes int8
  activations there.

weights, ``precision="int8"`` (8-bit codes, or 7-bit "reduced range" ones, per output channel or
per tensor)::

    codes (in, out) ─ DequantizeLinear(s (out,), z (out,), axis=1) ─ MatMul ─ Add(bias)

  onnxruntime fuses ``Q → DQ → MatMul ← DQ(weights)`` into ``MatMulIntegerToFloat`` (an int8
  GEMM, int32 accumulation). Without activation QDQ (weight-only int8) it fuses
  ``DQ(weights) → MatMul`` into an 8-bit ``MatMulNBits``, whose accuracy level (below) then
  applies as for int4. Weight type: x86 CPUs without AVX-512 VNNI multiply u8 × s8 pairs
  with 16-bit saturation (``vpmaddubsw``), which corrupts int8 weights using the full [-128, 127]
  range (measured on this AVX2 machine: max |Δlogit| 0.066 on the demo-sized language model,
  logits of size ~0.7, against ≤ 0.005 with UINT8 weights). ``int8_weights=
  "auto"`` therefore writes INT8 weights only when every code lies in [-64, 63] (no pair can
  saturate) and otherwise UINT8 weights with activations shifted to UINT8 (u8 × u8 takes a
  non-saturating path on every CPU, but is not faster than fp32 there); ``"int8"`` forces the
  fast form (exact only on CPUs with VNNI or on ARM), ``"uint8"`` the safe one. A model trained
  with 7-bit symmetric weights (``QuantSpec(bits=7)``: codes in [-64, 63], onnxruntime's
  ``reduce_range``) gets INT8 weights and is both exact and fast everywhere.

weights, ``precision="int4"`` (4-bit codes, per group of ``g`` inputs, or one group per row)::

    codes (in, out) INT4/UINT4 ─ DequantizeLinear(s (in/g, out), [z], axis=0, block_size=g) ─ MatMul

  (opset 21). onnxruntime fuses this into ``MatMulNBits``; its default ``accuracy_level`` 4
  quantizes the *activations* to int8 per block inside the kernel, which is not the trained
  model's arithmetic (measured parity is stated by the tests and the benchmark); session option
  ``session.qdq_matmulnbits_accuracy_level = "0"`` keeps float activations (exact to float
  rounding). GPTQ act-order layers gather the input columns into group order first.

``precision="fp32"``: weights are the dequantized ``Ŵ`` as float initializers; activations as the
float ops above, so the graph still computes the fake-quant model.

Convolutions (the patch embedding, the task heads) always carry float ``Ŵ`` (exact) with their
activation quantization. Unsupported inputs raise ``ValueError`` before anything is written: weights of a
bit width other than 8 or 7 (int8) or 4 (int4) — e.g. 3-bit — non-``int`` formats (nf4, fp8) in int8
or int4 graphs, per-group weights in an int8 graph, dynamic or non-8-bit activation quantization,
static activation scales that were never calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distiq.export.layers import (
    QuantizedConv2d,
    QuantizedWeight,
    activation_quantizer,
    is_quantized,
    quantized_weight,
)
from distiq.quant import FakeQuantConv2d
from distiq.quant.spec import PerChannel, PerGroup

PRECISIONS = ("fp32", "int8", "int4")
INT8_WEIGHTS = ("auto", "int8", "uint8")
BLOCK_OP = "DequantizeBlock"
DOMAIN = "distiq"
SATURATION_FREE = 64  # |code| <= 64 (codes in [-64, 63]): no u8 x s8 pair sum overflows int16


class _ActivationQDQ(torch.autograd.Function):
    """``(clamp(round(x·inv) + z) − z)·s`` with the ONNX form of the module docstring."""

    @staticmethod
    def forward(ctx, x, inv_scale, scale, zero_point, qmin: int, qmax: int, axis: int | None):
        # inv_scale is shaped to broadcast against x; scale / zero_point are () or (C,)
        z = zero_point.to(torch.float32).reshape(inv_scale.shape)
        q = torch.clamp(torch.round(x * inv_scale) + z, qmin, qmax)
        return (q - z) * scale.reshape(inv_scale.shape)

    @staticmethod
    def symbolic(g, x, inv_scale, scale, zero_point, qmin, qmax, axis):
        ones = g.op("Constant", value_t=torch.ones(()))
        if axis is not None:  # per channel: 1-D scale / zero-point along axis (-1 or 1)
            ones = g.op("Expand", ones, g.op("Shape", scale))
            q = g.op("QuantizeLinear", g.op("Mul", x, inv_scale), ones, zero_point, axis_i=axis)
            return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)
        q = g.op("QuantizeLinear", g.op("Mul", x, inv_scale), ones, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _DequantizeWeight(torch.autograd.Function):
    """Per-channel / per-tensor ``(codes − z)·s`` of ``codes (in, out)``; ONNX DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):
        return (codes.to(torch.float32) - zero_point.to(torch.float32)) * scale

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=1)


class _DequantizeBlock(torch.autograd.Function):
    """Blockwise ``(codes − z)·s`` along the input axis of ``codes (in, out)``; traced as
    ``distiq::DequantizeBlock`` and rewritten to opset-21 ``DequantizeLinear(block_size)``."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, block_size: int, signed: bool):
        s = scale.repeat_interleave(block_size, dim=0)
        if zero_point is None:  # symmetric signed codes: z = 0
            return codes.to(torch.float32) * s
        z = zero_point.to(torch.float32).repeat_interleave(block_size, dim=0)
        return (codes.to(torch.float32) - z) * s

    @staticmethod
    def symbolic(g, codes, scale, zero_point, block_size, signed):
        inputs = [codes, scale] if zero_point is None else [codes, scale, zero_point]
        return g.op(f"{DOMAIN}::{BLOCK_OP}", *inputs, block_size_i=block_size, signed_i=int(signed))


@dataclass(frozen=True)
class LayerPlan:
    """How one quantized layer is written (also recorded in the ONNX manifest)."""

    name: str
    kind: str  # "linear" | "conv2d"
    weight: str  # "fp32" | "int8" | "uint8" | "int4" | "uint4"
    block_size: int | None
    activation: str | None  # "int8" | "uint8" (QDQ) | "float" (Round/Clip ops) | None


def _check_activation(name: str, module: nn.Module) -> str | None:
    act = activation_quantizer(module)
    if act is None:
        return None
    spec = act.spec
    if not act.static:
        raise ValueError(
            f"{name}: dynamic activation quantization ({spec.granularity._to_config()}) computes "
            "scales at run time and has no static QDQ form; use static per-tensor activations "
            "(calibrated or learned) for ONNX export"
        )
    if spec.format != "int" or spec.bits != 8:
        raise ValueError(
            f"{name}: {spec.bits}-bit activations have no ONNX QDQ form (QuantizeLinear is 8-bit "
            "here); export models with 8-bit activations, or the packed format"
        )
    if not bool(act.calibrated):
        raise ValueError(
            f"{name}: the static activation quantizer was never calibrated (activation scales "
            "missing); run `with distiq.quant.calibration(model): model(batch)` first"
        )
    return "int8" if spec.is_signed else "uint8"


def plan_layer(name: str, module: nn.Module, precision: str, int8_weights: str) -> LayerPlan:
    """Decide (and check) how ``module`` is exported; raises ``ValueError`` if it cannot be."""
    is_conv = isinstance(module, FakeQuantConv2d | QuantizedConv2d)
    activation = _check_activation(name, module)
    act = activation_quantizer(module)
    if activation is not None and (
        precision != "int8" or isinstance(act.spec.granularity, PerChannel)
    ):
        # per-channel activation scales vary along the reduction axis: no integer GEMM can use
        # them (and onnxruntime would fuse, then reject, such a QDQ MatMul)
        activation = "float"
    qw = quantized_weight(module)
    if is_conv or precision == "fp32" or qw is None:
        return LayerPlan(name, "conv2d" if is_conv else "linear", "fp32", None, activation)
    spec = qw.spec
    if spec.format != "int":
        raise ValueError(
            f"{name}: {spec.format} weights have no {precision} ONNX form; export with "
            "precision='fp32' (dequantized weights, exact) or the packed format"
        )
    allowed = (8, 7) if precision == "int8" else (4,)
    if spec.bits not in allowed:
        raise ValueError(
            f"{name}: {spec.bits}-bit weights are not supported by ONNX precision {precision!r}, "
            f"which stores {' or '.join(map(str, allowed))}-bit weights (ONNX has 8-bit and 4-bit "
            "integer types; a wider container would hide the real size); use the precision that "
            "matches, 'fp32' (dequantized weights, exact), or the packed format (2-8 bits)"
        )
    g = spec.granularity
    in_features = qw.codes.shape[1]
    if precision == "int8":
        if isinstance(g, PerGroup):
            raise ValueError(
                f"{name}: per-group 8-bit weights have no int8 QDQ form (scales are per output "
                "channel there); use per_channel weights or precision='fp32'"
            )
        kind = "uint8" if int8_weights == "uint8" or not spec.is_signed else "int8"
        if int8_weights == "auto" and kind == "int8":
            codes = qw.codes
            if int(codes.min()) < -SATURATION_FREE or int(codes.max()) >= SATURATION_FREE:
                kind = "uint8"
        if kind == "uint8" and activation not in (None, "float"):
            activation = "uint8"  # u8 x u8: the kernel that cannot saturate
        return LayerPlan(name, "linear", kind, None, activation)
    block = g.size if isinstance(g, PerGroup) else in_features
    if isinstance(g, PerChannel) and g.axis % 2 != 0:
        raise ValueError(f"{name}: per_channel({g.axis}) weights cannot be exported; use axis 0")
    if block < 16 or block & (block - 1):
        raise ValueError(
            f"{name}: int4 blocks of {block} inputs are not supported by onnxruntime (it needs a "
            "power of two >= 16); quantize with per_group(32/64/128)"
        )
    if qw.g_idx is not None:
        counts = torch.bincount(qw.g_idx.long(), minlength=in_features // block)
        if bool((counts != block).any()):
            raise ValueError(f"{name}: act-order groups of unequal size cannot be exported")
    return LayerPlan(name, "linear", "int4" if spec.is_signed else "uint4", block, activation)


class _ExportLayer(nn.Module):
    """The traced stand-in of one quantized layer (see the module docstring)."""

    def __init__(self, module: nn.Module, plan: LayerPlan, exporter: str = "torchscript") -> None:
        super().__init__()
        self.plan = plan
        self.exporter = exporter
        act = activation_quantizer(module)
        self.act_axis = None
        if plan.activation is not None:
            scale, zero = act.qparams()  # (C,) static scale (clamped), zero (rounded)
            shift = 128 if plan.activation == "uint8" and act.spec.is_signed else 0
            dtype = {"uint8": torch.uint8, "int8": torch.int8, "float": torch.float32}[
                plan.activation
            ]
            self.qmin, self.qmax = act.spec.quant_min + shift, act.spec.quant_max + shift
            per_channel = scale.numel() > 1
            self.act_axis = (1 if plan.kind == "conv2d" else -1) if per_channel else None
            scale = scale.float() if per_channel else scale.float().reshape(())
            zero = (zero.float() + shift).to(dtype)
            zero = zero if per_channel else zero.reshape(())
            # 1/s broadcasts against the input: (C,) on a linear's last axis, (C, 1, 1) on a
            # conv's channels; the float form needs s and z in that shape too, QDQ takes them
            # 1-D with an axis.
            broadcast = (-1, 1, 1) if per_channel and plan.kind == "conv2d" else scale.shape
            if plan.activation == "float":
                scale, zero = scale.reshape(broadcast), zero.reshape(broadcast)
            self.register_buffer("act_scale", scale)
            self.register_buffer("act_inv_scale", (1.0 / scale).reshape(broadcast))  # distiq's 1/s
            self.register_buffer("act_zero_point", zero)
        qw = quantized_weight(module)
        bias = module.bias.detach().float().clone() if module.bias is not None else None
        self.register_buffer("bias", bias)
        self.register_buffer("perm", None)
        if plan.kind == "conv2d":
            self.conv = dict(
                stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups,
            )  # fmt: skip
            weight = qw.dequantized() if qw is not None else module.weight.detach().float()
            self.register_buffer("weight", weight.clone())
        elif plan.weight == "fp32":
            weight = qw.dequantized() if qw is not None else module.weight.detach().float()
            self.register_buffer("weight", weight.t().contiguous())  # (in, out)
        elif plan.weight in ("int8", "uint8"):
            self._init_int8(qw, plan.weight)
        else:
            self._init_int4(qw, plan)

    def _init_int8(self, qw: QuantizedWeight, kind: str) -> None:
        codes, zero = qw.codes, qw.zero_point.reshape(-1)
        scale = qw.scale.reshape(-1)
        if kind == "uint8" and qw.spec.is_signed:
            codes, zero = codes + 128, zero + 128
        dtype = torch.uint8 if kind == "uint8" else torch.int8
        out_features = codes.shape[0]
        if scale.numel() == 1:  # per tensor: one value broadcast per column
            scale, zero = scale.expand(out_features), zero.expand(out_features)
        self.register_buffer("codes", codes.t().contiguous().to(dtype))  # (in, out)
        self.register_buffer("scale", scale.float().contiguous())  # (out,)
        self.register_buffer("zero_point", zero.round().to(dtype).contiguous())  # (out,)

    def _init_int4(self, qw: QuantizedWeight, plan: LayerPlan) -> None:
        codes = qw.codes  # (out, in)
        out_features, in_features = codes.shape
        block = plan.block_size
        scale = qw.scale.reshape(out_features, -1)  # (out, G)
        zero = qw.zero_point.reshape(out_features, -1)
        if qw.g_idx is not None:
            perm = torch.sort(qw.g_idx.long(), stable=True).indices  # columns in group order
            self.register_buffer("perm", perm)
            codes = codes[:, perm]
        scale = scale.expand(out_features, in_features // block)
        zero = zero.expand(out_features, in_features // block)
        # 4-bit values in an 8-bit carrier (int8 for INT4, uint8 for UINT4) until finalize_graph
        dtype = torch.int8 if plan.weight == "int4" else torch.uint8
        self.register_buffer("codes", codes.t().contiguous().to(dtype))  # (in, out)
        self.register_buffer("scale", scale.t().contiguous().float())  # (in/block, out)
        if plan.weight == "int4" and not bool(zero.any()):
            self.register_buffer("zero_point", None)  # optional in DequantizeLinear: z = 0
        else:
            self.register_buffer("zero_point", zero.t().contiguous().round().to(dtype))
        self.block_size = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.activation == "float":  # distiq's arithmetic as float ops
            z = self.act_zero_point
            q = torch.clamp(torch.round(x * self.act_inv_scale) + z, self.qmin, self.qmax)
            x = (q - z) * self.act_scale
        elif self.plan.activation is not None and self.exporter == "dynamo":
            x = torch.ops.distiq.act_qdq(
                x, self.act_inv_scale, self.act_scale, self.act_zero_point, self.qmin, self.qmax,
                self.act_axis or 0,
            )  # fmt: skip
        elif self.plan.activation is not None:
            x = _ActivationQDQ.apply(
                x, self.act_inv_scale, self.act_scale, self.act_zero_point, self.qmin, self.qmax,
                self.act_axis,
            )  # fmt: skip
        if self.plan.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, **self.conv)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.plan.weight == "fp32":
            weight = self.weight
        elif self.plan.weight in ("int8", "uint8") and self.exporter == "dynamo":
            weight = torch.ops.distiq.dq_weight(self.codes, self.scale, self.zero_point)
        elif self.plan.weight in ("int8", "uint8"):
            weight = _DequantizeWeight.apply(self.codes, self.scale, self.zero_point)
        elif self.exporter == "dynamo":
            weight = torch.ops.distiq.dq_block(
                self.codes, self.scale, self.zero_point, self.block_size, self.plan.weight == "int4"
            )
        else:
            weight = _DequantizeBlock.apply(
                self.codes, self.scale, self.zero_point, self.block_size, self.plan.weight == "int4"
            )
        y = torch.matmul(x, weight)
        return y + self.bias if self.bias is not None else y


def plan_model(model: nn.Module, precision: str, int8_weights: str = "auto") -> list[LayerPlan]:
    """Check every quantized layer of ``model`` for ``precision``; all errors at once."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if int8_weights not in INT8_WEIGHTS:
        raise ValueError(f"int8_weights must be one of {', '.join(INT8_WEIGHTS)}")
    plans, errors = [], []
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        try:
            plans.append(plan_layer(name, module, precision, int8_weights))
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        more = f"\n  ... and {len(errors) - 8} more" if len(errors) > 8 else ""
        raise ValueError(
            f"cannot export to ONNX ({precision}):\n  " + "\n  ".join(errors[:8]) + more
        )
    if precision != "fp32" and not any(p.weight != "fp32" for p in plans):
        raise ValueError(
            f"precision {precision!r} needs quantized weights, and the model has none to write "
            "in that form: export a float model with precision='fp32'"
        )
    return plans


class swapped_layers:
    """Context manager: the quantized layers of ``model`` replaced by their export stand-ins
    (restored on exit, also on error)."""

    def __init__(
        self, model: nn.Module, plans: list[LayerPlan], exporter: str = "torchscript"
    ) -> None:
        self.model, self.plans, self.exporter, self.saved = model, plans, exporter, []

    def __enter__(self) -> nn.Module:
        for plan in self.plans:
            old = self.model.get_submodule(plan.name)
            self.saved.append((plan.name, old))
            self.model.set_submodule(plan.name, _ExportLayer(old, plan, self.exporter))
        return self.model

    def __exit__(self, *exc) -> None:
        for name, old in reversed(self.saved):
            self.model.set_submodule(name, old)


def _int4_tensor(onnx_module, name: str, values, dims, signed: bool):
    """An ONNX INT4/UINT4 initializer (two values per byte, the first in the low nibble)."""
    import numpy as np

    flat = np.asarray(values, dtype=np.int64).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.int64)])
    raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    kind = onnx_module.TensorProto.INT4 if signed else onnx_module.TensorProto.UINT4
    return onnx_module.helper.make_tensor(name, kind, list(dims), raw, raw=True)


def finalize_graph(model_proto, opset: int = 21):
    """Rewrite ``distiq::DequantizeBlock`` into opset-21 ``DequantizeLinear(block_size)`` with
    INT4/UINT4 initializers, drop the custom domain, and set the default opset."""
    import onnx
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    # The exporter shares equal initializers through Identity nodes (e.g. all-zero zero-points);
    # give each user its own copy so every DequantizeLinear reads a constant it owns.
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        inits[copy.name] = graph.initializer[-1]
        graph.node.remove(node)
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def take(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name]), inits[name]
        node = constants[name]
        return numpy_helper.to_array(node.attribute[0].t), node

    converted = set()
    for node in graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.domain == DOMAIN and node.op_type == BLOCK_OP:  # TorchScript's stand-in
            block, signed = attrs["block_size"], bool(attrs["signed"])
        elif node.op_type == "DequantizeLinear" and attrs.get("block_size", 0) > 0:  # dynamo's
            block = attrs["block_size"]
            signed = take(node.input[0])[0].dtype.kind == "i"  # int8 carrier: INT4
        else:
            continue
        pairs = [(index, take(node.input[index])[0]) for index in range(len(node.input))]
        for index, values in [(i, v) for i, v in pairs if i != 1]:
            name = node.input[index]
            if name in converted:
                continue
            tensor = _int4_tensor(onnx, name, values, values.shape, signed)
            if name in inits:
                inits[name].CopyFrom(tensor)
            else:
                constants[name].attribute[0].t.CopyFrom(tensor)
            converted.add(name)
        node.domain = ""
        node.op_type = "DequantizeLinear"
        del node.attribute[:]
        node.attribute.extend(
            [onnx.helper.make_attribute("axis", 0), onnx.helper.make_attribute("block_size", block)]
        )
    defaults = {"output_dtype": 0, "block_size": 0, "saturate": 1}
    for node in graph.node:  # drop default-valued attributes (some runtimes mishandle them)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain == "":
            keep = [a for a in node.attribute if defaults.get(a.name) != a.i]
            del node.attribute[:]
            node.attribute.extend(keep)
    kept = [o for o in model_proto.opset_import if o.domain not in ("", DOMAIN)]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend([onnx.helper.make_opsetid("", opset), *kept])
    return model_proto
