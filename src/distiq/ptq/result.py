"""What a post-training quantizer returns, and the checks shared by RTN and GPTQ.

Conventions (shared by ``rtn_quantize`` and ``gptq_quantize``):
- A weight is handled as a matrix ``(out_features, in_features)``; a convolution weight
  ``(out, C, kh, kw)`` is flattened to ``(out, C·kh·kw)``, the column order of ``F.unfold``.
- Supported weight granularities: ``PerTensor()``, ``PerChannel(0)`` (one scale per output row)
  and ``PerGroup(g)`` (groups of ``g`` consecutive input columns per row).
- ``scale`` / ``zero_point`` are float32 and shaped like ``choose_qparams`` of the matrix:
  ``(1, 1)`` per tensor, ``(out, 1)`` per channel, ``(out, in // g, 1)`` per group, so that
  ``distiq.quant.dequantize(codes, scale, zero_point, spec)`` rebuilds ``weight`` — except with
  GPTQ's act-order without static groups, where column ``j`` belongs to group ``g_idx[j]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distiq.quant.functional import group_view
from distiq.quant.spec import PerChannel, PerGroup, PerTensor, QuantSpec


@dataclass
class PTQResult:
    """A quantized weight.

    Attributes:
        weight: the dequantized weight, the input weight's shape and dtype.
        codes: int32 ``(out, in)`` (a convolution's flattened ``(out, C·kh·kw)``), in the
            input weight's column order: integer codes for ``int``, codebook indices for ``nf4``.
        scale: float32 quantization scales, shaped as the module docstring says.
        zero_point: float32 zero-points (integers stored as floats), ``scale``'s shape.
        spec: the weight spec used (granularity as applied to the matrix).
        g_idx: int32 ``(in,)``, the group of each input column; set by GPTQ with ``act_order``
            and per-group specs (``arange(in) // g`` with static groups), else None. For a
            grouped convolution (``quantize_layer``): ``(groups, in)``, one row per group.
        error: ``½ tr(ΔW H ΔWᵀ)`` with ``ΔW = W − Q`` and ``H = 2/n Σ x xᵀ``: the mean over the
            n calibration inputs of ``‖(W − Q) x‖²`` (squared error summed over output
            features). None when no Hessian was given.
        relative_error: ``‖(W − Q) X‖² / ‖W X‖²`` over the calibration inputs; None without H.
        damp: GPTQ's relative damping actually used (raised from the requested value when the
            Hessian was not positive definite); None for RTN.
        seconds: wall time of the quantization (the error computation included).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None = None
    error: float | None = None
    relative_error: float | None = None
    damp: float | None = None
    seconds: float = 0.0

    def column_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point of every weight entry, each ``(out, in)`` float32."""
        out_features, in_features = self.codes.shape
        if isinstance(self.spec.granularity, PerGroup):
            group = self.g_idx.long() if self.g_idx is not None else None
            if group is None:
                group = torch.arange(in_features, device=self.codes.device)
                group = group // self.spec.granularity.size
            return self.scale[:, group, 0], self.zero_point[:, group, 0]
        shape = (out_features, in_features)
        return self.scale.expand(shape), self.zero_point.expand(shape)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``(out, in)``: a Linear weight unchanged, a convolution's ``flatten(1)``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"the weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim < 2:
        raise ValueError(
            f"the weight must be (out_features, in_features) or a convolution weight "
            f"(out, C, kh, kw), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"the weight must be a float tensor, got {weight.dtype}")
    return weight.flatten(1) if weight.ndim > 2 else weight


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``x`` holds NaN or Inf."""
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{what} has {int(bad.sum())} NaN/Inf value(s) of {x.numel()}; quantization needs "
            "finite values: fix the model or calibration data that produced them"
        )


