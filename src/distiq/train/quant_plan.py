"""What a recipe quantizes, said once: ``targets`` (part names or module globs) with one weight /
activation spec (a named ``scheme`` and/or fields), ``overrides`` per part or glob, and
``ignore`` globs — resolved on a model into one spec pair per layer (:class:`QuantPlan`), in the
spirit of compressed-tensors' ``config_groups`` (``targets`` / ``ignore``) and torchao's
module-name-to-config mapping.

Recipe section::

    quantization:
      scheme: W4A8                # optional: distiq.quant.schemes (W4A16, W8A8, NF4, Q4_0, ...)
      weight: {learnable: true}   # QuantSpec fields, on top of the scheme's (or a whole spec)
      activation: null            # null: float activations (replaces the scheme's)
      targets: [vision, projector, language_model]   # parts or module globs; default: the
                                  # family's vision tower, projector and language model
      overrides:                  # first matching key wins: part name or module glob
        language_model: {weight: {bits: 8}}
        "*.mlp.down_proj": {activation: null}
      ignore: ["*.lm_head"]       # module globs kept in floating point
      budget: null                # {size_mb: 0.6, bits: [2, 4, 8]}: each part's weight width
                                  # chosen to fit the size (distiq.train.mixed_precision)

Parts are the model adapter's: ``vision``, ``projector``, ``language_model``, ``lm_head``,
``patch_embedding`` (and ``heads`` for the built-in VLM's task heads); for dense vision models
(``distiq.models.DenseAdapter``) ``backbone``, ``neck``, ``head`` and ``patch_embedding`` (the
stem), by default every part but the stem. A layer belongs to the
first target that selects it. Blockwise weight specs (``per_group(g)``, NF4's blocks of 64)
skip layers whose input width is not a multiple of the block; every skipped layer is recorded
with its reason, and a target that keeps no layer at all is an error that lists them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from distiq.config import ConfigError, from_dict, to_dict
from distiq.quant import QuantConfig, QuantSpec
from distiq.quant.schemes import scheme_fields
from distiq.train.mixed_precision import SizeBudget
from distiq.util import suggest

logger = logging.getLogger(__name__)

PART_NAMES = (
    "vision",
    "projector",
    "language_model",
    "lm_head",
    "patch_embedding",
    "heads",
    "backbone",
    "neck",
    "head",
)
DEFAULT_TARGETS = ("vision", "projector", "language_model")
NF4_BLOCK = 64


def _merge(base: dict | None, change: Any, where: str) -> dict | None:
    """``change`` (fields, or None) applied to the ``base`` fields of a spec."""
    if change is None:
        return None
    if isinstance(change, QuantSpec):
        return to_dict(change)
    if not isinstance(change, dict):
        raise ConfigError(f"{where} must be a mapping of QuantSpec fields or null, got {change!r}")
    return {**(base or {}), **change}


@dataclass(frozen=True)
class QuantizationConfig:
    """A recipe's ``quantization`` section (see the module docstring)."""

    scheme: str | None = None
    weight: QuantSpec | None = field(default_factory=QuantSpec)
    activation: QuantSpec | None = None
    targets: tuple[str, ...] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    budget: SizeBudget | None = None

    @classmethod
    def _from_config(cls, value: object) -> QuantizationConfig:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping (scheme, weight, targets, ...), got {value!r}")
        data = dict(value)
        scheme = data.get("scheme")
        if scheme is not None:
            if not isinstance(scheme, str):
                raise ValueError(f"scheme must be a name, got {scheme!r}")
            base = scheme_fields(scheme)
            for kind in ("weight", "activation"):
                data[kind] = _merge(base[kind], data[kind], kind) if kind in data else base[kind]
        return from_dict(cls, data, where="quantization")

    def _to_config(self) -> dict:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def _validate(self) -> list[str]:
        errors = []
        if self.targets is not None and not self.targets:
            errors.append("targets is empty: name at least one part or module glob")
        for key in [*(self.targets or ()), *self.overrides]:
            if key not in PART_NAMES and not any(c in key for c in ".*?["):
                errors.append(
                    f"{key!r} is neither a part ({', '.join(PART_NAMES)}) nor a module glob "
                    f"(module names hold dots: 'model.language_model.*'){suggest(key, PART_NAMES)}"
                )
        for key, change in self.overrides.items():
            if not isinstance(change, dict) or set(change) - {"weight", "activation"}:
                errors.append(
                    f"overrides.{key} must be a mapping with keys weight and/or activation"
                )
                continue
            for kind in change:
                try:
                    self.override_spec(key, kind)
                except (ValueError, ConfigError) as exc:
                    errors.append(f"overrides.{key}.{kind}: {exc}")
        if self.weight is None and self.activation is None and not self.overrides:
            errors.append("neither weight nor activation is quantized")
        if self.budget is not None:
            if self.weight is None or self.weight.format != "int":
                errors.append("budget chooses integer weight widths: give an int weight spec")
            if self.targets is not None or self.overrides:
                errors.append(
                    "budget chooses each part's width itself: leave targets and overrides out "
                    "(budget.parts names the parts)"
                )
        return errors

    def override_spec(self, key: str, kind: str) -> QuantSpec | None:
        """The ``kind`` (weight / activation) spec of the layers matched by override ``key``."""
        base = getattr(self, kind)
        fields = _merge(
            to_dict(base) if base is not None else None, self.overrides[key][kind], kind
        )
        return None if fields is None else from_dict(QuantSpec, fields, where=f"overrides.{key}")

    def _first(self, kind: str) -> QuantSpec | None:
        spec = getattr(self, kind)
        if spec is not None:
            return spec
        for key, change in self.overrides.items():
            if kind in change and change[kind] is not None:
                return self.override_spec(key, kind)
        return None

    @property
    def w_bits(self) -> int:
        """Weight bits (for result records; 16 when weights stay in floating point)."""
        spec = self._first("weight")
        return spec.bits if spec is not None else 16

    @property
    def a_bits(self) -> int:
        spec = self._first("activation")
        return spec.bits if spec is not None else 16

    @property
    def group_size(self) -> int | None:
        spec = self._first("weight")
        return spec.group_size if spec is not None else None


