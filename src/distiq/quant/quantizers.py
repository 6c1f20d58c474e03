"""Quantizer modules: the state that turns a ``QuantSpec`` into fake quantization of one tensor.

``WeightQuantizer`` — a weight's qparams come from the current weight at every call (the weight
moves during training), or are learned (LSQ / LSQ+) when ``spec.learnable``.

``ActivationQuantizer`` — input activations ``(..., features)`` (linear) or ``(B, C, H, W)``
(conv, with ``feature_axis=1``):
- dynamic: qparams from each input (``PerTensor``, ``PerToken``, ``PerGroup`` over features,
  ``PerChannel`` over features);
- static (calibrated: observe then freeze): ``PerTensor`` or ``PerChannel`` over features. Under
  ``distiq.quant.calibration(model)`` it records ranges and passes inputs through unquantized; on
  exit the qparams are frozen into the ``scale`` / ``zero_point`` buffers. ``minmax`` keeps the
  running min and max (so the frozen qparams equal ``choose_qparams`` on all calibration data
  concatenated); ``percentile`` / ``mse`` average the per-batch clipping ranges they choose;
- learnable (static, ``spec.learnable``): LSQ / LSQ+ parameters, initialised from calibration if
  it ran, else from the first batch seen.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from distiq.quant.functional import (
    QParams,
    _qparams_from_range,
    choose_qparams,
    fake_quantize,
)
from distiq.quant.lsq import LsqQuantizer, effective_scale, lsq_fake_quantize
from distiq.quant.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

log = logging.getLogger(__name__)


class WeightQuantizer(nn.Module):
    """Fake quantization of a weight viewed as 2-D ``(out, in·k·k)``.

    Args:
        spec: the weight spec (``PerChannel(0)``, ``PerGroup(size)`` over the flattened input
            dimension, ``PerTensor``; ``int``, ``nf4`` or ``fp8_e4m3``).
        weight: the 2-D weight view, used to check the spec and initialise learnable qparams.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"WeightQuantizer takes a 2-D weight view, got {tuple(weight.shape)}")
        self.spec = spec
        self.lsq = LsqQuantizer(spec, weight.detach().float()) if spec.learnable else None
        if isinstance(spec.granularity, PerGroup):
            choose_qparams(weight[:1].detach(), spec, check_finite=False)  # group size check

    def qparams(self, weight: torch.Tensor) -> QParams:
        """The qparams the forward uses for ``weight`` (2-D), detached."""
        if self.lsq is not None:
            return self.lsq.qparams()
        return choose_qparams(weight, self.spec)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (2-D) fake-quantized, same shape and dtype, straight-through gradient."""
        if self.lsq is not None:
            return self.lsq(weight)
        scale, zero = choose_qparams(weight, self.spec)
        return fake_quantize(weight, scale, zero, self.spec)

    def extra_repr(self) -> str:
        return describe_spec(self.spec)


def describe_spec(spec: QuantSpec | None) -> str:
    """Short human description: ``int4 sym per_group(64) minmax``."""
    if spec is None:
        return "none"
    kind = f"{spec.format}{spec.bits}" if spec.format == "int" else spec.format
    parts = [kind]
    if spec.format == "int":
        parts.append("sym" if spec.symmetric else "asym")
    parts.append(spec.granularity._to_config())
    if spec.dynamic:
        parts.append("dynamic")
    if spec.learnable:
        parts.append("lsq+" if not spec.symmetric else "lsq")
    parts.append(spec.observer)
    return " ".join(parts)


class ActivationQuantizer(nn.Module):
    """Fake quantization of input activations (see the module docstring).

    Args:
        spec: the activation spec.
        num_features: size of the feature axis (``in_features`` / ``in_channels``).
        feature_axis: the feature axis of the inputs: ``-1`` for linear, ``1`` for conv.
    """

    def __init__(self, spec: QuantSpec, num_features: int, feature_axis: int = -1) -> None:
        super().__init__()
        self.spec = spec
        self.num_features = num_features
        self.feature_axis = feature_axis
        g = spec.granularity
        if spec.format != "int" and not spec.dynamic:
            raise ValueError(
                f"activation format {spec.format!r} needs dynamic=True (static activation "
                "quantization is implemented for format 'int')"
            )
        if spec.dynamic and spec.learnable:
            raise ValueError(
                "learnable activation scales are static: set dynamic=False (calibrate, then "
                "learn) or learnable=False"
            )
        if not spec.dynamic and isinstance(g, PerToken | PerGroup):
            raise ValueError(
                f"{g._to_config()} activation quantization computes scales from each input: "
                "set dynamic=True, or use per_tensor / per_channel for static scales"
            )
        if isinstance(g, PerChannel) and g.axis != feature_axis:
            raise ValueError(
                f"per_channel({g.axis}) activation quantization must be along the feature axis "
                f"({feature_axis}); use per_channel({feature_axis})"
            )
        if isinstance(g, PerGroup) and num_features % g.size:
            raise ValueError(
                f"activation group size {g.size} does not divide the {num_features} input "
                "features; choose a divisor of the input width"
            )
        channels = num_features if isinstance(g, PerChannel) else 1
        self.static = not spec.dynamic
        if self.static:
            # Calibration state and frozen qparams, all (C,) with C = features or 1.
            self.register_buffer("observed_min", torch.full((channels,), float("inf")))
            self.register_buffer("observed_max", torch.full((channels,), float("-inf")))
            self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
            self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
            if spec.learnable:
                self.scale = nn.Parameter(torch.ones(channels))
                if spec.symmetric:
                    self.register_buffer("zero_point", torch.zeros(channels))
                else:
                    self.zero_point = nn.Parameter(torch.zeros(channels))
            else:
                self.register_buffer("scale", torch.ones(channels))
                self.register_buffer("zero_point", torch.zeros(channels))
        self.observing = False

    # -- shapes -----------------------------------------------------------------------------
    def _axis(self, x: torch.Tensor) -> int:
        return self.feature_axis % x.ndim

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(C or 1, -1)`` rows matching the static buffers."""
        if self.scale.numel() == 1:
            return x.detach().float().reshape(1, -1)
        axis = self._axis(x)
        return x.detach().float().movedim(axis, 0).reshape(x.shape[axis], -1)

    def _broadcast(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        if value.numel() > 1:
            shape[self._axis(x)] = value.numel()
        return value.reshape(shape)

    def _per_example(self, x: torch.Tensor) -> int:
        """LSQ's N for activations: features per example per scale."""
        return max(1, x[0].numel() // max(1, self.scale.numel())) if x.ndim > 1 else x.numel()

    # -- calibration ------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record the range of one calibration batch."""
        if not self.static:
            return
        rows = self._rows(x)
        if rows.shape[0] != self.observed_min.numel():
            raise ValueError(
                f"activation with {rows.shape[0]} features on the quantized axis; this "
                f"quantizer was built for {self.observed_min.numel()}"
            )
        spec = self.spec.replace(granularity=PerChannel(0), learnable=False)
        if self.spec.observer == "minmax":
            low, high = torch.aminmax(rows, dim=1)
            self.observed_min.copy_(torch.minimum(self.observed_min, low))
            self.observed_max.copy_(torch.maximum(self.observed_max, high))
        else:  # running mean of the clipping range the observer chooses per batch
            scale, zero = choose_qparams(rows, spec)
            low = (spec.quant_min - zero[:, 0]) * scale[:, 0]
            high = (spec.quant_max - zero[:, 0]) * scale[:, 0]
            n = int(self.num_batches)
            if n == 0:
                self.observed_min.copy_(low)
                self.observed_max.copy_(high)
            else:
                self.observed_min.mul_(n / (n + 1)).add_(low / (n + 1))
                self.observed_max.mul_(n / (n + 1)).add_(high / (n + 1))
        self.num_batches += 1

    @torch.no_grad()
    def freeze(self) -> bool:
        """Turn the observed ranges into frozen qparams; False when nothing was observed."""
        if not self.static or int(self.num_batches) == 0:
            return False
        spec = self.spec.replace(granularity=PerChannel(0), learnable=False)
        scale, zero = _qparams_from_range(self.observed_min, self.observed_max, spec)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)
        self.calibrated.fill_(True)
        return True

    @torch.no_grad()
    def _init_learnable(self, x: torch.Tensor) -> None:
        self.observe(x)
        self.freeze()
        log.info("initialised learnable activation scale from the first batch (no calibration)")

    # -- forward ------------------------------------------------------------------------------
    def qparams(self, x: torch.Tensor | None = None) -> QParams:
        """Qparams shaped for ``x`` (static: the frozen / learned ones; dynamic: from ``x``)."""
        if not self.static:
            if x is None:
                raise ValueError("dynamic activation qparams need the input x")
            return choose_qparams(self._dynamic_view(x), self.spec)
        scale = effective_scale(self.scale.detach(), self.spec)  # floored, scale_dtype values
        zero = torch.round(self.zero_point.detach())
        if x is None:
            return QParams(scale, zero)
        return QParams(self._broadcast(scale, x), self._broadcast(zero, x))

    def _dynamic_view(self, x: torch.Tensor) -> torch.Tensor:
        """Features last, so that per_token / per_group / per_channel(-1) see them."""
        axis = self._axis(x)
        return x if axis == x.ndim - 1 else x.movedim(axis, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized (shape and dtype of ``x``), or unchanged while observing."""
        if self.observing:
            self.observe(x)
            return x
        spec = self.spec
        if not self.static:
            view = self._dynamic_view(x)
            scale, zero = choose_qparams(view, spec)
            out = fake_quantize(view, scale, zero, spec)
            axis = self._axis(x)
            return out if axis == x.ndim - 1 else out.movedim(-1, axis)
        if not bool(self.calibrated):
            if spec.learnable:
                self._init_learnable(x)
            else:
                raise RuntimeError(
                    "static activation quantizer is not calibrated: run calibration batches "
                    "under `with distiq.quant.calibration(model): model(batch)` first, or use "
                    "a dynamic activation spec (dynamic=True)"
                )
        if spec.learnable:
            return lsq_fake_quantize(
                x,
                self._broadcast(self.scale, x),
                self._broadcast(self.zero_point, x),
                spec,
                num_elements=self._per_example(x),
            )
        scale, zero = self.qparams(x)
        return fake_quantize(x, scale, zero, spec)

    def frozen(self) -> ActivationQuantizer:
        """A static, non-learnable copy with the current qparams (for ``QuantizedLinear``)."""
        spec = self.spec.replace(learnable=False)
        copy = ActivationQuantizer(spec, self.num_features, self.feature_axis)
        if self.static:
            with torch.no_grad():
                scale, zero = self.qparams()
                copy.scale.copy_(scale)
                copy.zero_point.copy_(zero)
                copy.observed_min.copy_(self.observed_min)
                copy.observed_max.copy_(self.observed_max)
                copy.num_batches.copy_(self.num_batches)
                copy.calibrated.copy_(self.calibrated)
        return copy.to(self.observed_min.device) if self.static else copy

    def extra_repr(self) -> str:
        return describe_spec(self.spec)


def check_weight_spec(spec: QuantSpec, in_features: int, what: str) -> None:
    """Raise a clear error when ``spec`` cannot quantize a weight with ``in_features`` columns."""
    g = spec.granularity
    if isinstance(g, PerGroup) and in_features % g.size:
        divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
        near = min(divisors, key=lambda d: abs(d - g.size))
        raise ValueError(
            f"{what}: group size {g.size} does not divide the input width {in_features}; "
            f"choose a group size that divides it (e.g. {near}) or exclude this module"
        )
    if isinstance(g, PerChannel) and g.axis not in (0, 1, -1, -2):
        raise ValueError(f"{what}: per_channel({g.axis}) is out of range for a 2-D weight view")
    if not isinstance(g, PerTensor | PerChannel | PerGroup | PerToken):
        raise ValueError(f"{what}: unsupported granularity {g!r}")
