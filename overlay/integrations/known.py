"""Objects an integration remembers by identity without keeping them alive.

A framework's apps and routers are found once and looked at again at each push; they may not be
hashable (Starlette's and aiohttp's define ``__eq__``), and the integration must not be what keeps
an app that the program dropped alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["Known"]


class Known:
    """A set of live objects, by identity, holding weak references only."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[Any]] = {}

    def add(self, obj: Any) -> None:
        key = id(obj)
        if key not in self._refs:
            self._refs[key] = weakref.ref(obj, lambda _: self._refs.pop(key, None))

    def __iter__(self) -> Iterator[Any]:
        return iter([obj for ref in list(self._refs.values()) if (obj := ref()) is not None])
