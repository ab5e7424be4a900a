"""What a failed push puts back outside the app: import machinery, environment, other modules.

The journal undoes what the rebinding did to the app's own modules. A changed statement can also
reach outside them: add a finder to ``sys.meta_path``, a directory to ``sys.path``, set an
environment variable, import a third-party module, patch ``json.dumps`` or ``builtins.print``.
:func:`capture` records, before the apply, what an undo puts back:

* ``sys.meta_path``, ``sys.path``, ``sys.path_hooks`` and ``sys.path_importer_cache`` (as lists and
  a mapping: the same objects, in the same order);
* ``sys.modules`` outside the app's packages: modules first imported during the failed push are
  dropped, replaced or removed entries are put back;
* ``os.environ`` (through ``os.environ`` itself, so the process environment follows);
* the namespace of every module outside the app that the changed code names: modules bound in the
  changed modules' namespaces (``import json``, ``from x import y`` of a module), and modules named by
  the changed statements' code (``json.dumps = ...``), plus ``builtins``, ``os`` and ``sys``.

What it cannot put back is said, never assumed: a thread the failed push started and that still
runs is named in the failure report (a thread cannot be stopped from outside). Not covered, as
the README says: state held by objects rather than module namespaces (a logger's handlers, a
registry inside a third-party object), modules reached only indirectly, files written and
sockets opened.

The cost is what the change names: a copy of a few module dicts and of ``os.environ``, about
25 µs for a typical push; nothing is walked.
"""

from __future__ import annotations

import builtins
import os
import sys
import threading
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Outside", "capture"]

_ALWAYS = (builtins, os, sys)


@dataclass
class Outside:
    """The state :func:`capture` recorded; :meth:`restore` puts it back."""

    tops: frozenset[str]
    meta_path: list[Any]
    path: list[str]
    path_hooks: list[Any]
    importer_cache: dict[str, Any]
    modules: dict[str, types.ModuleType]  # all of sys.modules: the app's are filtered at restore
    environ: dict[Any, Any]  # os.environ's encoded items (copying those costs a hundredth)
    namespaces: list[tuple[types.ModuleType, dict[str, object]]]
    threads: frozenset[int]

    def restore(self) -> list[str]:
        """Put everything back; returns what could not be (one line each, for the failure report)."""
        sys.meta_path[:] = self.meta_path
        sys.path[:] = self.path
        sys.path_hooks[:] = self.path_hooks
        if sys.path_importer_cache != self.importer_cache:
            sys.path_importer_cache.clear()
            sys.path_importer_cache.update(self.importer_cache)
        live, tops = sys.modules, self.tops
        for name in [n for n in live if n not in self.modules and n.partition(".")[0] not in tops]:
            del live[name]
        for name, module in self.modules.items():
            if live.get(name) is not module and name.partition(".")[0] not in tops:
                live[name] = module
        _restore_environ(self.environ)
        for module, saved in self.namespaces:
            _restore_namespace(module.__dict__, saved)
        started = [t for t in threading.enumerate() if t.ident not in self.threads and t.is_alive()]
        return [f"thread {t.name!r} it started is still running (a thread cannot be stopped from outside)"
                for t in started]


def capture(packages: Iterable[str], app_modules: Iterable[types.ModuleType],
            code: Iterable[types.CodeType]) -> Outside:
    """Record what :meth:`Outside.restore` puts back, for a push that re-runs code of
    ``app_modules`` (the changed modules) compiled as ``code``."""
    tops = frozenset(packages)
    outside = dict(sys.modules)
    watched: dict[int, types.ModuleType] = {id(m): m for m in _ALWAYS}
    for module in app_modules:
        for value in list(module.__dict__.values()):
            if type(value) is types.ModuleType and value.__name__.partition(".")[0] not in tops:
                watched[id(value)] = value
    for name in _names(code):
        named = outside.get(name)
        if named is not None and name.partition(".")[0] not in tops:
            watched[id(named)] = named
    return Outside(tops, list(sys.meta_path), list(sys.path), list(sys.path_hooks),
                   dict(sys.path_importer_cache), outside, _environ_items(),
                   [(m, dict(m.__dict__)) for m in watched.values()],
                   frozenset(t.ident for t in threading.enumerate() if t.ident is not None))


def _names(code: Iterable[types.CodeType]) -> Iterator[str]:
    """Every name the code objects (and those nested in them) use: globals, attributes, imports."""
    stack = list(code)
    while stack:
        c = stack.pop()
        yield from c.co_names
        stack.extend(k for k in c.co_consts if type(k) is types.CodeType)


def _environ_items() -> dict[Any, Any]:
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _restore_environ(saved: dict[Any, Any]) -> None:
    """Put ``os.environ`` back through ``os.environ`` itself (so ``putenv``/``unsetenv`` follow)."""
    if _environ_items() == saved:
        return
    environ = os.environ
    decode = getattr(environ, "decodekey", None)
    value_of = getattr(environ, "decodevalue", None)
    before = {decode(k): value_of(v) for k, v in saved.items()} if decode and value_of else saved
    for key in [k for k in environ if k not in before]:
        del environ[key]
    for key, value in before.items():
        if environ.get(key) != value:
            environ[key] = value


def _restore_namespace(namespace: dict[str, object], saved: dict[str, object]) -> None:
    if namespace.keys() == saved.keys() and all(namespace[k] is v for k, v in saved.items()):
        return
    for key in [k for k in namespace if k not in saved]:
        del namespace[key]
    for key, value in saved.items():
        if namespace.get(key, _ABSENT) is not value:
            namespace[key] = value


_ABSENT = object()
