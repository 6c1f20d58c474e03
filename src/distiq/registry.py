"""A small, explicit registry keyed by name, whose lookup misses say "did you mean ..."."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distiq.util import suggest

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes, functions). Registration is explicit, by decorator or call.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("kl")
    ... def kl(): ...
    >>> LOSSES.get("kl") is kl
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            raise KeyError(
                f"unknown {self.kind} {name!r}{suggest(name, known)}; known: {', '.join(known)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
