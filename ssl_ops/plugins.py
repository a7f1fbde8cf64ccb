"""The one decorator-registry pattern behind methods, pretexts, backbones and dataset sources."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def registrar(table: dict[str, Any], kind: str, set_name: bool = False) -> Callable[[str], Callable[[T], T]]:
    """``register = registrar(TABLE, "method")`` makes ``@register("name")``, which adds the decorated object
    to ``TABLE`` (a second registration of a name is a bug: ValueError) and, with ``set_name``, sets its
    ``name`` attribute."""

    def register(name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered (by {table[name]!r})")
            if set_name:
                obj.name = name  # type: ignore[attr-defined]
            table[name] = obj
            return obj

        return deco

    return register
