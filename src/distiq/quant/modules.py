"""Fake-quantized layers and the switches that act on all of them in a model.

``FakeQuantLinear`` / ``FakeQuantConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d`` and *share* the
float module's ``weight`` and ``bias`` parameters (``from_float`` / ``to_float`` move no data, so
optimizers, tied weights and the objective's full-precision path all see the same tensors). They
fake-quantize the weight (``weight_spec``) and the input activations (``activation_spec``).

Model-wide switches:
- ``fake_quant_disabled(model)``: every fake-quant module computes in full precision (same
  parameters) inside the block; the previous state is restored on exit.
- ``fake_quant_modules(model)``: ``[(name, module)]`` of the fake-quant modules.
- ``calibration(model)``: static activation quantizers observe the inputs (passed through
  unquantized) and freeze their qparams on exit.

Token-importance mixed activation precision (EdgeQAT, Shen et al. 2024): with
``token_importance=True`` a ``FakeQuantLinear`` quantizes the input tokens ``(B, T, D)`` ranked
most important (the upper half, ``ceil(T/2)`` tokens) with ``activation_spec`` and the others with
``activation_spec.replace(bits=low_bits)`` (each with its own quantizer). Importance scores
``(B, T)`` are given with ``set_token_importance`` — usually by a forward hook on the attention
module that feeds the layer: ``attach_token_importance(attention, [linears])`` reads the
attention probabilities ``(B, heads, T, T)`` the module returns (``attn_implementation="eager"``
in Hugging Face models) and scores each token by the attention it pays to the first token,
averaged over heads (``mode="to_first"``, the "column pattern at the initial token" EdgeQAT
observes) or by the attention the first token pays to it (``mode="from_first"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from distiq.quant.fused import (
    ReusableBuffer,
    fake_quant_linear,
    fake_quant_linear_lsq,
    supports_fused,
)
from distiq.quant.lsq import lsq_grad_scale
from distiq.quant.quantizers import (
    ActivationQuantizer,
    WeightQuantizer,
    check_weight_spec,
    describe_spec,
)
from distiq.quant.spec import PerChannel, QuantSpec

log = logging.getLogger(__name__)


class FakeQuantModule:
    """Mixin of the fake-quant layers: ``fake_quant_enabled`` and the two quantizers."""

    fake_quant_enabled: bool
    weight_quant: WeightQuantizer | None
    act_quant: ActivationQuantizer | None

    def _init_quant(self, weight_spec, activation_spec, num_features, feature_axis) -> None:
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        self.fake_quant_enabled = True
        what = type(self).__name__
        w2d = self.weight.detach().reshape(self.weight.shape[0], -1)
        if weight_spec is not None:
            check_weight_spec(weight_spec, w2d.shape[1], what)
            self.weight_quant = WeightQuantizer(weight_spec, w2d)
        else:
            self.weight_quant = None
        self.act_quant = (
            ActivationQuantizer(activation_spec, num_features, feature_axis).to(self.weight.device)
            if activation_spec is not None
            else None
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward uses it (fake-quantized, or the float weight if no spec)."""
        if self.weight_quant is None:
            return self.weight
        w2d = self.weight.reshape(self.weight.shape[0], -1)
        return self.weight_quant(w2d).reshape(self.weight.shape)

    def _quant_repr(self) -> str:
        return (
            f"weight={describe_spec(self.weight_spec)}, "
            f"activation={describe_spec(self.activation_spec)}"
        )


