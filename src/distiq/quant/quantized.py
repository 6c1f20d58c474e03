"""``QuantizedLinear``: a linear layer holding packed low-bit weight codes.

Buffers (so ``state_dict`` and safetensors carry them): ``packed_weight`` (uint8, ``pack``'s
layout of the ``(out, in)`` codes), ``weight_scale`` and ``weight_zero_point`` (float32, the
``QParams`` shapes of ``distiq.quant.functional``: ``(out, 1)`` per channel, ``(out, in/g, 1)``
per group, ``(1, 1)`` per tensor; with act-order ``g_idx`` the per-group ``(out, n_groups, 1)``),
optionally ``g_idx`` (int64 ``(in,)``: the group of each input column, GPTQ act-order), and the
activation quantizer's frozen ``scale`` / ``zero_point``. ``bias`` is a parameter as in
``nn.Linear``.

Two forwards:
- **dequantize-then-matmul** (default): ``Ŵ = (codes − z)·s`` then ``F.linear(x̂, Ŵ, b)`` with the
  same float32 arithmetic as the fake-quant module it came from, so the output is *identical*
  (``atol=0, rtol=0``) to ``FakeQuantLinear``'s.
- **W8A8 integer matmul** (``int_matmul=True``; int8 symmetric per-channel/per-tensor weights and
  int8 activations, per tensor or per token): activation codes and weight codes are multiplied by
  ``torch._int_mm`` (int8 × int8 → int32, exact), an asymmetric activation zero-point is folded in
  with the weight row sums, and ``y = acc · (s_x · s_w) + b``. Equal to the fake-quant output up to
  float rounding: the fake path's float32 dot products round each product and sum. Bound used in
  the tests: ``|y_int − y_fake| ≤ (k + 4) · 2⁻²⁴ · (|x̂| @ |Ŵ|ᵀ) + 2⁻²⁴·|b|`` for ``k`` inputs.
  Measured (64 tokens, random weights, per-token and static per-tensor activations):
  ``max |y_int − y_fake| / (|x̂|@|Ŵ|ᵀ)`` = 9e-8 at k=512 (bound 3.1e-5) and 3e-8 at k=4096
  (bound 2.4e-4); the median error relative to ``|y|`` is 2.6e-7.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from distiq.quant.functional import dequantize, quantize
from distiq.quant.packing import pack, packed_numel, unpack
from distiq.quant.quantizers import ActivationQuantizer, describe_spec
from distiq.quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

log = logging.getLogger(__name__)


def pad_for_int_mm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad int8 ``a (M, K)`` and ``b (K, N)`` to the shapes CUDA's ``torch._int_mm`` takes
    (``M > 16``; ``K`` and ``N`` multiples of 8). Zeros add nothing to the sums, so
    ``_int_mm(*pad_for_int_mm(a, b))[:M, :N] == a @ b``."""
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(17 - m, 0), (-k) % 8, (-n) % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return a.contiguous(), b


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 ``a (M, K)`` and ``b (K, N)``, exact, int32 ``(M, N)``.

    Uses ``torch._int_mm``: on CPU it takes any shape (checked on torch 2.13); on CUDA the
    operands are padded by ``pad_for_int_mm`` and the result cropped. Falls back to an int32
    matmul where ``_int_mm`` is missing.
    """
    m, n = a.shape[0], b.shape[1]
    if not hasattr(torch, "_int_mm"):
        return a.to(torch.int32) @ b.to(torch.int32)
    if a.is_cuda:
        return torch._int_mm(*pad_for_int_mm(a, b))[:m, :n]
    return torch._int_mm(a.contiguous(), b)


def _weight_qparam_shape(spec: QuantSpec, out_features: int, in_features: int, groups: int | None):
    g = spec.granularity
    if groups is not None:
        return (out_features, groups, 1)
    if isinstance(g, PerGroup):
        return (out_features, in_features // g.size, 1)
    if isinstance(g, PerTensor):
        return (1, 1)
    if isinstance(g, PerChannel) and g.axis % 2 == 1:
        return (1, in_features)
    return (out_features, 1)


def int_matmul_supported(weight_spec: QuantSpec, activation_spec: QuantSpec | None) -> bool:
    """Whether the W8A8 integer matmul applies: int8 symmetric signed weights per channel (axis
    0) or per tensor, and int8 activations per tensor or per token (static or dynamic)."""
    w, a = weight_spec, activation_spec
    return (
        a is not None
        and w.format == "int" and w.bits == 8 and w.symmetric and w.is_signed
        and (isinstance(w.granularity, PerTensor)
             or (isinstance(w.granularity, PerChannel) and w.granularity.axis % 2 == 0))
        and a.format == "int" and a.bits == 8
        and isinstance(a.granularity, PerTensor | PerToken)
    )  # fmt: skip


def _code_bits(spec: QuantSpec) -> int:
    return 8 if spec.format == "fp8_e4m3" else spec.bits


class QuantizedLinear(nn.Module):
    """Linear layer with packed weight codes (see the module docstring).

    Args:
        in_features, out_features: as ``nn.Linear``.
        weight_spec: the weight spec (``int`` 2-8 bits, ``nf4`` or ``fp8_e4m3``).
        bias: whether there is a bias.
        activation_spec: input activation spec, or None for float inputs.
        num_groups: with act-order ``g_idx``, the number of groups (``weight_scale`` is then
            ``(out, num_groups, 1)`` and a ``g_idx (in,)`` buffer exists).
        int_matmul: use the W8A8 integer matmul (only for eligible specs, see
            ``int_matmul_supported``).

    Build it with ``from_fake_quant`` or ``from_quantized``; construct directly (zeros) only to
    load a ``state_dict``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_spec: QuantSpec,
        *,
        bias: bool = True,
        activation_spec: QuantSpec | None = None,
        num_groups: int | None = None,
        int_matmul: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        self.code_bits = _code_bits(weight_spec)
        self.codes_signed = weight_spec.format == "int" and weight_spec.is_signed
        n_bytes = packed_numel(out_features * in_features, self.code_bits)
        self.register_buffer(
            "packed_weight", torch.zeros(n_bytes, dtype=torch.uint8, device=device)
        )
        shape = _weight_qparam_shape(weight_spec, out_features, in_features, num_groups)
        self.register_buffer("weight_scale", torch.ones(shape, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(shape, device=device))
        if num_groups is not None:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.long, device=device))
        else:
            self.g_idx = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.act_quant = (
            ActivationQuantizer(activation_spec.replace(learnable=False), in_features, -1).to(
                device
            )
            if activation_spec is not None
            else None
        )
        if int_matmul and not self.int_matmul_supported():
            raise ValueError(
                "int_matmul needs int8 symmetric signed per-channel/per-tensor weights and int8 "
                f"per-tensor/per-token activations; got weight {describe_spec(weight_spec)}, "
                f"activation {describe_spec(activation_spec)}"
            )
        self.int_matmul = int_matmul

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        weight_codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        spec: QuantSpec,
        bias: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
        *,
        activation: ActivationQuantizer | None = None,
        int_matmul: bool = False,
    ) -> QuantizedLinear:
        """Build from codes and qparams (e.g. ``distiq.ptq``'s RTN / GPTQ results).

        Args:
            weight_codes: ``(out, in)`` integer codes in ``[spec.quant_min, spec.quant_max]``
                (``nf4``: indices 0-15; ``fp8_e4m3``: float8 values).
            scale, zero_point: ``QParams`` of the ``(out, in)`` weight; with ``g_idx``,
                ``(out, n_groups, 1)`` or ``(out, n_groups)`` per group.
            spec: the weight spec.
            bias: ``(out,)`` or None.
            g_idx: ``(in,)`` group index of each input column (GPTQ act-order), or None.
            activation: an activation quantizer (its frozen copy is used), or None.
            int_matmul: use the W8A8 integer matmul.
        """
        if weight_codes.ndim != 2:
            raise ValueError(f"weight_codes must be (out, in), got {tuple(weight_codes.shape)}")
        out_features, in_features = weight_codes.shape
        device = weight_codes.device
        num_groups = None
        if g_idx is not None:
            g_idx = g_idx.reshape(-1).long()
            if g_idx.numel() != in_features:
                raise ValueError(f"g_idx has {g_idx.numel()} entries for {in_features} inputs")
            num_groups = scale.shape[1]
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
                raise ValueError(f"g_idx values must lie in [0, {num_groups}) (groups in scale)")
            scale = scale.reshape(out_features, num_groups, 1)
            zero_point = zero_point.reshape(out_features, num_groups, 1)
        module = cls(
            in_features,
            out_features,
            spec,
            bias=bias is not None,
            activation_spec=activation.spec if activation is not None else None,
            num_groups=num_groups,
            int_matmul=int_matmul,
            device=device,
        )
        if tuple(scale.shape) != tuple(module.weight_scale.shape):
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}; a {describe_spec(spec)} weight of shape "
                f"({out_features}, {in_features}) needs {tuple(module.weight_scale.shape)}"
            )
        if spec.format == "fp8_e4m3":
            codes = weight_codes.to(torch.float8_e4m3fn).view(torch.uint8)
        else:
            codes = weight_codes
        with torch.no_grad():
            module.packed_weight.copy_(pack(codes, module.code_bits, signed=module.codes_signed))
            module.weight_scale.copy_(scale)
            module.weight_zero_point.copy_(zero_point)
            if g_idx is not None:
                module.g_idx.copy_(g_idx)
            if bias is not None:
                module.bias.copy_(bias.detach())
        if activation is not None:
            module.act_quant = activation.frozen()
        return module

    @classmethod
    def from_fake_quant(
        cls, fake: nn.Module, *, int_matmul: bool | None = False
    ) -> QuantizedLinear:
        """Convert a ``FakeQuantLinear``. With ``int_matmul=False`` (default) the forward output
        stays identical; True forces the W8A8 integer matmul (error if the specs do not allow
        it); None uses it where the specs allow it."""
        if fake.weight_spec is None:
            raise ValueError("QuantizedLinear needs a weight spec; this module has none")
        if getattr(fake, "token_importance", False):
            raise ValueError(
                "token-importance mixed precision has no packed form: convert without it"
            )
        with torch.no_grad():
            weight = fake.weight.detach()
            scale, zero = fake.weight_quant.qparams(weight)
            codes = quantize(weight, scale, zero, fake.weight_spec)
        use_int = (
            int_matmul_supported(fake.weight_spec, fake.activation_spec)
            if int_matmul is None
            else int_matmul
        )
        bias = fake.bias.detach() if fake.bias is not None else None
        return cls.from_quantized(
            codes,
            scale,
            zero,
            fake.weight_spec,
            bias,
            activation=fake.act_quant,
            int_matmul=use_int,
        )

    def int_matmul_supported(self) -> bool:
        """Whether the W8A8 integer matmul applies to this layer's specs."""
        return self.g_idx is None and int_matmul_supported(self.weight_spec, self.activation_spec)

    # -- weights ------------------------------------------------------------------------------
    def weight_codes(self) -> torch.Tensor:
        """The ``(out, in)`` codes (int32; float8 for ``fp8_e4m3``)."""
        shape = (self.out_features, self.in_features)
        if self.weight_spec.format == "fp8_e4m3":
            raw = unpack(self.packed_weight, 8, shape, dtype=torch.uint8)
            return raw.view(torch.float8_e4m3fn)
        return unpack(self.packed_weight, self.code_bits, shape, signed=self.codes_signed)

    def dequantized_weight(self) -> torch.Tensor:
        """``(out, in)`` float32 weight ``(codes − z)·s`` (with ``g_idx``: the group of each
        column)."""
        codes = self.weight_codes()
        if self.g_idx is not None:
            scale = self.weight_scale[:, self.g_idx, 0]  # (out, in)
            zero = self.weight_zero_point[:, self.g_idx, 0]
            return (codes.to(torch.float32) - zero) * scale
        return dequantize(codes, self.weight_scale, self.weight_zero_point, self.weight_spec)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        if self.int_matmul:
            return self._forward_int8(x)
        if self.act_quant is not None:
            x = self.act_quant(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.act_quant.spec
        x2d = x.reshape(-1, self.in_features)
        scale_x, zero_x = self.act_quant.qparams(x2d)  # (1, 1) or (M, 1)
        codes_x = quantize(x2d, scale_x, zero_x, spec)  # int32 in the 8-bit grid
        offset = 128 if not spec.is_signed else 0
        a = (codes_x - offset).to(torch.int8)
        w = self.weight_codes().to(torch.int8)  # (out, in)
        acc = int8_matmul(a, w.t())  # (M, out) int32, exact
        shift = (offset - zero_x).round().to(torch.int32)  # (M or 1, 1)
        if bool((shift != 0).any()):
            acc = acc + shift * w.to(torch.int32).sum(dim=1)[None, :]
        w_scale = self.weight_scale.reshape(1, -1)  # (1, out) or (1, 1)
        y = acc.to(torch.float32) * (scale_x * w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        extra = ", g_idx" if self.g_idx is not None else ""
        path = "int8 matmul" if self.int_matmul else "dequantize+matmul"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight={describe_spec(self.weight_spec)}, "
            f"activation={describe_spec(self.activation_spec)}{extra}, {path}"
        )
