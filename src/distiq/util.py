"""Small helpers shared by every layer (imports nothing from distiq)."""

from __future__ import annotations

import difflib


def suggest(name: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidates, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def option_hint(name: str, value: object = True) -> str:
    """How to pass option ``name`` on the command line and in Python alike:
    ``option_hint("resume")`` is ``"--resume (resume=True in Python)"``. Messages that tell a
    user to rerun with an option use it, so both kinds of user know what to type."""
    return f"--{name.replace('_', '-')} ({name}={value!r} in Python)"