def matrix_spec(spec: QuantSpec, matrix: torch.Tensor) -> QuantSpec:
    """Check that ``spec`` can quantize the weight ``matrix (out, in)`` and return it with the
    granularity normalised (``PerChannel(-2)`` → ``PerChannel(0)``)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a distiq.quant.QuantSpec, got {type(spec).__name__}")
    if spec.format not in ("int", "nf4"):
        raise ValueError(
            f"post-training weight quantization supports formats 'int' and 'nf4', not "
            f"{spec.format!r}; fp8 weights need no calibration: use distiq.quant.fake_quantize"
        )
    if spec.dynamic:
        raise ValueError("dynamic=True is for activations; weight specs must be static")
    g = spec.granularity
    if isinstance(g, PerChannel):
        if g.axis not in (0, -matrix.ndim):
            raise ValueError(
                f"weights are quantized per output channel: use PerChannel(0), not "
                f"PerChannel({g.axis}) (for groups along the input use PerGroup(size))"
            )
        return spec.replace(granularity=PerChannel(0))
    if isinstance(g, PerGroup):
        group_view(matrix, spec)  # raises a clear error when the size does not divide `in`
        return spec
    if isinstance(g, PerTensor):
        return spec
    raise ValueError(
        f"granularity {g!r} is not supported for weights; use PerTensor(), PerChannel(0) or "
        "PerGroup(size)"
    )


def check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    """Raise when ``hessian`` is not a finite ``(in, in)`` float matrix with a non-negative
    diagonal."""
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"the Hessian must be a torch.Tensor, got {type(hessian).__name__}")
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"the Hessian must be (in_features, in_features) = ({in_features}, {in_features}) "
            f"for this weight, got {tuple(hessian.shape)}; build it from the layer's inputs "
            "(for a convolution, from its unfolded inputs: C·kh·kw features)"
        )
    if not hessian.is_floating_point():
        raise TypeError(f"the Hessian must be a float tensor, got {hessian.dtype}")
    check_finite(hessian, "the Hessian")
    if (hessian.diagonal() < 0).any():
        raise ValueError(
            "the Hessian has negative diagonal entries, so it is not 2/n Σ x xᵀ of any inputs; "
            "check how it was accumulated"
        )


def _quadratic(a: torch.Tensor, h: torch.Tensor, chunk: int) -> float:
    """``tr(A H Aᵀ)`` for ``A (out, in)``, in row chunks, summed in float64."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for r in range(0, a.shape[0], chunk):
        rows = a[r : r + chunk].to(h.dtype)
        total += ((rows @ h) * rows).sum(dtype=torch.float64)
    return float(total)


def output_energy(weight: torch.Tensor, hessian: torch.Tensor, chunk: int = 1024) -> float:
    """``½ tr(W H Wᵀ)``: the mean over calibration inputs of ``‖W x‖²``."""
    w = weight_matrix(weight)
    h = hessian.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    return 0.5 * _quadratic(w, h, chunk)


def reconstruction_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, chunk: int = 1024
) -> tuple[float, float]:
    """``(½ tr(ΔW H ΔWᵀ), tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` with ``ΔW = W − Q``.

    Args:
        weight: the original weight ``W``, ``(out, in)`` (or a convolution weight).
        quantized: its quantized value ``Q``, same shape.
        hessian: ``H = 2/n Σ x xᵀ``, ``(in, in)``.
        chunk: output rows per matmul (bounds the temporary memory to ``chunk × in``).

    Returns:
        The mean over calibration inputs of ``‖(W − Q) x‖²`` and the relative error
        ``‖(W − Q) X‖² / ‖W X‖²`` (0 when ``W X`` is 0). Sums are accumulated in float64.
    """
    w = weight_matrix(weight)
    h = hessian.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    delta = w.to(h.dtype) - weight_matrix(quantized).to(h.dtype)
    error = 0.5 * _quadratic(delta, h, chunk)
    energy = output_energy(w, h, chunk)
    return error, error / energy if energy > 0 else 0.0
