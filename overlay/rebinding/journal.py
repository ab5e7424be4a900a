"""An undo journal: every mutation a push makes is recorded so it can be reversed exactly.

The apply step of a push changes live objects (module dicts, function attributes, class
dicts, enum tables). If anything fails half-way, ``Journal.undo()`` replays the recorded
undos newest first and puts back the very same objects that were there before, so identity
checks (``is``) hold after an undo. Undo never stops half-way: a failing step is collected
and the rest still run; the failures are raised together at the end.

    journal = Journal()
    journal.setattr(func, "__code__", new_code)
    journal.setitem(module.__dict__, "CACHE", {})
    journal.undo()          # func.__code__ and module.CACHE are the old objects again

Classes are mutated with ``type.__setattr__`` / ``type.__delattr__`` so that metaclasses
which guard their attributes (``EnumType`` refuses to reassign members) neither block a
patch nor its undo. A class ``__dict__`` is a read-only mappingproxy, so ``setitem`` refuses
it and names the right call.

Dict order is not restored: a key deleted and put back moves to the end. Restoring order
would mean popping live keys during the undo, and another thread reading a module global at
that instant would see a ``NameError``; a stable set of names matters more than their order.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, TypeVar

__all__ = ["Journal", "UndoIncomplete"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Missing:
    """Marks "there was no value here" (distinct from ``None``, which is a value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class UndoIncomplete(ExceptionGroup):
    """Some undo steps failed; every other step still ran. ``exceptions`` holds the failures."""

    # Keeps the type when the group is split by ``except*``. An ExceptionGroup holds and derives from
    # Exceptions only: the BaseException overload typeshed gives BaseExceptionGroup.derive cannot apply.
    def derive(self, excs: Sequence[Exception]) -> UndoIncomplete:  # type: ignore[override]
        return UndoIncomplete(self.message, excs)


def _static_lookup(obj: Any, name: str) -> Any:
    """The attribute ``name`` as defined on ``type(obj)``'s MRO, without calling anything."""
    for klass in type(obj).__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return MISSING


def _current_attr(obj: Any, name: str) -> Any:
    """What ``obj.name`` holds *as its own state*, or MISSING when the attribute is absent.

    For classes this is the class's own ``__dict__`` entry, never an inherited one: undoing
    a patch must not copy a base class's attribute into the subclass.
    """
    if isinstance(obj, type):
        return obj.__dict__.get(name, MISSING)
    try:
        own = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        own = None
    if isinstance(own, dict) and name in own:
        return own[name]
    descriptor = _static_lookup(obj, name)
    # Function attributes such as __code__ or __defaults__ are data descriptors on the type:
    # the value lives in the object although it is not in its __dict__.
    if descriptor is not MISSING and hasattr(type(descriptor), "__set__"):
        try:
            return getattr(obj, name)
        except (AttributeError, ValueError):  # an unset slot, an empty cell
            return MISSING
    return MISSING


def _set(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, type):
        type.__setattr__(obj, name, value)
    else:
        setattr(obj, name, value)


def _delete(obj: Any, name: str) -> None:
    if isinstance(obj, type):
        type.__delattr__(obj, name)
    else:
        delattr(obj, name)


def _restore_attr(obj: Any, name: str, prior: Any) -> None:
    if prior is MISSING:
        if _current_attr(obj, name) is not MISSING:
            _delete(obj, name)
    else:
        _set(obj, name, prior)


def _restore_item(mapping: MutableMapping[Any, Any], key: Any, prior: Any) -> None:
    if prior is MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = prior


def _restore_snapshot(mapping: MutableMapping[Any, Any], snapshot: dict[Any, Any]) -> None:
    # Remove what was added, then put back what changed: existing names never vanish, even
    # for an instant, so threads reading module globals meanwhile never see a NameError.
    for key in [k for k in mapping if k not in snapshot]:
        del mapping[key]
    for key, value in snapshot.items():
        if mapping.get(key, MISSING) is not value:
            mapping[key] = value


class Journal:
    """Records an undo for each mutation; ``undo()`` reverses them all, newest first.

    Entries are small tuples rather than closures: a push may record thousands of them
    (one per function whose line numbers moved) and undo must stay cheap.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Journal {len(self._entries)} entries>"

    # -- recording mutations ---------------------------------------------------------------

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` (``type.__setattr__`` on classes), remembering the old value."""
        prior = _current_attr(obj, name)
        _set(obj, name, value)
        self._entries.append(("attr", obj, name, prior))

    def delattr(self, obj: Any, name: str) -> None:
        """Delete ``obj.name`` (``type.__delattr__`` for classes), remembering the old value."""
        prior = _current_attr(obj, name)
        _delete(obj, name)
        self._entries.append(("attr", obj, name, prior))

    def setitem(self, mapping: MutableMapping[Any, Any], key: Any, value: Any) -> None:
        """Set ``mapping[key] = value``, remembering the old value or its absence."""
        _refuse_proxy(mapping)
        prior = mapping.get(key, MISSING)
        mapping[key] = value
        self._entries.append(("item", mapping, key, prior))

    def delitem(self, mapping: MutableMapping[Any, Any], key: Any) -> None:
        """Delete ``mapping[key]``, remembering its value."""
        _refuse_proxy(mapping)
        prior = mapping[key]
        del mapping[key]
        self._entries.append(("item", mapping, key, prior))

    def snapshot(self, mapping: MutableMapping[Any, Any]) -> dict[Any, Any]:
        """Remember every item of ``mapping`` now; undo makes it hold exactly these again.

        For mutations this module cannot see one by one, such as running a module's
        statement in its namespace. Returns the snapshot (a shallow copy); do not mutate it.
        """
        _refuse_proxy(mapping)
        copy = dict(mapping)
        self._entries.append(("snapshot", mapping, copy, None))
        return copy

    def call(self, do: Callable[[], T], undo: Callable[[], object]) -> T:
        """Run ``do()`` and record ``undo`` to reverse it. Nothing is recorded if ``do`` raises."""
        result = do()
        self._entries.append(("call", undo, None, None))
        return result

    # -- ending a transaction --------------------------------------------------------------

    def undo(self) -> None:
        """Reverse every recorded mutation, newest first, then forget them.

        Every step runs even if an earlier one failed; failures are raised together as an
        ``UndoIncomplete`` once all steps have been attempted.
        """
        entries, self._entries = self._entries, []
        errors: list[Exception] = []
        for entry in reversed(entries):
            try:
                _replay(entry)
            except Exception as exc:  # keep going: a half-undone process is the worst outcome
                exc.add_note(f"while undoing {_describe(entry)}")
                log.error("undo step failed: %s: %r", _describe(entry), exc)
                errors.append(exc)
        if errors:
            raise UndoIncomplete(f"{len(errors)} of {len(entries)} undo steps failed", errors)

    def commit(self) -> None:
        """Forget the recorded undos (the push succeeded), releasing the old objects they hold."""
        self._entries.clear()


def _refuse_proxy(mapping: object) -> None:
    if isinstance(mapping, types.MappingProxyType):
        raise TypeError(
            "a class __dict__ is read-only: use journal.setattr(cls, name, value) "
            "or journal.delattr(cls, name) instead"
        )


def _replay(entry: tuple[Any, ...]) -> None:
    kind, a, b, c = entry
    if kind == "attr":
        _restore_attr(a, b, c)
    elif kind == "item":
        _restore_item(a, b, c)
    elif kind == "snapshot":
        _restore_snapshot(a, b)
    else:
        a()


def _describe(entry: tuple[Any, ...]) -> str:
    kind, a, b, _ = entry
    if kind == "attr":
        return f"attribute {b!r} of {type(a).__name__} {getattr(a, '__qualname__', '')!s}".rstrip()
    if kind == "item":
        return f"item {b!r} of a {type(a).__name__}"
    if kind == "snapshot":
        return f"a snapshot of a {type(a).__name__} with {len(b)} items"
    return f"call {getattr(a, '__qualname__', a)!r}"
