"""One registration per class: registries that took the re-run class object get the live one back.

A changed ``class`` statement runs again to build the new version of the class, and the old class
is then patched from it in place (``classes.conform_class``). Running the statement has the side
effects a class statement has: a metaclass (Django's ``ModelBase``), a base's
``__init_subclass__`` or a class decorator may register the new, throwaway class object in a table
somewhere. After a fresh start, that table would hold the one class the app uses; after the push it
holds the throwaway, or both.

:func:`repoint` fixes that: it finds every reference to the throwaway classes (one
``gc.get_referrers`` walk of the heap for all the classes of a module) and re-points it at the live
class: a dict value, a dict key, a list or set item, a cell, an attribute of an instance or of a
class. Where the live class is already there (``registry.append(cls)`` ran again), the duplicate
is dropped instead, so the class is registered once, as after a fresh start.

These changes are not journaled, on purpose: each puts the live class where the throwaway was, and
the live class is what those places held before the push too (the registration that put the
throwaway there ran outside the journal). One is: a value a registry keeps *under* the class
(``handlers[cls] = make_handler(cls)``) moves from the throwaway's key to the live class's, and an
undo gives the live class its value from before the push. So if the push is undone, the
registries are as they were before it, which is what an undo promises. Not reached: a throwaway
held inside a tuple or a frozen object (immutable holders are left as they are).

The walk costs about 18 ms per million live objects, so it runs only for classes whose statement
can register them somewhere (:func:`may_register`): a metaclass other than the standard library's,
an ``__init_subclass__`` in a base, or a class decorator not known to be pure.
"""

from __future__ import annotations

import gc
import types
from collections.abc import Iterable
from typing import Any

from overlay.rebinding.journal import Journal

__all__ = ["may_register", "repoint"]

#: Metaclasses of the standard library that keep no strong reference to the classes they make
#: (``ABCMeta`` caches through weak references, ``EnumType`` keeps its members on the class).
_QUIET_METACLASS_MODULES = frozenset({"builtins", "abc", "enum", "typing", "_ctypes", "ctypes"})


def may_register(cls: type, impure_decorators: bool) -> bool:
    """Whether running ``cls``'s class statement may have registered it somewhere."""
    if impure_decorators:
        return True
    if type(cls).__module__ not in _QUIET_METACLASS_MODULES:
        return True
    return any("__init_subclass__" in base.__dict__ for base in cls.__mro__[1:-1])


def repoint(pairs: Iterable[tuple[Any, Any]], journal: Journal) -> list[str]:
    """Re-point every reference to each throwaway class or function (``new``) at the live one (``old``).

    A function's pair comes from a changed ``def`` whose decorators ran again (one that registers:
    ``@handlers.append``, ``@registry.register``): the live function was patched with the new code,
    so it is what the registry must hold, once.

    Returns one line per place changed, for the push report. The throwaway classes' own insides
    (their ``__mro__``, their ``__dict__``) are left alone: nothing refers to them once this is done.
    """
    live = {id(new): (new, old) for new, old in pairs if new is not old}
    if not live:
        return []
    holders = gc.get_referrers(*(new for new, _ in live.values()))
    class_dicts = _class_dicts(live, [h for h in holders if type(h) is dict])
    done: list[str] = []
    for holder in holders:
        if type(holder) is dict:
            if id(holder) in class_dicts:
                owner = class_dicts[id(holder)]
                if owner is not None:
                    done += _repoint_class_attrs(owner, live)
                continue
            done += _repoint_dict(holder, live, journal)
        elif type(holder) is list:
            done += _repoint_list(holder, live)
        elif type(holder) is set:
            done += _repoint_set(holder, live)
        elif type(holder) is types.CellType:
            target = live.get(id(holder.cell_contents))
            if target is not None:
                holder.cell_contents = target[1]
                done.append(f"a closure cell held the new {target[0].__qualname__}")
    return done


def _class_dicts(live: dict[int, tuple[Any, Any]], dicts: list[dict[str, Any]]) -> dict[int, type | None]:
    """Which of ``dicts`` are a class's namespace, by the dict's id: the class, or None for the
    throwaway classes' own (left alone).

    A class's namespace must be changed through ``setattr`` (which keeps the type's attribute cache
    right), never as a dict. A class made by a ``class`` statement always has ``__module__`` and
    ``__doc__`` in it; the owners of such dicts are found in one more walk, for all of them.
    """
    found: dict[int, type | None] = {}
    for new, _ in live.values():
        if not isinstance(new, type):
            found[id(new.__dict__)] = None  # a function's own attributes
            continue
        for ref in gc.get_referents(new.__dict__):
            if type(ref) is dict:
                found[id(ref)] = None
    candidates = {id(d): d for d in dicts if id(d) not in found and "__module__" in d and "__doc__" in d}
    if candidates:
        for owner in gc.get_referrers(*candidates.values()):
            if isinstance(owner, type):
                for ref in gc.get_referents(owner.__dict__):
                    if id(ref) in candidates and ref is candidates[id(ref)]:
                        found[id(ref)] = owner
    return found


def _repoint_class_attrs(owner: type, live: dict[int, tuple[Any, Any]]) -> list[str]:
    done = []
    for name, value in list(owner.__dict__.items()):
        target = live.get(id(value))
        if target is not None:
            setattr(owner, name, target[1])
            done.append(f"{owner.__qualname__}.{name}")
    return done


def _repoint_dict(holder: dict[Any, Any], live: dict[int, tuple[Any, Any]], journal: Journal) -> list[str]:
    done = []
    for key, value in list(holder.items()):
        target = live.get(id(value))
        if target is not None:
            holder[key] = target[1]
            done.append(f"{_where(holder, key)} held the new {target[0].__qualname__}")
        keyed = live.get(id(key))
        if keyed is not None:
            new, old = keyed
            # The fresh registration's value, on the live key. Journaled: an undo gives the live key
            # its value from before the push (the throwaway key stays gone).
            journal.setitem(holder, old, holder.pop(new))
            done.append(f"a table keyed by class had the new {new.__qualname__} as a key")
    return done


def _repoint_list(holder: list[Any], live: dict[int, tuple[Any, Any]]) -> list[str]:
    before = list(holder)
    after: list[Any] = []
    names = []
    for item in before:
        target = live.get(id(item))
        if target is None:
            after.append(item)
            continue
        names.append(target[0].__qualname__)
        if not any(x is target[1] for x in before):
            after.append(target[1])  # the live class takes the throwaway's place
        # else: registered twice now; the live class is there already, the throwaway goes
    if names:
        holder[:] = after
    return [f"a list held the new {name}" for name in names]


def _repoint_set(holder: set[Any], live: dict[int, tuple[Any, Any]]) -> list[str]:
    hits = [live[id(x)] for x in holder if id(x) in live]
    for new, old in hits:
        holder.discard(new)
        holder.add(old)
    return [f"a set held the new {new.__qualname__}" for new, _ in hits]


def _where(holder: dict[Any, Any], key: Any) -> str:
    return f"[{key!r}]" if isinstance(key, str) and len(key) < 60 else "a table"