@dataclass
class QuantPlan:
    """Per layer, what quantizes it: ``layers`` ``{module name: (weight spec | None,
    activation spec | None)}`` in module order, ``skipped`` ``{module name: reason}``, each
    layer's ``owner`` (the target that selected it), and ``notes`` for the run's record (a
    size budget's allocation)."""

    layers: dict[str, tuple[QuantSpec | None, QuantSpec | None]]
    skipped: dict[str, str]
    owner: dict[str, str]
    notes: dict[str, Any] = field(default_factory=dict)

    def config(self, *, weights: bool = True, activations: bool = True) -> QuantConfig:
        """One ``QuantConfig`` naming every planned layer with its own specs (weights and/or
        activations kept)."""
        overrides = {}
        for name, (weight, activation) in self.layers.items():
            change = {
                "weight": to_dict(weight) if weights and weight is not None else None,
                "activation": to_dict(activation)
                if activations and activation is not None
                else None,
            }
            if change["weight"] is not None or change["activation"] is not None:
                overrides[name] = change
        return QuantConfig(
            weight=None, activation=None, include=tuple(overrides), overrides=overrides
        )

    def summary(self) -> dict[str, Any]:
        """What ``quantization.json`` records about the plan: skipped layers and why."""
        return {"skipped": dict(self.skipped)}


def _part_targets(model: nn.Module, adapter: Any) -> dict[str, Any]:
    """``{part: QuantTarget}`` of ``model`` (prefixed ones, plus ``heads``, for ``VLMWithHeads``)."""
    if hasattr(model, "base_adapter") and hasattr(model, "quant_targets"):
        return model.quant_targets()
    return adapter.quant_targets()


def _selector(key: str, parts: dict[str, Any]) -> Any:
    """A predicate over module names for a part name or a module glob."""
    if key in parts:
        return parts[key].selects
    return lambda name: (
        fnmatch.fnmatchcase(name, key)
        or any(fnmatch.fnmatchcase(name[:i], key) for i in range(len(name)) if name[i] == ".")
    )


def _block(spec: QuantSpec | None) -> int | None:
    if spec is None:
        return None
    if spec.format == "nf4":
        return spec.group_size or NF4_BLOCK
    return spec.group_size


def _width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight[0].numel()


def plan_quantization(model: nn.Module, adapter: Any, config: QuantizationConfig) -> QuantPlan:
    """Resolve ``config`` on ``model`` (see the module docstring).

    Raises:
        ValueError: a target names a part this family cannot quantize or matches no layer, or
            keeps no layer (each skipped layer and its reason listed).
    """
    parts = _part_targets(model, adapter)
    names = config.targets
    if names is None:
        defaults = getattr(adapter, "default_targets", DEFAULT_TARGETS)
        names = tuple(p for p in defaults if p in parts and p not in adapter.unquantizable)
    selectors = {}
    for key in names:
        if key in PART_NAMES and (key not in parts or not parts[key].include):
            reason = adapter.unquantizable.get(key) or "this model has none"
            raise ValueError(
                f"quantization target {key!r} has no quantizable layer: {reason}; drop it from "
                f"quantization.targets (parts here: {', '.join(p for p in parts if parts[p].include)})"
            )
        selectors[key] = _selector(key, parts)
    ignore = [_selector(g, {}) for g in config.ignore]
    overrides = [(key, _selector(key, parts)) for key in config.overrides]
    layers: dict[str, tuple[QuantSpec | None, QuantSpec | None]] = {}
    skipped: dict[str, str] = {}
    owner: dict[str, str] = {}
    selected: dict[str, list[str]] = {key: [] for key in names}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        target = next((key for key, sel in selectors.items() if sel(name)), None)
        if target is None:
            continue
        selected[target].append(name)
        if any(sel(name) for sel in ignore):
            skipped[name] = "ignored (quantization.ignore)"
            continue
        weight, activation = config.weight, config.activation
        match = next((key for key, sel in overrides if sel(name)), None)
        if match is not None:
            change = config.overrides[match]
            if "weight" in change:
                weight = config.override_spec(match, "weight")
            if "activation" in change:
                activation = config.override_spec(match, "activation")
        block = _block(weight)
        if block is not None and _width(module) % block:
            skipped[name] = f"input width {_width(module)} is not a multiple of the block {block}"
            continue
        if weight is None and activation is None:
            skipped[name] = f"override {match!r} leaves it in floating point"
            continue
        layers[name] = (weight, activation)
        owner[name] = target
    for key, found in selected.items():
        if not found:
            raise ValueError(
                f"quantization target {key!r} matches no nn.Linear / nn.Conv2d layer of this model"
            )
        if not any(name in layers for name in found):
            reasons = "; ".join(f"{n}: {skipped[n]}" for n in found[:8])
            more = f" (and {len(found) - 8} more)" if len(found) > 8 else ""
            raise ValueError(
                f"quantization target {key!r} keeps no layer quantized: {reasons}{more}; "
                "choose a group size that divides the layers' input widths, or another target"
            )
    narrow = {n: r for n, r in skipped.items() if r.startswith("input width")}
    if narrow:
        logger.warning(
            "%d selected layers stay in floating point: %s",
            len(narrow),
            ", ".join(f"{n} ({r})" for n, r in list(narrow.items())[:5]),
        )
    return QuantPlan(layers, skipped, owner)
