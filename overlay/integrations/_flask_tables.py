"""Flask's tables of request functions and error handlers, across a push.

Flask keeps, per app and per blueprint, tables of functions keyed by blueprint name (``None``: the
owner's own): ``before_request_funcs`` and the rest of :data:`FUNCTION_TABLES`, and
``error_handler_spec``. ``Blueprint.register`` copies a blueprint's into the app. A re-run module
registers its functions again, so after the apply each table holds every function once, as the
module binds it (:func:`dedupe_tables`), none whose ``def`` the push deleted, and the app holds what
its blueprints' tables gained (:func:`merge_tables`). The tables are saved before the apply
(:func:`save_tables`) and put back on undo.

Also here: how a function is recognised across a push (:func:`live_twin`, :func:`gone`), which the
URL map's rebuilding uses too.
"""

from __future__ import annotations

import collections
import functools
import sys
import types
from collections.abc import Iterable
from typing import Any

from flask.sansio.app import App
from flask.sansio.blueprints import Blueprint
from flask.sansio.scaffold import Scaffold

from overlay.integrations.hooks import Push

__all__ = ["FUNCTION_TABLES", "Tables", "dedupe_tables", "gone", "live_twin", "merge_tables",
           "save_tables"]

#: The tables of request functions Flask keeps per blueprint name (``None``: the app's own), which
#: ``Blueprint.register`` copies into the app.
FUNCTION_TABLES = ("before_request_funcs", "after_request_funcs", "teardown_request_funcs",
                   "url_default_functions", "url_value_preprocessors", "template_context_processors")

#: ``{id(table): (its owner, its name, its contents before the apply)}``.
Tables = dict[int, tuple[Scaffold, str, dict[Any, Any]]]


def save_tables(push: Push, tables: Tables, owner: Scaffold) -> None:
    """Record ``owner``'s tables in ``tables`` as they are before the apply; put them back on undo."""
    for name in FUNCTION_TABLES:
        table = getattr(owner, name)
        saved = {key: list(found) for key, found in table.items()}
        tables[id(table)] = (owner, name, saved)
        push.on_undo(functools.partial(_restore_table, table, saved))
    spec: dict[Any, Any] = owner.error_handler_spec
    saved_spec = {key: {code: dict(handlers) for code, handlers in codes.items()} for key, codes in spec.items()}
    tables[id(spec)] = (owner, "error_handler_spec", saved_spec)


def _restore_table(table: dict[Any, list[Any]], saved: dict[Any, list[Any]]) -> None:
    for key in [k for k in table if k not in saved]:
        del table[key]
    for key, found in saved.items():
        if key in table:
            table[key][:] = found
        else:
            table[key] = list(found)


def dedupe_tables(push: Push, tables: Tables) -> None:
    """A function whose decorators ran again is registered once, as the module binds it; one whose
    ``def`` was deleted is no longer registered."""
    for owner, name, saved in tables.values():
        if name == "error_handler_spec":
            continue
        table = getattr(owner, name)
        for key, found in list(table.items()):
            if found == saved.get(key) and not any(gone(f, push) for f in found):
                continue
            kept = _once_each(found, push)
            if kept != found:
                table[key] = kept  # the before hook's record puts the old list back on undo


def _once_each(found: Iterable[Any], push: Push) -> list[Any]:
    kept: list[Any] = []
    slot: dict[tuple[str, str], int] = {}
    for fn in found:
        if gone(fn, push):
            continue
        key = _definition(fn, push)
        if key is None or key not in slot:
            if key is not None:
                slot[key] = len(kept)
            kept.append(fn)
        elif _module_binding(fn) is fn:  # the one the module binds wins, in the first one's place
            kept[slot[key]] = fn
    return kept


def merge_tables(push: Push, tables: Tables, bp: Blueprint, app: App, name: str) -> None:
    """Give the app what the blueprint's tables gained, as ``Blueprint.register`` copies them (for
    its registration under ``name``)."""
    for table_name in FUNCTION_TABLES:
        table = getattr(bp, table_name)
        saved = tables.get(id(table), (None, None, {}))[2]
        target = getattr(app, table_name)
        for key, found in table.items():
            if found != saved.get(key):
                push.setitem(target, name if key is None else f"{name}.{key}", list(found))
    spec: dict[Any, Any] = bp.error_handler_spec
    saved_spec = tables.get(id(spec), (None, None, {}))[2]
    for key, codes in spec.items():
        now = {code: dict(handlers) for code, handlers in codes.items()}
        if now != saved_spec.get(key):
            fresh = collections.defaultdict(dict, now)
            push.setitem(app.error_handler_spec, name if key is None else f"{name}.{key}", fresh)


# ------------------------------------------------------------------------- a function across a push


def gone(fn: Any, push: Push) -> bool:
    """Whether ``fn`` is a top-level function of a module the push removed or whose ``def`` it deleted."""
    if not isinstance(fn, types.FunctionType) or fn.__qualname__ != fn.__name__:
        return False
    if fn.__module__ in push.removed:
        return True
    module = sys.modules.get(fn.__module__)
    return (fn.__module__ in push.reran and module is not None and fn.__name__ not in module.__dict__
            and any(r.module == fn.__module__ and fn.__name__ in r.removed for r in push.modules))


def live_twin(fn: Any) -> types.FunctionType | None:
    """The function the module binds in place of ``fn``, if ``fn`` is its throwaway twin: a decorator
    that ran again registered the function its statement made, while the module keeps the old one,
    patched to the same code (and patched again by later pushes). That one is what to register."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if not isinstance(fn, types.FunctionType) or module is None or fn.__qualname__ != fn.__name__:
        return None
    live = module.__dict__.get(fn.__name__)
    if live is not fn and isinstance(live, types.FunctionType) and live.__code__ is fn.__code__:
        return live
    return None


def _module_binding(fn: Any) -> Any:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    name = getattr(fn, "__name__", None)
    if module is None or not isinstance(name, str) or getattr(fn, "__qualname__", None) != name:
        return None
    return module.__dict__.get(name)


def _definition(fn: Any, push: Push) -> tuple[str, str] | None:
    """Which top-level ``def`` of a re-run module made ``fn`` (through any wrappers), if one did."""
    inner = fn
    for _ in range(16):
        wrapped = getattr(inner, "__wrapped__", None)
        if wrapped is None:
            break
        inner = wrapped
    if not isinstance(inner, types.FunctionType) or inner.__module__ not in push.reran \
            or inner.__qualname__ != inner.__name__ or not inner.__name__.isidentifier():  # not a lambda
        return None
    return inner.__module__, inner.__qualname__
