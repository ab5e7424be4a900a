"""Patch an old class in place from a freshly executed version of its ``class`` statement.

Existing instances, subclasses and every ``isinstance`` check keep working because the
class object stays the same; only its ``__dict__`` changes, one journaled attribute at a
time. The class body is diffed like a module: attributes bound by body statements that did
not change keep their current values (class-level counters and registries survive), methods
that did not change only get their line numbers refreshed, and changed members are
conformed. Attributes no body statement binds (what ``@dataclass`` generates, the docstring,
``__annotations__``) are carried over from the new class when they differ.

What cannot change in place refuses the whole class with a reason: the metaclass, the
bases, ``__slots__`` or the instance layout. An Enum keeps its members' identity; new members
are adopted from the new class by re-pointing their ``__class__`` at the old one.
"""

from __future__ import annotations

import ast
import enum
import functools
from collections.abc import Callable
from types import FunctionType, GetSetDescriptorType, MemberDescriptorType
from typing import Any

from overlay.rebinding.functions import Context, clear_caches, conform_function, find_inner, own_attr, same_value
from overlay.rebinding.journal import MISSING
from overlay.rebinding.matching import Region, match
from overlay.rebinding.statements import binds_of

__all__ = ["refusal", "conform_class", "conform_for_layout", "layout_changed"]

# Never copied from the new class: layout descriptors and state tied to the class object.
_KEEP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "__slots__",
                   "_abc_impl"})
_ENUM_TABLES = frozenset({"_member_names_", "_member_map_", "_value2member_map_"})


def _slots(cls: type) -> tuple[str, ...] | None:
    value = cls.__dict__.get("__slots__", MISSING)
    if value is MISSING:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _layout(cls: type) -> tuple[str, ...]:
    """The slots an instance really has: the class's slot descriptors. Not ``__slots__`` itself,
    which a module may delete after the class statement (``del C.__slots__``) without changing
    anything about its instances."""
    return tuple(sorted(n for n, v in cls.__dict__.items() if type(v) is MemberDescriptorType))


def _names(classes: tuple[type, ...]) -> str:
    """``(A,)`` or ``(A, B)``: a tuple of class names, written as Python writes tuples."""
    return repr(tuple(c.__qualname__ for c in classes)).replace("'", "")


def refusal(old: type, new: type, ctx: Context) -> str | None:
    """Why ``old`` cannot become ``new`` in place, or None when it can."""
    kept = ctx.kept_old()
    if type(old) is not type(new):
        return (f"its metaclass changed from {type(old).__qualname__} to "
                f"{type(new).__qualname__}: {kept}")
    if old.__bases__ != new.__bases__:
        if [b.__qualname__ for b in old.__bases__] == [b.__qualname__ for b in new.__bases__]:
            return (f"its base classes {_names(new.__bases__)} are other objects than before "
                    f"(a base class was itself replaced): {kept}")
        return (f"its base classes changed from {_names(old.__bases__)} to "
                f"{_names(new.__bases__)}: {kept}")
    if _layout(old) != _layout(new):
        return f"`__slots__` changed from {_slots(old)} to {_slots(new)}: {kept}"
    if (old.__basicsize__, old.__itemsize__) != (new.__basicsize__, new.__itemsize__):
        return f"its instance layout changed (__dict__ or __weakref__ added or removed): {kept}"
    if isinstance(old, enum.EnumType):
        # Every enum class has ``_member_type_`` (the data type its members mix in, else object);
        # typeshed does not declare it. ``new`` is an enum too: its metaclass is old's (above).
        was, now = old._member_type_, new._member_type_  # type: ignore[attr-defined]
        if was is not now:
            return f"its member type changed from {was.__qualname__} to {now.__qualname__}: {kept}"
    return None


Regions = tuple[Region, Region] | None  # where the old and new class statements' lines are


