"""Make an old function behave like its new version while keeping its identity.

Every reference to a function (``from m import f`` elsewhere, a route table, a bound method,
a decorator's ``__wrapped__``) points at the same object, so patching that object in place
updates them all at once. The patch swaps ``__code__`` and the attributes a ``def``
statement computes (defaults, annotations, docstring, ``__dict__``). It refuses when the
free variables differ: a function's closure cells are fixed when it is made, and running
code with another closure layout would read the wrong cells.

Objects are paired by module, qualified name and kind, never by the attribute name they are
reachable under: ``g = f`` must not make ``g``'s new code land in ``f``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FunctionType, MethodType
from typing import Any

from overlay.rebinding.closures import Pairs, Report, pair_nested
from overlay.rebinding.journal import MISSING, Journal

__all__ = ["Context", "find_inner", "conform_function", "clear_caches", "owned_functions",
           "same_value", "own_attr"]

_SIMPLE = (int, float, complex, str, bytes, bool, type(None), type(Ellipsis))


@dataclass
class Context:
    """What a conform step needs: where to record undos, what to report, where to queue."""

    journal: Journal
    namespace: dict[str, Any]  # the module's __dict__
    report: Report
    version: int | None = None
    required: Pairs = field(default_factory=dict)  # nested code of changed defs: heap pass
    optional: Pairs = field(default_factory=dict)  # nested code that only moved
    #: (throwaway, live) classes or functions whose statement ran again and may have registered the
    #: throwaway somewhere (see ``registrations``)
    registered: list[tuple[Any, Any]] = field(default_factory=list)

    def kept_old(self) -> str:
        """The end of a 'replaced' reason: who keeps the old object."""
        when = f"version {self.version}" if self.version is not None else "this push"
        return f"instances created before {when} keep the old class"


def same_value(a: Any, b: Any, depth: int = 0) -> bool:
    """True when ``a`` and ``b`` are the same object or equal plain data.

    Never calls a user's ``__eq__``: comparing arbitrary objects could run code, raise, or
    answer something that is not a bool (an array).
    """
    if a is b:
        return True
    if type(a) is not type(b) or depth > 4:
        return False
    if isinstance(a, _SIMPLE):
        return bool(a == b)
    if type(a) in (tuple, frozenset, list):
        return len(a) == len(b) and all(same_value(x, y, depth + 1) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_value(a[k], b[k], depth + 1) for k in a)
    return False


def freevar_reason(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    """Why a function whose free variables changed cannot be patched in place."""
    reason = f"free variables changed from {old} to {new}"
    if "__class__" in new and "__class__" not in old:
        reason += (" (the new version uses zero-argument super() or __class__, which needs the "
                   "hidden __class__ cell the old function does not have)")
    elif "__class__" in old and "__class__" not in new:
        reason += " (the old version used zero-argument super() through the hidden __class__ cell)"
    return reason + (": a function's closure cannot be reshaped in place, so references taken "
                     "before the push keep the old code")


def conform_function(old: FunctionType, new: FunctionType, ctx: Context, *,
                     same_defaults: bool = False, code_only: bool = False) -> str | None:
    """Patch ``old`` to run like ``new``; return a refusal reason instead if that is unsound.

    ``same_defaults``: the default expressions did not change, so the old default objects
    (which may hold state, like a ``cache={}`` default) are kept. ``code_only``: the
    definition did not change, only where it sits; swap the code for its line numbers.
    """
    oc, nc = old.__code__, new.__code__
    if oc.co_freevars != nc.co_freevars:
        return freevar_reason(oc.co_freevars, nc.co_freevars)
    journal = ctx.journal
    if oc is not nc and not (oc == nc and oc.co_filename == nc.co_filename):
        journal.setattr(old, "__code__", nc)
        if code_only:
            pair_nested(oc, nc, ctx.optional, ctx.optional)
        else:
            pair_nested(oc, nc, ctx.required, ctx.optional)
    if code_only:
        return None
    attrs = ("__annotations__", "__doc__") if same_defaults else (
        "__defaults__", "__kwdefaults__", "__annotations__", "__doc__")
    for attr in attrs:
        value = getattr(new, attr)
        if not same_value(getattr(old, attr), value):
            journal.setattr(old, attr, value)
    # Merge rather than replace __dict__: attributes set on the old function at run time
    # (counters, registrations) survive; what the new definition sets wins.
    old_dict = old.__dict__
    for key, value in new.__dict__.items():
        if key == "__wrapped__":
            continue  # a wrapper chain is paired link by link, never re-pointed
        if not same_value(old_dict.get(key, MISSING), value):
            journal.setattr(old, key, value)
    return None


def own_attr(obj: Any, name: str) -> Any:
    """``obj.__dict__[name]`` without triggering ``__getattr__`` hooks, or None."""
    try:
        own = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    return own.get(name) if type(own) is dict else None


def _inside(obj: Any) -> Iterator[Any]:
    """Objects a decorator result typically wraps: where the undecorated function hides."""
    if type(obj) is FunctionType:
        wrapped = obj.__dict__.get("__wrapped__")
        if wrapped is not None:
            yield wrapped
        for cell in obj.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(content) or isinstance(content, (classmethod, staticmethod)):
                yield content
        return
    if isinstance(obj, (classmethod, staticmethod, MethodType)):
        yield obj.__func__
    elif isinstance(obj, (functools.partial, functools.cached_property, functools.singledispatchmethod)):
        yield obj.func
    wrapped = own_attr(obj, "__wrapped__")
    if wrapped is not None:
        yield wrapped


def find_inner(obj: Any, qualname: str, namespace: dict[str, Any],
               max_depth: int = 6) -> tuple[FunctionType, list[Any]] | None:
    """Find, inside a (decorated) object, the function this module defined as ``qualname``.

    Returns the function and the wrappers passed on the way (to clear their caches), or
    None. Breadth first, so the nearest match wins; bounded, so odd objects cannot loop.
    """
    seen: set[int] = set()
    frontier: list[tuple[Any, list[Any]]] = [(obj, [])]
    for _ in range(max_depth):
        following: list[tuple[Any, list[Any]]] = []
        for current, path in frontier:
            if id(current) in seen:
                continue
            seen.add(id(current))
            # The code's qualified name, not __qualname__: functools.wraps copies that onto
            # the wrapper, which would then pass for the function it wraps.
            if (type(current) is FunctionType and current.__code__.co_qualname == qualname
                    and current.__globals__ is namespace):
                return current, path
            following.extend((child, [*path, current]) for child in _inside(current))
        if not following:
            return None
        frontier = following
    return None


def clear_caches(path: list[Any], name: str, ctx: Context) -> None:
    """Empty ``functools.lru_cache``/``cache`` wrappers on the way to a patched function.

    Their answers came from the old code. The undo empties them again, since by then they
    may hold answers from the new code; an empty cache refills itself.
    """
    for wrapper in path:
        clear = getattr(type(wrapper), "cache_clear", None)
        if callable(clear):
            ctx.journal.call(wrapper.cache_clear, wrapper.cache_clear)
            ctx.report.notes.append(f"cleared the cache of {name}: its answers came from the "
                                    "old code")


def owned_functions(obj: Any, namespace: dict[str, Any]) -> Iterator[FunctionType]:
    """Functions of this module reachable from a module-level object (for line fixups).

    Follows decorators, and a class's own methods, properties and nested classes, but
    never leaves the module: a class from elsewhere is not walked.
    """
    module = namespace.get("__name__")
    seen: set[int] = set()
    stack = [obj]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if type(current) is FunctionType:
            if current.__globals__ is namespace:
                yield current
            stack.extend(_inside(current))
        elif isinstance(current, type):
            if current.__dict__.get("__module__") == module:
                stack.extend(v for v in current.__dict__.values() if _may_hold_code(v))
        elif isinstance(current, property):
            stack.extend(f for f in (current.fget, current.fset, current.fdel) if f is not None)
        else:
            stack.extend(_inside(current))


def _may_hold_code(value: Any) -> bool:
    return (type(value) is FunctionType or isinstance(value, (type, property, classmethod,
            staticmethod, functools.partial, functools.cached_property))
            or own_attr(value, "__wrapped__") is not None)
