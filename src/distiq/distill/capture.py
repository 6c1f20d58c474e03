"""Capture intermediate outputs of any ``nn.Module`` by forward hooks on modules chosen by name.

Model code never changes (torchdistill's way): :class:`FeatureCapture` registers a forward hook on
every module whose fully qualified name (``model.named_modules()``) matches one of the patterns,
stores the module's output on each forward, and returns ``None`` from the hook, so the model's
outputs are exactly what they are without it. ``remove()`` (or leaving the ``with`` block) removes
every hook.

Patterns are globs over dotted names, matched against the whole name:

- ``*`` matches within one dotted component (``layers.*`` matches ``layers.0`` but not
  ``layers.0.mlp``), ``**`` matches across components (``**.q_proj`` matches every q_proj at
  any depth), ``?`` one character, ``[...]`` a character class.
- Captured features are ordered by the modules' order in ``named_modules()`` (for a stack of
  layers: by depth), whatever the order of the patterns.

:func:`map_layers` pairs student and teacher layers when the depths differ.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from distiq.util import suggest

log = logging.getLogger(__name__)


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(name: str, pattern: str) -> bool:
    """Whether dotted ``name`` matches ``pattern`` (``*`` within a component, ``**`` across)."""
    return _glob_to_regex(pattern).match(name) is not None


def match_modules(model: nn.Module, patterns: Sequence[str] | str) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` whose names match any pattern, in ``named_modules()`` order.

    Raises:
        ValueError: a pattern matches no module; the message lists near-miss names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no module patterns given")
    named = [(n, m) for n, m in model.named_modules() if n]
    compiled = [(p, _glob_to_regex(p)) for p in patterns]
    hits: dict[str, nn.Module] = {}
    unmatched = []
    for pattern, rx in compiled:
        found = [(n, m) for n, m in named if rx.match(n)]
        if not found:
            unmatched.append(pattern)
        hits.update(found)
    if unmatched:
        names = [n for n, _ in named]
        problems = []
        for pattern in unmatched:
            hint = suggest(pattern, names)
            problems.append(f"{pattern!r} matches no module{hint}")
        sample = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise ValueError(
            "; ".join(problems)
            + f". Patterns are dotted-name globs ('*' within one component, '**' across); "
            f"module names include: {sample}"
        )
    return [(n, m) for n, m in named if n in hits]


def _pick_output(output: object, index: int, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        if not -len(output) <= index < len(output):
            raise ValueError(
                f"module {name!r} returned {len(output)} outputs; output_index={index} is out of range"
            )
        picked = output[index]
        if isinstance(picked, Tensor):
            return picked
        raise ValueError(
            f"module {name!r} output {index} is {type(picked).__name__}, not a tensor (for "
            "attention maps, run the model with output_attentions=True and eager attention)"
        )
    raise ValueError(f"module {name!r} returned {type(output).__name__}; cannot capture it")


class FeatureCapture:
    """Forward hooks that record outputs of the modules matching ``patterns``.

    Args:
        model: any ``nn.Module``.
        patterns: dotted-name globs (see the module doc); each must match at least one module.
        output_index: which element to keep when a module returns a tuple / list / mapping
            (``0``: hidden states of a decoder layer; ``1``: attention weights of a Hugging Face
            attention module run with ``output_attentions=True``).
        detach: store ``output.detach()`` (for a frozen teacher).

    Use::

        with FeatureCapture(student, ["model.layers.*"]) as cap:
            student(**inputs)
            hidden = cap.features()   # list of tensors, one per matched module, in depth order

    The stored tensors are the module outputs themselves (no copy), with their autograd graph
    unless ``detach``. A later forward overwrites them; :meth:`paused` suspends recording.
    """

    def __init__(
        self,
        model: nn.Module,
        patterns: Sequence[str] | str,
        *,
        output_index: int = 0,
        detach: bool = False,
    ) -> None:
        self.modules = match_modules(model, patterns)
        self.names = [n for n, _ in self.modules]
        self.output_index = output_index
        self.detach = detach
        self._store: dict[str, Tensor] = {}
        self._active = True
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules]
        log.debug("capturing %d modules: %s", len(self.names), ", ".join(self.names))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not self._active:
                return None
            value = _pick_output(output, self.output_index, name)
            self._store[name] = value.detach() if self.detach else value
            return None

        return hook

    def features(self, *, clear: bool = False) -> list[Tensor]:
        """The latest output of every matched module, in model order.

        Raises:
            RuntimeError: some matched module did not run since the last :meth:`clear`.
        """
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(
                f"no output captured for {', '.join(missing)}: run the model's forward first "
                "(and check those modules run for this input)"
            )
        out = [self._store[n] for n in self.names]
        if clear:
            self.clear()
        return out

    def as_dict(self) -> dict[str, Tensor]:
        """Captured outputs by module name (only those captured so far)."""
        return {n: self._store[n] for n in self.names if n in self._store}

    def clear(self) -> None:
        """Forget the stored outputs (frees their memory and autograd graphs)."""
        self._store.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block, forwards are not recorded (the stored outputs stay)."""
        previous, self._active = self._active, False
        try:
            yield
        finally:
            self._active = previous

    def remove(self) -> None:
        """Remove every hook and forget the stored outputs. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __len__(self) -> int:
        return len(self.names)

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def map_layers(
    num_student: int,
    num_teacher: int,
    mapping: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Pairs ``(student_index, teacher_index)`` of captured layers to compare.

    Args:
        num_student, num_teacher: how many layers each side captures.
        mapping: explicit pairs (negative indices count from the end), or None for the default:
            one to one when the depths agree, otherwise uniform — student layer ``i`` (0-based)
            is paired with teacher layer ``ceil((i + 1) · N_t / N_s) − 1``, i.e. the teacher
            layer at the same relative depth, last with last (TinyBERT / MiniLM's uniform map).

    Raises:
        ValueError: an index is out of range, or a side captures no layer.
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(
            f"need at least one layer on each side, got {num_student} student and "
            f"{num_teacher} teacher layers"
        )
    if mapping is None:
        if num_student == num_teacher:
            return [(i, i) for i in range(num_student)]
        return [(i, -(-(i + 1) * num_teacher // num_student) - 1) for i in range(num_student)]
    pairs = []
    problems = []
    for s, t in mapping:
        if not -num_student <= s < num_student:
            problems.append(f"student index {s} is outside the {num_student} student layers")
        if not -num_teacher <= t < num_teacher:
            problems.append(f"teacher index {t} is outside the {num_teacher} teacher layers")
        pairs.append((s % num_student, t % num_teacher))
    if problems:
        raise ValueError("invalid layer mapping: " + "; ".join(problems))
    if not pairs:
        raise ValueError("the layer mapping is empty")
    return pairs