def conform_class(old: type, new: type, old_node: ast.ClassDef | None,
                  new_node: ast.ClassDef | None, ctx: Context, regions: Regions = None
                  ) -> str | None:
    """Patch ``old`` from ``new`` in place, or return why that is impossible (nothing done).

    ``old_node``/``new_node`` are the two class statements; without both, every member
    counts as changed. ``regions`` lets the body diff compare source text before ASTs.
    """
    reason = refusal(old, new, ctx)
    if reason is not None:
        return reason
    qual = old.__qualname__
    _retarget_class_cells(old, new, ctx)
    members: set[str] = set()
    if isinstance(old, enum.EnumType) and isinstance(new, enum.EnumType):  # both or neither: refusal()
        members = _conform_enum(old, new, qual, ctx)
    unchanged, changed, gone = (_mangled(names, old.__name__) for names in _body_diff(old_node, new_node, regions))
    known = old_node is not None and new_node is not None
    old_dict = old.__dict__
    for name, value in list(new.__dict__.items()):
        if name in _KEEP or name in members or name in _ENUM_TABLES:
            continue
        current = old_dict.get(name, MISSING)
        if current is MISSING:
            ctx.journal.setattr(old, name, value)
            ctx.report.patched.append(f"{qual}.{name} (added)")
        elif _is_layout(current) and _is_layout(value):
            continue  # slot and __dict__ descriptors belong to the old layout
        elif known and name in unchanged and name not in changed:
            _relines(current, value, ctx)
        elif not known or name in changed:
            nested = (_class_node(old_node, name), _class_node(new_node, name))
            _conform_member(old, name, current, value, nested, ctx, regions)
        elif not _equivalent(current, value):  # generated: by a decorator or the compiler
            ctx.journal.setattr(old, name, value)
            ctx.report.patched.append(f"{qual}.{name}")
    for name in [n for n in old_dict if n not in new.__dict__]:
        if name in _KEEP or name in members or name in _ENUM_TABLES:
            continue
        value = old_dict[name]
        generated = (type(value) is FunctionType and value.__qualname__ == f"{qual}.{name}"
                     and not (known and name in unchanged))
        if (known and name in gone) or generated:
            ctx.journal.delattr(old, name)
            ctx.report.removed.append(f"{qual}.{name}")
    return None


def layout_changed(old: type, new: type) -> bool:
    """Whether ``new`` differs from ``old`` in its slots alone (the class is then replaced, and
    :func:`conform_for_layout` keeps the old class's instances on the new methods)."""
    return (type(old) is type(new) and old.__bases__ == new.__bases__
            and (_layout(old) != _layout(new)
                 or (old.__basicsize__, old.__itemsize__) != (new.__basicsize__, new.__itemsize__)))


def conform_for_layout(old: type, new: type, old_node: ast.ClassDef | None, new_node: ast.ClassDef | None,
                       ctx: Context, regions: Regions = None) -> None:
    """``new`` replaced ``old`` because its slots changed: patch the changed methods of ``old`` in
    place from ``new``, so the instances made before the push run the new code, except the methods
    that use a slot those instances lack, which are reported by name and keep the old code."""
    qual = old.__qualname__
    lacking = set(_layout(new)) - set(_layout(old))
    _, changed, _ = (_mangled(names, old.__name__) for names in _body_diff(old_node, new_node, regions))
    known = old_node is not None and new_node is not None
    for name, value in new.__dict__.items():
        current = old.__dict__.get(name, MISSING)
        if name in _KEEP or _is_layout(value) or current is MISSING or (known and name not in changed):
            continue
        olds, news = _functions_of(current), _functions_of(value)
        if not news or len(olds) != len(news) or type(current) is not type(value):
            continue
        for a, b in zip(olds, news):
            uses = sorted(lacking.intersection(b.__code__.co_names))
            if uses:
                ctx.report.notes.append(
                    f"{qual}.{name} kept its old code for instances made before the push: the new code "
                    f"uses the slot(s) {', '.join(uses)} their layout lacks")
                continue
            reason = conform_function(a, b, ctx)
            if reason is None:
                ctx.report.patched.append(f"{qual}.{name} (for instances made before the push)")
            else:
                ctx.report.notes.append(f"{qual}.{name} kept its old code for instances made before the "
                                        f"push: {reason}")


def _is_layout(value: Any) -> bool:
    return type(value) in (MemberDescriptorType, GetSetDescriptorType)


def _equivalent(a: Any, b: Any) -> bool:
    if same_value(a, b):
        return True
    if type(a) is FunctionType and type(b) is FunctionType:  # e.g. a regenerated __eq__
        return (a.__code__ == b.__code__ and same_value(a.__defaults__, b.__defaults__)
                and _cells(a) == _cells(b))
    return False


def _cells(fn: FunctionType) -> list[int]:
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(id(cell.cell_contents))
        except ValueError:
            out.append(0)
    return out


def _class_node(node: ast.ClassDef | None, name: str) -> ast.ClassDef | None:
    if node is None:
        return None
    found = None
    for stmt in node.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name == name:
            found = stmt  # the last definition wins, as at run time
    return found


