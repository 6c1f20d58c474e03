"""Finding a model's sequential blocks and capturing their inputs with forward hooks.

A *stage* is a run of blocks fed one after the other: the children of an ``nn.ModuleList`` of
transformer blocks (a vision tower's layers, a language model's layers), or a single module (a
layer outside every block, such as a projector's Linear or the ``lm_head``). The stages of a
model are ordered by when the model first calls them.

A list counts as a chain when, on the first calibration batch, each child is called once, in
order, and receives the previous child's output as its hidden-state input; a list that is not a
chain (e.g. parallel heads) becomes one stage per child.

Capturing a stage runs the model on each batch with forward pre-hooks on the stage's blocks; the
hooks record the first block's inputs (positional and keyword: attention masks, position
embeddings, ...) and raise a stop exception, so the model runs no further (as the GPTQ
reference's ``Catcher`` does); the later blocks are called with those same other inputs. Where
the first batch showed that the blocks get *different* other inputs (e.g. sliding-window and
global attention masks alternating over layers, or a per-layer keyword), the capture runs on to
the last block and records each block's own.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised from a forward hook to end a calibration forward early."""


# Where a block's hidden-state input sits: ("arg", index) or ("kw", name).
Slot = tuple[str, Any]


def hidden_slot(args: tuple, kwargs: dict) -> Slot | None:
    """The hidden-state input of a block call: the first positional tensor argument, else the
    ``hidden_states`` keyword, else the first tensor keyword argument."""
    if args and isinstance(args[0], torch.Tensor):
        return ("arg", 0)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kw", "hidden_states")
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return ("kw", key)
    return None


def get_slot(args: tuple, kwargs: dict, slot: Slot) -> Any:
    return args[slot[1]] if slot[0] == "arg" else kwargs[slot[1]]