class FakeQuantLinear(nn.Linear, FakeQuantModule):
    """``nn.Linear`` with fake-quantized weight and input activations.

    Input ``(..., in_features)``, output ``(..., out_features)``. Build with ``from_float``.
    With an ``int`` non-learnable float32 weight spec, training uses the fused chunked path of
    ``distiq.quant.fused`` (same values, less time and memory).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        token_importance: bool = False,
        low_bits: int = 4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(weight_spec, activation_spec, in_features, -1)
        self._init_token_importance(token_importance, low_bits)

    _weight_buffer: ReusableBuffer | None = None  # the fused path's Ŵ storage (CPU)

    def _init_token_importance(self, token_importance: bool, low_bits: int) -> None:
        self.token_importance = token_importance
        self.low_bits = low_bits
        self.token_scores: torch.Tensor | None = None
        self.act_quant_low = None
        if not token_importance:
            return
        if self.activation_spec is None:
            raise ValueError(
                "token_importance quantizes activations: give an activation spec "
                "(QuantConfig(activation=QuantSpec(bits=8, ...)))"
            )
        if not 2 <= low_bits <= 8:
            raise ValueError(f"low_bits={low_bits} is outside 2-8")
        low = self.activation_spec.replace(bits=low_bits)
        self.act_quant_low = ActivationQuantizer(low, self.in_features, -1).to(self.weight.device)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        *,
        token_importance: bool = False,
        low_bits: int = 4,
    ) -> FakeQuantLinear:
        """Wrap ``linear`` (its parameters are shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FakeQuantLinear.from_float takes an nn.Linear, got {type(linear)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features = linear.in_features
        module.out_features = linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        module.train(linear.training)
        module._init_quant(weight_spec, activation_spec, linear.in_features, -1)
        module._init_token_importance(token_importance, low_bits)
        return module

    def to_float(self) -> nn.Linear:
        """An ``nn.Linear`` sharing this module's parameters (learned qparams are dropped)."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta"
        )
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear

    # -- token importance -------------------------------------------------------------------
    def set_token_importance(self, scores: torch.Tensor | None) -> None:
        """Importance of each input token, ``(B, T)`` (higher = more important), or None."""
        if scores is not None and scores.ndim != 2:
            raise ValueError(f"token importance scores must be (B, T), got {tuple(scores.shape)}")
        self.token_scores = None if scores is None else scores.detach()

    def _mixed_precision(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant.observing:  # calibration: both quantizers see every token
            self.act_quant_low(x)
            return self.act_quant(x)
        scores = self.token_scores
        if scores is None:
            raise RuntimeError(
                "token_importance is on but no scores were set: call "
                "module.set_token_importance(scores (B, T)) or attach_token_importance("
                "attention_module, [this module]) before the forward"
            )
        if x.ndim != 3 or tuple(scores.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"token importance scores {tuple(scores.shape)} do not match the input tokens "
                f"{tuple(x.shape[:-1])}: expected inputs (B, T, D) and scores (B, T)"
            )
        high = self.act_quant(x)
        low = self.act_quant_low(x)
        tokens = x.shape[1]
        keep = math.ceil(tokens / 2)
        top = scores.topk(keep, dim=1).indices  # (B, keep)
        important = torch.zeros(scores.shape, dtype=torch.bool, device=x.device)
        important.scatter_(1, top.to(x.device), True)
        return torch.where(important[..., None], high, low)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return F.linear(x, self.weight, self.bias)
        if self.act_quant is not None:
            x = self._mixed_precision(x) if self.token_importance else self.act_quant(x)
        if self.weight_quant is None:
            return F.linear(x, self.weight, self.bias)
        if (
            torch.is_grad_enabled()
            and self.weight.requires_grad
            and supports_fused(self.weight, self.weight_spec)
        ):
            if self._weight_buffer is None:
                self._weight_buffer = ReusableBuffer()
            lsq = self.weight_quant.lsq
            if lsq is None:
                return fake_quant_linear(
                    x, self.weight, self.bias, self.weight_spec, self._weight_buffer
                )
            factor = lsq_grad_scale(
                max(1, self.weight.numel() // lsq.scale.numel()), self.weight_spec.quant_max
            )
            return fake_quant_linear_lsq(
                x, self.weight, self.bias, lsq.scale, lsq.zero_point, self.weight_spec, factor,
                self._weight_buffer,
            )  # fmt: skip
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        extra = f", token_importance(low_bits={self.low_bits})" if self.token_importance else ""
        return f"{super().extra_repr()}, {self._quant_repr()}{extra}"


class FakeQuantConv2d(nn.Conv2d, FakeQuantModule):
    """``nn.Conv2d`` with fake-quantized weight and input activations.

    Input ``(B, C_in, H, W)``. The weight ``(C_out, C_in/groups, kh, kw)`` is quantized as its
    2-D view ``(C_out, C_in/groups·kh·kw)``: ``PerChannel(0)`` is per output channel and
    ``PerGroup(size)`` groups that flattened input dimension (GPTQ's unfolded layout).
    Activations: ``PerTensor``, ``PerChannel(1)`` (static or dynamic) or ``PerToken`` (dynamic,
    one scale per pixel over the channels).
    """

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> FakeQuantConv2d:
        """Wrap ``conv`` (its parameters are shared, not copied)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"FakeQuantConv2d.from_float takes an nn.Conv2d, got {type(conv)}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode",
            "_reversed_padding_repeated_twice",
        ):  # fmt: skip
            setattr(module, name, getattr(conv, name))
        module.weight = conv.weight
        module.bias = conv.bias
        module.train(conv.training)
        g = activation_spec.granularity if activation_spec is not None else None
        if isinstance(g, PerChannel) and g.axis != 1:
            raise ValueError(
                "conv activations are (B, C, H, W): use per_channel(1) for per-channel scales"
            )
        module._init_quant(weight_spec, activation_spec, conv.in_channels, 1)
        return module

    def to_float(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` sharing this module's parameters."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta",
        )  # fmt: skip
        conv.weight = self.weight
        conv.bias = self.bias
        conv.train(self.training)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return self._conv_forward(x, self.weight, self.bias)
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quant_repr()}"


# -- model-wide switches -------------------------------------------------------------------------
def fake_quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(fully qualified name, module)]`` of every fake-quant module in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantModule)]


@contextmanager
def fake_quant_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every fake-quant module of ``model`` computes in full precision with the
    same parameters (weights and activations unquantized); the previous state is restored on
    exit, also when the block raises."""
    modules = [m for _, m in fake_quant_modules(model)]
    previous = [m.fake_quant_enabled for m in modules]
    try:
        for m in modules:
            m.fake_quant_enabled = False
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.fake_quant_enabled = state


def _activation_quantizers(model: nn.Module) -> list[tuple[str, ActivationQuantizer]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, ActivationQuantizer) and m.static
    ]


@contextmanager
def calibration(model: nn.Module) -> Iterator[nn.Module]:
    """Calibrate static activation quantizers: inside the block they record the ranges of the
    inputs they see (which pass through unquantized); on exit their qparams are frozen.

    Calibration accumulates over everything seen so far; call ``reset_calibration(model)``
    first to start again. Quantizers that saw no input are listed in a warning and stay
    uncalibrated (their forward raises until calibrated).
    """
    quantizers = _activation_quantizers(model)
    for _, q in quantizers:
        q.observing = True
    try:
        yield model
    finally:
        unseen = []
        for name, q in quantizers:
            q.observing = False
            if not q.freeze():
                unseen.append(name)
        if unseen:
            log.warning(
                "calibration: %d activation quantizer(s) saw no input and stay uncalibrated: %s",
                len(unseen),
                ", ".join(unseen[:10]) + (" ..." if len(unseen) > 10 else ""),
            )


@torch.no_grad()
def reset_calibration(model: nn.Module) -> None:
    """Forget the observed ranges of every static activation quantizer (qparams are kept until
    the next ``calibration`` block freezes new ones)."""
    for _, q in _activation_quantizers(model):
        q.observed_min.fill_(float("inf"))
        q.observed_max.fill_(float("-inf"))
        q.num_batches.zero_()


# -- token importance ----------------------------------------------------------------------------
def token_importance_from_attention(
    attention: torch.Tensor, mode: str = "to_first"
) -> torch.Tensor:
    """Token importance ``(B, T)`` from attention probabilities ``(B, heads, T, T)``
    (query × key), averaged over heads: ``to_first`` — the attention each token pays to the
    first token (``A[:, :, :, 0]``); ``from_first`` — the attention the first token pays to each
    token (``A[:, :, 0, :]``)."""
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(
            f"attention probabilities must be (B, heads, T, T), got {tuple(attention.shape)}"
        )
    if mode == "to_first":
        return attention[:, :, :, 0].float().mean(dim=1)
    if mode == "from_first":
        return attention[:, :, 0, :].float().mean(dim=1)
    raise ValueError(f"unknown token importance mode {mode!r}; use 'to_first' or 'from_first'")


def attach_token_importance(
    attention_module: nn.Module,
    targets: Sequence[FakeQuantLinear],
    mode: str = "to_first",
) -> torch.utils.hooks.RemovableHandle:
    """Feed ``targets`` the token importance computed from ``attention_module``'s output.

    A forward hook reads the attention probabilities ``(B, heads, T, T)``: the second element of
    the module's output tuple (Hugging Face attention modules return ``(output, attn_weights)``;
    load the model with ``attn_implementation="eager"`` so that they are computed). Returns the
    hook handle (``handle.remove()`` detaches it).
    """
    for t in targets:
        if not isinstance(t, FakeQuantLinear) or not t.token_importance:
            raise ValueError(
                "attach_token_importance targets must be FakeQuantLinear modules built with "
                f"token_importance=True, got {type(t).__name__}"
            )

    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple | list) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention probabilities; load the model "
                "with attn_implementation='eager' (and output_attentions where needed)"
            )
        scores = token_importance_from_attention(weights, mode)
        for t in targets:
            t.set_token_importance(scores)

    return attention_module.register_forward_hook(hook)