def _mangled(names: set[str], owner: str) -> set[str]:
    """Names as a class body stores them: ``__x`` inside ``class Opt`` is ``_Opt__x``."""
    stem = owner.lstrip("_")
    if not stem:
        return names
    return {f"_{stem}{n}" if n.startswith("__") and not n.endswith("__") else n for n in names}


def _body_diff(old: ast.ClassDef | None, new: ast.ClassDef | None, regions: Regions
               ) -> tuple[set[str], set[str], set[str]]:
    """Names bound by unchanged, changed and deleted statements of a class body."""
    if old is None or new is None:
        return set(), set(), set()
    ra, rb = regions if regions is not None else (None, None)
    pairs, gone = match(old.body, new.body, ra, rb)
    unchanged: set[str] = set()
    changed: set[str] = set()
    for stmt, (_, how) in zip(new.body, pairs):
        (changed if how == "changed" else unchanged).update(binds_of(stmt))
    left = {name for i in gone for name in binds_of(old.body[i])}
    return unchanged, changed, left - unchanged - changed


def _retarget_class_cells(old: type, new: type, ctx: Context) -> None:
    """Point the new methods' hidden ``__class__`` cell at the old class.

    Zero-argument ``super()`` reads that cell. The new methods that end up in the old class
    (added ones, or replacements) must find the class they now live in, or ``super()``
    raises "obj must be an instance or subtype of type" on every existing instance.
    """
    for value in new.__dict__.values():
        for fn in _functions_of(value):
            code = fn.__code__
            if "__class__" not in code.co_freevars:
                continue
            # A function with a free variable (``__class__``) always has a closure.
            cell = fn.__closure__[code.co_freevars.index("__class__")]  # type: ignore[index]
            try:
                if cell.cell_contents is new:
                    ctx.journal.setattr(cell, "cell_contents", old)
            except ValueError:
                continue


def _functions_of(value: Any) -> list[FunctionType]:
    if type(value) is FunctionType:
        return [value]
    if isinstance(value, (classmethod, staticmethod)):
        return _functions_of(value.__func__)
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if type(f) is FunctionType]
    if isinstance(value, (functools.cached_property, functools.singledispatchmethod)):
        return _functions_of(value.func)
    wrapped = own_attr(value, "__wrapped__")
    return _functions_of(wrapped) if type(wrapped) is FunctionType else []


def _kind(value: Any) -> str:
    if type(value) is FunctionType:
        return "function"
    for k in (classmethod, staticmethod, property, type):
        if isinstance(value, k):
            return "class" if k is type else k.__name__
    return "wrapped function" if _functions_of(value) else "value"


def _conform_member(cls: type, name: str, old: Any, new: Any,
                    nodes: tuple[ast.ClassDef | None, ast.ClassDef | None], ctx: Context,
                    regions: Regions) -> None:
    """Conform one changed class attribute, or set the new value and say why."""
    qual = f"{cls.__qualname__}.{name}"
    report, journal = ctx.report, ctx.journal
    kind_old, kind_new = _kind(old), _kind(new)
    if kind_old != kind_new:
        journal.setattr(cls, name, new)
        report.replaced.append((qual, f"changed from a {kind_old} to a {kind_new}: "
                                      "references taken before the push keep the old one"))
        return
    if kind_old == "value" or (kind_old == "function" and not (
            old.__qualname__ == new.__qualname__ == qual)):
        if not same_value(old, new):  # data, or a function defined elsewhere and aliased here
            journal.setattr(cls, name, new)
            report.patched.append(qual)
        return
    if kind_old == "class":
        if old.__qualname__ != new.__qualname__ or old.__qualname__ != qual:
            journal.setattr(cls, name, new)  # not the nested class of this name: an alias
            report.patched.append(qual)
            return
        reason = conform_class(old, new, nodes[0], nodes[1], ctx, regions)
    elif kind_old == "property":
        reason = _conform_property(cls, name, old, new, ctx)
    else:
        reason = _conform_wrapped(old, new, qual, ctx)
    if reason is None:
        report.patched.append(qual)
    else:
        journal.setattr(cls, name, new)
        report.replaced.append((qual, reason))


def _conform_wrapped(old: Any, new: Any, qual: str, ctx: Context) -> str | None:
    """A method, classmethod, staticmethod or decorated method: patch the function inside."""
    if type(old) is not type(new):
        return f"its decorator now makes a {type(new).__name__}, not a {type(old).__name__}"
    found_old = find_inner(old, qual, ctx.namespace)
    found_new = find_inner(new, qual, ctx.namespace)
    if found_old is None or found_new is None:
        return (f"the function inside this {type(old).__name__} could not be found, so it "
                "was not patched; the class now holds the new one")
    reason = conform_function(found_old[0], found_new[0], ctx)
    if reason is None:
        clear_caches(found_old[1], qual, ctx)
    return reason