def with_slot(args: tuple, kwargs: dict, slot: Slot, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the hidden-state input replaced by ``value``."""
    if slot[0] == "arg":
        args = (*args[: slot[1]], value, *args[slot[1] + 1 :])
    else:
        kwargs = {**kwargs, slot[1]: value}
    return args, kwargs


def main_output(output: Any) -> torch.Tensor | None:
    """The hidden-state output of a block: the tensor itself, the first element of a tuple, the
    first field of a ``ModelOutput`` / dict; None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    elif isinstance(output, dict):
        output = tuple(output.values())
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor (in dicts, lists, tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


@dataclass
class Stage:
    """Blocks run one after the other. ``names[k]`` is the fully qualified name of ``blocks[k]``;
    ``order`` is when the model first called the stage (None: never, on the first batch)."""

    names: list[str]
    blocks: list[nn.Module]
    order: int | None = None
    layers: list[list[str]] = field(default_factory=list)  # selected layer names per block
    uniform: bool = False  # every block gets the first block's other inputs (masks, ...)


def _block_lists(
    model: nn.Module, layer_names: Sequence[str], patterns: Sequence[str] | None
) -> list[tuple[str, nn.Module]]:
    """Outermost containers whose children are blocks: every ``nn.ModuleList`` (or the modules
    named by ``patterns``) holding at least one selected layer."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if patterns is None:
            if not isinstance(module, nn.ModuleList):
                continue
        elif not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            continue
        prefix = f"{name}." if name else ""
        if len(list(module.children())) and any(n.startswith(prefix) for n in layer_names):
            found.append((name, module))
    return found


def _child_name(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _other_inputs(args: tuple, kwargs: dict, slot: Slot) -> list:
    """A call's inputs other than the hidden state, in a fixed order."""
    args, kwargs = with_slot(args, kwargs, slot, None)
    return [*args, *sorted(kwargs.items(), key=lambda item: item[0])]


def _same_objects(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) == 2:
            if x[0] != y[0] or x[1] is not y[1]:  # (keyword, value)
                return False
        elif x is not y:
            return False
    return True


class _ChainProbe:
    """Hooks on the children of one list that check, during a forward, that each child is
    called once, in order, with the previous child's output as its hidden-state input, and
    whether every child gets the very same other inputs as the first (``uniform``)."""

    def __init__(self, children: list[nn.Module], note) -> None:
        self.calls = [0] * len(children)
        self.ok = True
        self.uniform = True
        self.first_inputs: list | None = None  # kept alive, so identity comparisons are sound
        self.expected = 0
        self.last_output: torch.Tensor | None = None
        self.handles = []
        self.note = note
        for k, child in enumerate(children):
            hook = functools.partial(self._pre, k)
            self.handles.append(child.register_forward_pre_hook(hook, with_kwargs=True))
            self.handles.append(child.register_forward_hook(self._post))

    def _pre(self, k: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.note(module)
        self.calls[k] += 1
        slot = hidden_slot(args, kwargs)
        ok = self.expected == k and slot is not None
        if ok and k == 0:
            self.first_inputs = _other_inputs(args, kwargs, slot)
        if ok and k > 0:
            prev, now = self.last_output, get_slot(args, kwargs, slot)
            ok = prev is not None and (
                prev is now or (prev.shape == now.shape and bool(torch.equal(prev, now)))
            )
            self.uniform &= ok and _same_objects(
                self.first_inputs, _other_inputs(args, kwargs, slot)
            )
        self.ok &= ok
        self.expected = k + 1
        self.last_output = None

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.last_output = main_output(output)

    @property
    def chained(self) -> bool:
        return self.ok and all(c == 1 for c in self.calls)


def plan_stages(
    model: nn.Module,
    layer_names: Sequence[str],
    first_batch: Any,
    block_patterns: Sequence[str] | None = None,
) -> list[Stage]:
    """Group the selected layers into stages and order them by one forward of ``first_batch``.

    Args:
        model: the model.
        layer_names: fully qualified names of the layers to quantize.
        first_batch: one calibration batch (as ``call_model`` takes it).
        block_patterns: globs naming the containers whose children are the blocks; None finds
            every outermost ``nn.ModuleList`` that holds a selected layer.

    Returns:
        The stages holding selected layers: those called on ``first_batch`` in call order, then
        those never called (``order`` None).
    """
    modules = dict(model.named_modules())
    lists = _block_lists(model, layer_names, block_patterns)
    first_call: dict[int, int] = {}

    def note(module: nn.Module, *_: Any) -> None:
        first_call.setdefault(id(module), len(first_call))

    probes = []
    children_of = []
    for list_name, container in lists:
        children = [(_child_name(list_name, n), c) for n, c in container.named_children()]
        children_of.append(children)
        probes.append(_ChainProbe([c for _, c in children], note))
    prefixes = [f"{n}." if n else "" for n, _ in lists]
    standalone = [n for n in layer_names if not any(n.startswith(p) for p in prefixes)]
    handles = [modules[n].register_forward_pre_hook(note) for n in standalone]
    try:
        call_model(model, first_batch)
    finally:
        for h in handles + [h for p in probes for h in p.handles]:
            h.remove()

    stages: list[Stage] = []
    for children, probe in zip(children_of, probes):
        if probe.chained:
            names, blocks = [n for n, _ in children], [c for _, c in children]
            stages.append(Stage(names, blocks, uniform=probe.uniform))
        else:
            stages.extend(Stage([n], [c]) for n, c in children)
    stages.extend(Stage([n], [modules[n]]) for n in standalone)
    for stage in stages:
        stage.layers = [
            [n for n in layer_names if n == block or n.startswith(f"{block}.")]
            for block in stage.names
        ]
        stage.order = first_call.get(id(stage.blocks[0]))
    stages = [s for s in stages if any(s.layers)]
    return sorted(stages, key=lambda s: (s.order is None, s.order or 0))


@dataclass
class Captured:
    """One batch's inputs to a stage: ``hidden`` (the first block's hidden-state input) and, per
    block, its call's ``(args, kwargs, slot)`` with the hidden-state input removed."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict, Slot]]


def capture_stage(model: nn.Module, stage: Stage, batch: Any) -> Captured | None:
    """Run ``model`` on ``batch`` up to the stage's first block (``uniform`` stages: the later
    blocks replay the first block's other inputs) or last block (the others) and return the
    stage's inputs; None when the batch never reaches the stage's first block."""
    n = 1 if stage.uniform else len(stage.blocks)
    calls: list[tuple[tuple, dict, Slot] | None] = [None] * n
    hidden: list[torch.Tensor | None] = [None]

    def pre(module, args, kwargs, k):
        if calls[k] is None:
            slot = hidden_slot(args, kwargs)
            if slot is None:
                raise TypeError(
                    f"block {stage.names[k]!r} was called without a tensor input; quantize_model "
                    "needs a hidden-state tensor as its first argument or 'hidden_states' keyword"
                )
            if k == 0:
                hidden[0] = get_slot(args, kwargs, slot)
            args, kwargs = with_slot(args, kwargs, slot, None)  # do not keep the activation
            calls[k] = (args, kwargs, slot)
        if k == n - 1:
            raise _Stop

    handles = [
        block.register_forward_pre_hook(functools.partial(pre, k=k), with_kwargs=True)
        for k, block in enumerate(stage.blocks[:n])
    ]
    try:
        call_model(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if hidden[0] is None:
        return None
    first = calls[0]
    filled = [
        calls[k] if k < n and calls[k] is not None else first for k in range(len(stage.blocks))
    ]
    return Captured(hidden[0], filled)  # type: ignore[arg-type]


def run_block(block: nn.Module, call: tuple[tuple, dict, Slot], hidden: torch.Tensor) -> Any:
    """Call ``block`` with its captured inputs and ``hidden`` as the hidden-state input."""
    args, kwargs, slot = call
    args, kwargs = with_slot(args, kwargs, slot, hidden)
    return block(*args, **kwargs)
