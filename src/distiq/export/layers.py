"""One view of every quantized layer kind, and ``QuantizedConv2d``.

The exporters (packed safetensors, ONNX) read four kinds of quantized layers through one record,
``QuantizedWeight`` (codes + qparams + spec), and ``activation_quantizer`` (the frozen input
quantizer):

- ``FakeQuantLinear`` / ``FakeQuantConv2d`` (``distiq.quant``, training): the codes are computed
  from the current float weight with the qparams the forward uses (learned LSQ ones included);
- ``QuantizedLinear`` (``distiq.quant``, packed inference) and ``QuantizedConv2d`` (here): the
  stored codes.

``QuantizedConv2d`` is the convolution counterpart of ``QuantizedLinear`` (``distiq.quant`` has
none): packed codes of the weight's 2-D view ``(C_out, C_in/groups·kh·kw)``, ``weight_scale`` /
``weight_zero_point`` in ``QParams`` shapes, an optional frozen activation quantizer (feature axis
1), and a forward ``conv2d(x̂, (codes − z)·s)`` whose float32 arithmetic is that of
``FakeQuantConv2d``, so the outputs are identical (``atol=0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distiq.quant import FakeQuantConv2d, FakeQuantLinear, QuantizedLinear, QuantSpec
from distiq.quant.functional import dequantize, quantize
from distiq.quant.packing import pack, packed_numel, unpack
from distiq.quant.quantizers import ActivationQuantizer, describe_spec
from distiq.quant.spec import PerChannel, PerGroup, PerTensor

QUANTIZED_TYPES = (FakeQuantLinear, FakeQuantConv2d, QuantizedLinear)


@dataclass
class QuantizedWeight:
    """A layer's quantized weight.

    Attributes:
        codes: ``(out, in)`` (a convolution's flattened ``(C_out, C_in/groups·kh·kw)``): int32
            integer codes (``int``), NF4 indices 0-15 (``nf4``) or float8 values (``fp8_e4m3``).
        scale, zero_point: float32 ``QParams`` of ``codes``: ``(1, 1)`` per tensor, ``(out, 1)``
            per channel, ``(out, G, 1)`` per group (with ``g_idx``: G groups picked per column).
        spec: the weight spec.
        g_idx: int64 ``(in,)`` group of each input column (GPTQ act-order), or None.
        weight_shape: the layer's weight shape (``(out, in)`` or ``(out, C, kh, kw)``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None
    weight_shape: tuple[int, ...]

    @property
    def code_bits(self) -> int:
        return 8 if self.spec.format == "fp8_e4m3" else self.spec.bits

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``(codes − z)·s`` in ``weight_shape`` (what the forward uses)."""
        if self.g_idx is not None:
            scale = self.scale[:, self.g_idx, 0]  # (out, in)
            zero = self.zero_point[:, self.g_idx, 0]
            flat = (self.codes.to(torch.float32) - zero) * scale
        else:
            flat = dequantize(self.codes, self.scale, self.zero_point, self.spec)
        return flat.reshape(self.weight_shape)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer the exporters handle."""
    return isinstance(module, (*QUANTIZED_TYPES, QuantizedConv2d))


def quantized_weight(module: nn.Module) -> QuantizedWeight | None:
    """The quantized weight of ``module`` (None for a fake-quant layer without a weight spec)."""
    if isinstance(module, QuantizedLinear):
        return QuantizedWeight(
            module.weight_codes(),
            module.weight_scale,
            module.weight_zero_point,
            module.weight_spec,
            module.g_idx,
            (module.out_features, module.in_features),
        )
    if isinstance(module, QuantizedConv2d):
        return QuantizedWeight(
            module.weight_codes(),
            module.weight_scale,
            module.weight_zero_point,
            module.weight_spec,
            None,
            module.weight_shape,
        )
    if isinstance(module, FakeQuantLinear | FakeQuantConv2d):
        if module.weight_quant is None:
            return None
        with torch.no_grad():
            weight = module.weight.detach()
            w2d = weight.reshape(weight.shape[0], -1)
            scale, zero = module.weight_quant.qparams(w2d)
            codes = quantize(w2d, scale, zero, module.weight_spec)
        return QuantizedWeight(codes, scale, zero, module.weight_spec, None, tuple(weight.shape))
    raise TypeError(f"{type(module).__name__} is not a quantized layer")


def activation_quantizer(module: nn.Module) -> ActivationQuantizer | None:
    """The input activation quantizer of a quantized layer, or None."""
    if getattr(module, "token_importance", False):
        raise ValueError(
            "token-importance mixed activation precision has no exported form (each token's bit "
            "width depends on attention scores at run time): convert without token_importance"
        )
    return getattr(module, "act_quant", None)


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of the quantized layers whose static activation quantizer was never calibrated
    (its ``scale`` is the placeholder 1.0: exporting it would silently change the model)."""
    names = []
    for name, module in model.named_modules():
        if not is_quantized(module):
            continue
        act = getattr(module, "act_quant", None)
        if act is not None and act.static and not bool(act.calibrated):
            names.append(name)
    return names


def float_layer(module: nn.Module) -> nn.Module:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` holding ``module``'s dequantized weight Ŵ (the
    weights the forward uses; activation quantization, if any, is dropped)."""
    qw = quantized_weight(module)
    if isinstance(module, QuantizedLinear | FakeQuantLinear):
        out = nn.Linear(module.in_features, module.out_features, module.bias is not None)
    else:
        conv = module
        out = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None,
        )  # fmt: skip
    with torch.no_grad():
        weight = qw.dequantized() if qw is not None else module.weight.detach()
        out.weight.copy_(weight.reshape(out.weight.shape))
        if module.bias is not None:
            out.bias.copy_(module.bias.detach())
    return out


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized layer replaced by a float layer holding its
    dequantized weight (activation quantization dropped): the same network in fp32, the speed
    baseline of the benchmark."""
    import copy

    twin = copy.deepcopy(model)
    for name, module in [(n, m) for n, m in twin.named_modules() if is_quantized(m)]:
        twin.set_submodule(name, float_layer(module))
    return twin.eval()


class QuantizedConv2d(nn.Module):
    """A convolution with packed weight codes (see the module docstring).

    Build with ``from_fake_quant`` (or construct with zeros and load a state dict).
    Input ``(B, C_in, H, W)``, output ``(B, C_out, H', W')``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        weight_spec: QuantSpec,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        activation_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.code_bits = 8 if weight_spec.format == "fp8_e4m3" else weight_spec.bits
        self.codes_signed = weight_spec.format == "int" and weight_spec.is_signed
        cols = self.weight_shape[1] * self.kernel_size[0] * self.kernel_size[1]
        g = weight_spec.granularity
        if isinstance(g, PerGroup):
            qshape = (out_channels, cols // g.size, 1)
        elif isinstance(g, PerTensor):
            qshape = (1, 1)
        elif isinstance(g, PerChannel) and g.axis % 2 == 0:
            qshape = (out_channels, 1)
        else:
            raise ValueError(f"unsupported conv weight granularity {g!r}")
        n_bytes = packed_numel(out_channels * cols, self.code_bits)
        self.register_buffer("packed_weight", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(qshape))
        self.register_buffer("weight_zero_point", torch.zeros(qshape))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.act_quant = (
            ActivationQuantizer(activation_spec.replace(learnable=False), in_channels, 1)
            if activation_spec is not None
            else None
        )

    @classmethod
    def from_fake_quant(cls, fake: FakeQuantConv2d) -> QuantizedConv2d:
        """Pack a ``FakeQuantConv2d``; the forward output stays identical."""
        if fake.weight_spec is None:
            raise ValueError("QuantizedConv2d needs a weight spec; this conv has none")
        if fake.padding_mode != "zeros":
            raise ValueError(
                f"QuantizedConv2d supports padding_mode='zeros', got {fake.padding_mode!r}"
            )
        qw = quantized_weight(fake)
        module = cls(
            fake.in_channels, fake.out_channels, fake.kernel_size, fake.weight_spec,
            stride=fake.stride, padding=fake.padding, dilation=fake.dilation, groups=fake.groups,
            bias=fake.bias is not None, activation_spec=fake.activation_spec,
        )  # fmt: skip
        module.load_quantized(qw.codes, qw.scale, qw.zero_point, fake.bias)
        if fake.act_quant is not None:
            module.act_quant = fake.act_quant.frozen()
        return module.to(fake.weight.device)

    @torch.no_grad()
    def load_quantized(self, codes, scale, zero_point, bias=None) -> None:
        """Set the codes ``(C_out, cols)`` (int, or float8 for fp8), qparams and bias."""
        if self.weight_spec.format == "fp8_e4m3":
            codes = codes.to(torch.float8_e4m3fn).view(torch.uint8)
        self.packed_weight.copy_(pack(codes, self.code_bits, signed=self.codes_signed))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_(zero_point.reshape(self.weight_zero_point.shape))
        if bias is not None:
            self.bias.copy_(bias.detach())

    def weight_codes(self) -> torch.Tensor:
        """The ``(C_out, cols)`` codes (int32; float8 for ``fp8_e4m3``)."""
        shape = (self.out_channels, math.prod(self.weight_shape[1:]))
        if self.weight_spec.format == "fp8_e4m3":
            raw = unpack(self.packed_weight, 8, shape, dtype=torch.uint8)
            return raw.view(torch.float8_e4m3fn)
        return unpack(self.packed_weight, self.code_bits, shape, signed=self.codes_signed)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``(C_out, C_in/groups, kh, kw)``."""
        codes = self.weight_codes()
        flat = dequantize(codes, self.weight_scale, self.weight_zero_point, self.weight_spec)
        return flat.reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, computed on access (a tensor, not a parameter): Hugging
        Face vision embeddings read ``patch_embedding.weight.dtype`` to cast the pixels."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        weight = self.dequantized_weight().to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, weight={describe_spec(self.weight_spec)}, "
            f"activation={describe_spec(self.activation_spec)}"
        )
