"""``quantize_(model, QuantConfig, step="prepare" | "convert")``: swap modules in place.

Selection by fully qualified module names (``model.layers.0.mlp.down_proj``) with ``fnmatch``
globs. A pattern matches a module when it matches the module's name *or the name of one of its
ancestors*, so ``"model.vision_tower"`` selects (or excludes) that whole subtree and ``"*"`` every
module. A module is selected when an ``include`` pattern matches it and no ``exclude`` pattern
does; ``overrides`` (``{glob: {"weight": {...} | None, "activation": {...} | None}}``, applied in
order, the last match wins per tensor) change the specs field by field, or drop one with None.

``prepare`` swaps ``nn.Linear`` → ``FakeQuantLinear`` and ``nn.Conv2d`` → ``FakeQuantConv2d``
(the first matching dispatcher wins, as in peft). ``convert`` swaps the selected
``FakeQuantLinear`` → ``QuantizedLinear`` using the specs each module was prepared with.

Mistakes fail loudly (``ValueError``): a pattern that matches no module (the message lists
near-miss names), an include pattern that selects only unsupported module types, or an exact
module name of an unsupported type (the message lists the supported types).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from distiq.config import ConfigError, from_dict, to_dict
from distiq.quant.modules import FakeQuantConv2d, FakeQuantLinear, FakeQuantModule
from distiq.quant.quantized import QuantizedLinear
from distiq.quant.quantizers import describe_spec
from distiq.quant.spec import GLOB_CHARS, QuantConfig, QuantSpec, name_matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleChange:
    """One swapped module."""

    name: str
    old_type: str
    new_type: str
    weight: str
    activation: str


@dataclass
class QuantizeReport:
    """What ``quantize_`` changed: ``changes`` (one ``ModuleChange`` per swapped module) and
    ``skipped`` (``(name, reason)`` for selected modules left alone)."""

    step: str
    changes: list[ModuleChange] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.changes]

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[ModuleChange]:
        return iter(self.changes)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "changes": [dataclasses.asdict(c) for c in self.changes],
            "skipped": [list(s) for s in self.skipped],
        }

    def __str__(self) -> str:
        lines = [f"quantize_ {self.step}: {len(self.changes)} module(s) changed"]
        width = max((len(c.name) for c in self.changes), default=0)
        for c in self.changes:
            lines.append(
                f"  {c.name:<{width}}  {c.old_type} -> {c.new_type}  "
                f"weight: {c.weight}; activation: {c.activation}"
            )
        for name, reason in self.skipped:
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


def _near_misses(pattern: str, names: list[str]) -> str:
    stem = pattern.replace("*", "").replace("?", "").strip(".")
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    if stem:
        close += [n for n in names if stem.split(".")[-1] in n and n not in close][:5]
    if not close:
        close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.0)
    return ", ".join(repr(c) for c in close[:8])


def pattern_errors(config: QuantConfig, names: list[str]) -> list[str]:
    """One error per include / exclude / override pattern of ``config`` that matches none of
    the module ``names``, with near misses."""
    errors = _check_patterns("include", config.include, names)
    errors += _check_patterns("exclude", config.exclude, names)
    return errors + _check_patterns("override", config.overrides, names)


def _check_patterns(kind: str, patterns, names: list[str]) -> list[str]:
    errors = []
    known = set(names)
    for pattern in patterns:
        if pattern in known:
            continue
        if not any(name_matches(n, pattern) for n in names):
            errors.append(
                f"{kind} pattern {pattern!r} matches no module; near misses: "
                f"{_near_misses(pattern, names) or '(none)'}; names are fully qualified, "
                "e.g. 'model.layers.*.mlp.*'"
            )
    return errors


_Dispatcher = tuple[type, type, Callable]


def _prepare_linear(module, weight, activation, config):
    return FakeQuantLinear.from_float(
        module,
        weight,
        activation,
        token_importance=config.token_importance and activation is not None,
        low_bits=config.low_bits,
    )


def _prepare_conv(module, weight, activation, config):
    if config.token_importance:
        log.info("token_importance does not apply to conv layers; ignored there")
    return FakeQuantConv2d.from_float(module, weight, activation)


def _convert_linear(module, weight, activation, config, int_matmul=False):
    return QuantizedLinear.from_fake_quant(module, int_matmul=None if int_matmul else False)


_UNSUPPORTED = (
    nn.modules.linear.NonDynamicallyQuantizableLinear,
)  # used by F.multi_head_attention


def _dispatch(step: str, module: nn.Module):
    """(handler, new type name) for ``module`` at ``step``, or (None, reason)."""
    if isinstance(module, _UNSUPPORTED):
        return None, (
            f"{type(module).__name__} is read directly by nn.MultiheadAttention (its weight "
            "never goes through forward); swapping it would have no effect"
        )
    if step == "prepare":
        if isinstance(module, FakeQuantModule):
            return None, "already prepared"
        if isinstance(module, nn.Conv2d):
            return _prepare_conv, "FakeQuantConv2d"
        if isinstance(module, nn.Linear):
            return _prepare_linear, "FakeQuantLinear"
        return None, None
    if isinstance(module, FakeQuantLinear):
        return _convert_linear, "QuantizedLinear"
    if isinstance(module, FakeQuantConv2d):
        return None, "FakeQuantConv2d has no packed form yet; it stays fake-quantized"
    return None, None


SUPPORTED = {
    "prepare": "nn.Linear (-> FakeQuantLinear), nn.Conv2d (-> FakeQuantConv2d)",
    "convert": "FakeQuantLinear (-> QuantizedLinear)",
}


def resolve_specs(name: str, config: QuantConfig) -> tuple[QuantSpec | None, QuantSpec | None]:
    """The (weight, activation) specs of module ``name`` after ``config.overrides``."""
    specs = {"weight": config.weight, "activation": config.activation}
    for pattern in config.override_set.matching(name):
        change = config.overrides[pattern]
        for key, fields in change.items():
            if fields is None:
                specs[key] = None
                continue
            if isinstance(fields, QuantSpec):
                specs[key] = fields
                continue
            base = to_dict(specs[key]) if specs[key] is not None else {}
            try:
                specs[key] = from_dict(
                    QuantSpec, {**base, **fields}, where=f"overrides[{pattern!r}].{key}"
                )
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
    return specs["weight"], specs["activation"]


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    step: Literal["prepare", "convert"] = "prepare",
    *,
    int_matmul: bool = False,
) -> QuantizeReport:
    """Swap the selected modules of ``model`` in place (see the module docstring).

    Args:
        model: any ``nn.Module``.
        config: which modules and which specs; at ``convert`` only the selection is used (each
            module keeps the specs it was prepared with).
        step: ``prepare`` (float → fake-quant) or ``convert`` (fake-quant → ``QuantizedLinear``).
        int_matmul: at ``convert``, use the W8A8 integer matmul where the specs allow it (equal
            to the fake-quant output up to float rounding); default False keeps the output
            identical.

    Returns:
        A ``QuantizeReport`` (also logged at INFO) listing every module changed.
    """
    if step not in ("prepare", "convert"):
        raise ValueError(f"step must be 'prepare' or 'convert', got {step!r}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_ takes a QuantConfig, got {type(config).__name__}")
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    errors = pattern_errors(config, names)
    if errors:
        raise ValueError("quantize_: " + "\n  ".join(errors))

    report = QuantizeReport(step)
    selected_by: dict[str, list[str]] = {p: [] for p in config.include}
    unsupported_by: dict[str, list[str]] = {}
    plan = []
    for name, module in named:
        hits = config.include_set.matching(name)
        if not hits or config.exclude_set.matching(name):
            continue
        handler, info = _dispatch(step, module)
        for p in hits:
            if handler is not None:
                selected_by[p].append(name)
            elif len(unsupported_by.setdefault(p, [])) < 3:
                unsupported_by[p].append(f"{name!r} is {type(module).__name__}")
        if handler is None:
            explicit = [p for p in hits if not (GLOB_CHARS & set(p)) and p == name]
            if explicit and not any(
                _dispatch(step, child)[0] is not None for child in module.modules()
            ):
                raise ValueError(
                    f"quantize_ {step}: module {name!r} ({type(module).__name__}) was named "
                    f"explicitly in include but is not supported"
                    f"{f' ({info})' if info else ''}; supported: {SUPPORTED[step]}"
                )
            if info is not None:
                report.skipped.append((name, info))
            continue
        plan.append((name, module, handler, info))

    empty = [p for p, hits in selected_by.items() if not hits]
    if empty:
        seen = "; ".join(
            f"{p!r} matched {', '.join(unsupported_by[p])}" for p in empty if p in unsupported_by
        )
        raise ValueError(
            f"quantize_ {step}: include pattern(s) {', '.join(map(repr, empty))} select no "
            f"supported module (after exclude){f' ({seen})' if seen else ''}; supported: "
            f"{SUPPORTED[step]}"
        )

    for name, module, handler, new_type in plan:
        if step == "prepare":
            weight, activation = resolve_specs(name, config)
            if weight is None and activation is None:
                report.skipped.append((name, "weight and activation specs are both None"))
                continue
        else:
            weight, activation = module.weight_spec, module.activation_spec
        if step == "convert":
            new = handler(module, weight, activation, config, int_matmul=int_matmul)
        else:
            new = handler(module, weight, activation, config)
        model.set_submodule(name, new)
        report.changes.append(
            ModuleChange(
                name,
                type(module).__name__,
                new_type,
                describe_spec(weight),
                describe_spec(activation),
            )
        )
    log.info("%s", report)
    return report
