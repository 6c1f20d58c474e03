"""What to quantize and how: ``QuantSpec`` (one tensor) and ``QuantConfig`` (a whole model).

Granularity is a type, not a string (``PerGroup(64)``), as in torchao. In YAML a granularity is
written ``per_tensor``, ``per_channel`` / ``per_channel(1)``, ``per_group(64)`` or ``per_token``.

Conventions (used by every function in ``distiq.quant``):
- ``PerChannel(axis)``: one scale per index along ``axis`` (weights: axis 0 = output channels).
- ``PerGroup(size)``: contiguous groups of ``size`` elements along the *last* axis, per row
  (weights ``(out, in)``: groups along the input dimension, as GPTQ/AWQ/torchao do).
- ``PerToken()``: one scale per row over the last axis (activations ``(..., D)``).
- integer grid: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``; symmetric specs have
  zero-point 0 (signed) or ``2^(b-1)`` (unsigned), asymmetric specs a computed zero-point.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from distiq.config import from_dict, to_dict
from distiq.util import suggest


class Granularity:
    """Base of the granularity types."""

    @classmethod
    def _from_config(cls, value: object) -> Granularity:
        return parse_granularity(value)

    def _to_config(self) -> str:
        raise NotImplementedError  # each subclass below defines it


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale (and zero-point) for the whole tensor."""

    def _to_config(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per index along ``axis``."""

    axis: int = 0

    def _to_config(self) -> str:
        return f"per_channel({self.axis})"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``size`` consecutive elements of the last axis, per row."""

    size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"PerGroup size must be a positive integer, got {self.size!r}")

    def _to_config(self) -> str:
        return f"per_group({self.size})"


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per row (token) over the last axis; meant for activations."""

    def _to_config(self) -> str:
        return "per_token"


_GRANULARITY_RE = re.compile(
    r"^\s*(per_tensor|per_channel|per_group|per_token)\s*(?:\(\s*(-?\d+)\s*\))?\s*$"
)


def parse_granularity(value: object) -> Granularity:
    """Parse ``"per_group(64)"``, ``"per_channel"``, ``{"per_group": 64}`` or a Granularity."""
    if isinstance(value, Granularity):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((name, arg),) = value.items()
        value = f"{name}({arg})" if arg is not None else str(name)
    if not isinstance(value, str) or not (m := _GRANULARITY_RE.match(value)):
        raise ValueError(
            f"unknown granularity {value!r}; write per_tensor, per_channel(AXIS), "
            "per_group(SIZE) or per_token"
        )
    name, arg = m.group(1), m.group(2)
    if name == "per_tensor":
        return PerTensor()
    if name == "per_token":
        return PerToken()
    if name == "per_channel":
        return PerChannel(int(arg) if arg is not None else 0)
    if arg is None:
        raise ValueError("per_group needs a size, e.g. per_group(64)")
    return PerGroup(int(arg))


Format = Literal["int", "nf4", "fp8_e4m3"]
Observer = Literal["minmax", "percentile", "mse"]
ScaleDtype = Literal["float32", "float16", "bfloat16"]
SCALE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or an activation) is quantized.

    Args:
        bits: code width, 2-8 for ``int``; 4 for ``nf4``; 8 for ``fp8_e4m3``.
        symmetric: zero-point fixed at the grid centre (True) or computed from min/max (False).
        granularity: ``PerTensor()``, ``PerChannel(axis)``, ``PerGroup(size)``, ``PerToken()``
            (or their YAML spelling, ``"per_group(64)"``).
        format: ``int`` (uniform affine grid), ``nf4`` (QLoRA NormalFloat, blockwise absmax) or
            ``fp8_e4m3`` (scaled float8).
        dynamic: activations only; scales computed from each input at run time instead of being
            calibrated once (static).
        observer: how ranges are chosen: ``minmax``; ``percentile`` (clip at ``percentile`` of
            |x|); ``mse`` (grid search over clipping ratios minimising the Lp error, GPTQ's way).
        learnable: scale (LSQ) and, for asymmetric specs, zero-point (LSQ+) are trained.
        signed: integer codes in ``[-2^(b-1), 2^(b-1)-1]`` (True) or ``[0, 2^b-1]`` (False);
            None (default) picks signed for symmetric and unsigned for asymmetric specs, as
            torch's qint8 / quint8 conventions do.
        percentile: the percentile (0-100] of |x| used by the ``percentile`` observer.
        mse_grid, mse_max_shrink, mse_norm: the ``mse`` observer's search: ``mse_grid`` clipping
            ratios from 1 down to ``1 - mse_max_shrink``, error measured as ``|x - q(x)|^mse_norm``.
        scale_dtype: ``int`` only: every scale the fake quantization uses is a value of this
            dtype (observers round their scale to it before computing the zero-point; learned
            scales are rounded in the forward with a straight-through gradient; see
            ``distiq.quant.functional.round_scale``). ``float16`` is what deployment runtimes
            store (GPTQ / AWQ checkpoints, onnxruntime ``MatMulNBits``, llama.cpp), so a packed
            checkpoint with 16-bit scales is exact. ``float32`` (default) changes nothing.
            ``nf4`` (own double quantization of its absmax) and ``fp8_e4m3`` keep float32.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = field(default_factory=lambda: PerChannel(0))
    format: Format = "int"
    dynamic: bool = False
    observer: Observer = "minmax"
    learnable: bool = False
    signed: bool | None = None
    percentile: float = 99.99
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    scale_dtype: ScaleDtype = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.granularity, str | dict):  # QuantSpec(granularity="per_group(64)")
            object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        errors = self._validate()
        if errors:
            raise ValueError("; ".join(errors))

    def _validate(self) -> list[str]:
        errors = []
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            errors.append(f"bits must be an integer, got {self.bits!r}")
        elif self.format == "int" and not 2 <= self.bits <= 8:
            errors.append(f"bits={self.bits} is outside 2-8 supported for format 'int'")
        elif self.format == "nf4" and self.bits != 4:
            errors.append(f"format 'nf4' is 4-bit; set bits=4 (got {self.bits})")
        elif self.format == "fp8_e4m3" and self.bits != 8:
            errors.append(f"format 'fp8_e4m3' is 8-bit; set bits=8 (got {self.bits})")
        if not isinstance(self.granularity, Granularity):
            errors.append(
                f"granularity must be PerTensor/PerChannel/PerGroup/PerToken, got {self.granularity!r}"
            )
        if self.format == "nf4" and not isinstance(self.granularity, PerGroup):
            errors.append("format 'nf4' is blockwise: use granularity=PerGroup(64)")
        if self.format != "int" and self.learnable:
            errors.append(
                f"learnable scales are supported for format 'int' only, not {self.format!r}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            hint = suggest(str(self.scale_dtype), SCALE_DTYPES)
            errors.append(
                f"scale_dtype {self.scale_dtype!r} is not supported{hint}; choose one of "
                f"{', '.join(SCALE_DTYPES)}"
            )
        elif self.format != "int" and self.scale_dtype != "float32":
            errors.append(
                f"scale_dtype {self.scale_dtype!r} applies to format 'int' only; format "
                f"{self.format!r} keeps float32 scales ("
                + (
                    "nf4 compresses its absmax with its own double quantization"
                    if self.format == "nf4"
                    else "fp8 has one float32 scale per channel"
                )
                + "): remove scale_dtype or set it to float32"
            )
        if not 0 < self.percentile <= 100:
            errors.append(f"percentile must be in (0, 100], got {self.percentile}")
        if self.mse_grid < 1 or not 0 <= self.mse_max_shrink < 1:
            errors.append("mse observer needs mse_grid >= 1 and 0 <= mse_max_shrink < 1")
        return errors

    @property
    def is_signed(self) -> bool:
        return self.symmetric if self.signed is None else self.signed

    @property
    def quant_min(self) -> int:
        return -(2 ** (self.bits - 1)) if self.is_signed else 0

    @property
    def quant_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.is_signed else 2**self.bits - 1

    @property
    def group_size(self) -> int | None:
        return self.granularity.size if isinstance(self.granularity, PerGroup) else None

    def replace(self, **changes) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> QuantSpec:
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)


class PatternSelection:
    """Selection by ``include`` / ``exclude`` module-name patterns, for the frozen dataclasses
    that carry them (:class:`QuantConfig`, the model adapters' ``QuantTarget``): a module is
    selected when an include pattern matches it and no exclude pattern does (``quantize_``'s
    rule; a pattern also matches a module's descendants). Each pattern tuple is indexed once per
    instance (the cached properties sit in the instance's ``__dict__``)."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def selects(self, name: str) -> bool:
        """Whether module ``name`` is selected."""
        return bool(self.include_set.matching(name)) and not self.exclude_set.matching(name)

    @functools.cached_property
    def include_set(self) -> PatternSet:
        return PatternSet(self.include)

    @functools.cached_property
    def exclude_set(self) -> PatternSet:
        return PatternSet(self.exclude)


@dataclass(frozen=True)
class QuantConfig(PatternSelection):
    """Which modules of a model to quantize, and how.

    Args:
        weight: spec for weights, or None to leave weights in full precision.
        activation: spec for the input activations of each selected module, or None.
        include: glob patterns over fully qualified module names (``model.layers.*.mlp.*``);
            a module is selected when it matches one of them ...
        exclude: ... and none of these.
        overrides: ``{glob: {"weight": {...} | None, "activation": {...} | None}}``: fields that
            replace those of ``weight`` / ``activation`` for the matching modules (the last
            matching pattern wins); ``None`` leaves that tensor unquantized there.
        token_importance: EdgeQAT's mixed activation precision: tokens are ranked by the
            attention they receive from the first token; the least important half is quantized
            at ``low_bits``, the rest at the activation spec's bits.
        low_bits: the bit width of the less important tokens under ``token_importance``.
    """

    weight: QuantSpec | None = field(default_factory=QuantSpec)
    activation: QuantSpec | None = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: dict[str, dict] = field(default_factory=dict)
    token_importance: bool = False
    low_bits: int = 4

    def _validate(self) -> list[str]:
        errors = []
        if not isinstance(self.low_bits, int) or not 2 <= self.low_bits <= 8:
            errors.append(f"low_bits={self.low_bits!r} is outside 2-8")
        if self.token_importance and self.activation is None:
            errors.append(
                "token_importance mixes activation precisions: set an activation spec "
                "(e.g. activation: {bits: 8, dynamic: true, granularity: per_token})"
            )
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                errors.append(f"{name} must be a list of glob strings, got {patterns!r}")
        for pattern, change in self.overrides.items():
            if not isinstance(change, dict) or set(change) - {"weight", "activation"}:
                errors.append(
                    f"overrides[{pattern!r}] must be a mapping with keys 'weight' and/or 'activation'"
                )
                continue
            for key, fields in change.items():
                if fields is None or isinstance(fields, QuantSpec):
                    continue
                if not isinstance(fields, dict):
                    errors.append(
                        f"overrides[{pattern!r}].{key} must be a mapping of QuantSpec fields or "
                        f"null, got {fields!r}"
                    )
                    continue
                base = getattr(self, key)
                try:
                    from_dict(QuantSpec, {**(to_dict(base) if base else {}), **fields})
                except ValueError as exc:
                    errors.append(f"overrides[{pattern!r}].{key}: {exc}")
        return errors

    def __post_init__(self) -> None:
        errors = self._validate()
        if errors:
            raise ValueError("; ".join(errors))

    @functools.cached_property
    def override_set(self) -> PatternSet:
        return PatternSet(self.overrides)

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)


GLOB_CHARS = frozenset("*?[")


class PatternSet:
    """Module-name patterns (see :func:`name_matches`) indexed once for matching many names:
    patterns without glob characters sit in a table looked up by the name and its ancestors,
    the others are tried in turn. A config that names every layer (a recipe's parts merged
    layer by layer) is then matched in time linear in the number of layers."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        exact: dict[str, list[int]] = {}
        globs = []
        for i, p in enumerate(self.patterns):
            if GLOB_CHARS & set(p):
                globs.append((i, p))
            else:
                exact.setdefault(p, []).append(i)
        self._exact = exact
        self._globs = tuple(globs)

    def matching(self, name: str) -> list[str]:
        """The patterns that match ``name``, in their order (duplicates kept)."""
        parts = name.split(".")
        hits = [
            i for k in range(1, len(parts) + 1) for i in self._exact.get(".".join(parts[:k]), ())
        ]
        hits += [i for i, p in self._globs if name_matches(name, p)]
        return [self.patterns[i] for i in sorted(hits)]

    def __bool__(self) -> bool:
        return bool(self.patterns)


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` matches ``name`` or one of its ancestors (``a.b`` is an ancestor of ``a.b.c``)."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))
