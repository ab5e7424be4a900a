"""After any push, ``journal.undo()`` puts back exactly the objects that were there before."""

from __future__ import annotations

import enum
import types
from typing import Any

import pytest

# (v1 snippet, v2 snippet, a call that exercises the result) for each kind of change.
KINDS = {
    "function body": ("greeter_v1", "greeter_v2", lambda m: m.Greeter("a").greet()),
    "decorated function": ("decorated_v1", "decorated_v2", lambda m: m.double(2)),
    "lru_cache function": ("lru_v1", "lru_v2", lambda m: m.square(3)),
    "closure, same free variables": ("closure_v1", "closure_v2", lambda m: m.add5(1)),
    "closure, free variables changed": ("closure_v1", "closure_freevars_v2",
                                        lambda m: m.make_adder(1)(1)),
    "super() in a method": ("super_v1", "super_v2", lambda m: m.Child().plain()),
    "subclass of a changed class": ("subclass_v1", "subclass_v2", lambda m: m.Dog().describe()),
    "dataclass gaining a field": ("dataclass_v1", "dataclass_v2", lambda m: repr(m.Point(1, 2))),
    "enum gaining members": ("enum_v1", "enum_v2", lambda m: list(m.Color) + list(m.Level)),
    "__slots__ change": ("slots_v1", "slots_v2", lambda m: m.Pair(1).total()),
    "decorator registration": ("registry_v1", "registry_v2", lambda m: m.REGISTRY[0]()),
    "migration hook": ("migrate_v1", "migrate_v2", lambda m: dict(m.SESSIONS)),
}


def fingerprint(module: types.ModuleType) -> dict[tuple, Any]:
    """Every object a push may touch, keyed by where it was found."""
    seen: dict[tuple, Any] = {("module dict",): module.__dict__}
    for name, value in module.__dict__.items():
        seen[("module", name)] = value
        _walk(value, ("module", name), module.__name__, seen, depth=0)
    return seen


def _walk(value: Any, where: tuple, module_name: str, seen: dict[tuple, Any], depth: int) -> None:
    if depth > 3:
        return
    if isinstance(value, types.FunctionType):
        for attr in ("__code__", "__defaults__", "__kwdefaults__", "__annotations__", "__doc__",
                     "__dict__"):
            seen[(*where, attr)] = getattr(value, attr)
        for key, item in value.__dict__.items():
            seen[(*where, "__dict__", key)] = item
            _walk(item, (*where, "__dict__", key), module_name, seen, depth + 1)
        for index, cell in enumerate(value.__closure__ or ()):
            seen[(*where, "cell", index)] = cell.cell_contents
            _walk(cell.cell_contents, (*where, "cell", index), module_name, seen, depth + 1)
    elif isinstance(value, type) and value.__module__ == module_name:
        for key, item in vars(value).items():
            seen[(*where, "class", key)] = item
            _walk(item, (*where, "class", key), module_name, seen, depth + 1)
        if isinstance(value, enum.EnumType):
            for table in ("_member_map_", "_value2member_map_"):
                for key, item in getattr(value, table).items():
                    seen[(*where, table, key)] = item
                    seen[(*where, table, key, "class")] = item.__class__
    elif isinstance(value, (classmethod, staticmethod)):
        _walk(value.__func__, (*where, "__func__"), module_name, seen, depth + 1)
    elif isinstance(value, property):
        for part in ("fget", "fset", "fdel"):
            _walk(getattr(value, part), (*where, part), module_name, seen, depth + 1)
    elif callable(getattr(value, "cache_info", None)):
        _walk(value.__wrapped__, (*where, "__wrapped__"), module_name, seen, depth + 1)


def assert_identical(before: dict[tuple, Any], after: dict[tuple, Any]) -> None:
    assert after.keys() == before.keys()
    differing = [key for key, value in before.items() if after[key] is not value]
    assert differing == []


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_undo_after_a_push_restores_every_object_identically(live, snippet, kind):
    v1, v2, use = KINDS[kind]
    m = live(snippet(v1))
    answer = use(m.module)
    before = fingerprint(m.module)

    m.push(snippet(v2))
    m.undo()

    assert_identical(before, fingerprint(m.module))
    assert use(m.module) == answer


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_undo_after_a_push_with_unknown_old_source_restores_identically(live, snippet, kind):
    v1, v2, use = KINDS[kind]
    m = live(snippet(v1))
    answer = use(m.module)
    before = fingerprint(m.module)

    m.push(snippet(v2), old_source=None)
    m.undo()

    assert_identical(before, fingerprint(m.module))
    assert use(m.module) == answer


def test_undo_twice_is_harmless(live, snippet):
    m = live(snippet("greeter_v1"))
    before = fingerprint(m.module)
    m.push(snippet("greeter_v2"))

    m.undo()
    m.undo()

    assert_identical(before, fingerprint(m.module))


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_pushing_the_previous_source_back_restores_the_previous_behaviour(live, snippet, kind):
    v1, v2, use = KINDS[kind]
    m = live(snippet(v1))
    answer = use(m.module)

    m.push(snippet(v2))
    m.push(snippet(v1))

    assert use(m.module) == answer


def test_class_body_raising_half_way_is_undone_identically(live, snippet):
    m = live(snippet("greeter_v1"))
    before = fingerprint(m.module)
    broken = snippet("greeter_v2").replace(
        "    def wave(self):", "    raise KeyError('in body')\n\n    def wave(self):")

    with pytest.raises(KeyError, match="in body"):
        m.push(broken)
    m.undo()

    assert_identical(before, fingerprint(m.module))


def test_decorator_raising_is_undone_identically(live, snippet):
    m = live(snippet("decorated_v1"))
    before = fingerprint(m.module)
    broken = snippet("decorated_v2").replace("@traced\ndef double", "@traced(1)\ndef double")

    with pytest.raises(AttributeError):  # traced(1) asks for (1).__name__
        m.push(broken)
    m.undo()

    assert_identical(before, fingerprint(m.module))