def _conform_property(cls: type, name: str, old: property, new: property,
                      ctx: Context) -> str | None:
    """Patch a property's accessors in place; rebuild the property if one was added/removed."""
    if type(old) is not type(new):
        return f"it is now a {type(new).__name__}, not a {type(old).__name__}"
    accessors: list[Callable[..., Any] | None] = []
    for a, b in ((old.fget, new.fget), (old.fset, new.fset), (old.fdel, new.fdel)):
        if type(a) is FunctionType and type(b) is FunctionType:
            reason = conform_function(a, b, ctx)
            if reason is not None:
                return reason
            accessors.append(a)
        else:
            accessors.append(b)
    if accessors != [old.fget, old.fset, old.fdel] or not same_value(old.__doc__, new.__doc__):
        if type(old) is not property:
            return f"a {type(old).__name__} cannot gain or lose accessors in place"
        fget, fset, fdel = accessors
        ctx.journal.setattr(cls, name, property(fget, fset, fdel, new.__doc__))
    return None


def _relines(old: Any, new: Any, ctx: Context) -> None:
    """An unchanged member: keep it, only take the new line numbers of its code."""
    if isinstance(old, type) and isinstance(new, type):
        # Only a nested class of this very statement (``A.env_class = B`` is an alias of another
        # class, and walking into it could come back here).
        if old is not new and old.__qualname__ == new.__qualname__:
            for name, value in new.__dict__.items():
                current = old.__dict__.get(name, MISSING)
                if current is not MISSING and name not in _KEEP:
                    _relines(current, value, ctx)
        return
    olds, news = _functions_of(old), _functions_of(new)
    if len(olds) == len(news):
        for a, b in zip(olds, news):
            if a.__qualname__ == b.__qualname__:
                conform_function(a, b, ctx, code_only=True)


def _conform_enum(old: enum.EnumType, new: enum.EnumType, qual: str, ctx: Context) -> set[str]:
    """Keep existing members, adopt new ones, drop deleted ones; return every member name."""
    journal, report = ctx.journal, ctx.report
    old_map, new_map = old._member_map_, new._member_map_
    plain = old._member_type_ is object and "__init__" not in new.__dict__  # type: ignore[attr-defined]  # see refusal
    final: dict[int, Any] = {}  # id(new member) -> the member object the old enum will hold
    for name in new._member_names_:
        fresh, kept = new_map[name], old_map.get(name)
        if kept is not None and kept._name_ == name:
            if same_value(kept._value_, fresh._value_):
                final[id(fresh)] = kept
                continue
            if plain:
                report.patched.append(f"{qual}.{name} (value {kept._value_!r} -> "
                                      f"{fresh._value_!r})")
                journal.setattr(kept, "_value_", fresh._value_)
                final[id(fresh)] = kept
                continue
            report.replaced.append((f"{qual}.{name}", (
                f"value changed from {kept._value_!r} to {fresh._value_!r} and {qual} members "
                "carry state built from their value: references to the old member keep it")))
        else:
            report.patched.append(f"{qual}.{name} (added)")
        journal.setattr(fresh, "__class__", old)  # adopt: same layout, checked by refusal()
        journal.setattr(fresh, "__objclass__", old)
        final[id(fresh)] = fresh
    members = {name: final.get(id(m), m) for name, m in new_map.items()}
    values = {value: final.get(id(m), m) for value, m in new._value2member_map_.items()}
    named = {id(m) for m in old_map.values()}
    for value, m in old._value2member_map_.items():  # keep flag combinations made at run time
        if value not in values and id(m) not in named:
            values[value] = m
    journal.setattr(old, "_member_names_", list(new._member_names_))
    journal.setattr(old, "_member_map_", members)
    journal.setattr(old, "_value2member_map_", values)
    for name, member in members.items():
        if old.__dict__.get(name, MISSING) is not member:
            journal.setattr(old, name, member)
    for name in [n for n in old_map if n not in members]:
        if old.__dict__.get(name, MISSING) is old_map[name]:
            journal.delattr(old, name)
        report.removed.append(f"{qual}.{name} (enum member; existing references keep the object)")
    return set(old_map) | set(members)
