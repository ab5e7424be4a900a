"""What a failed push puts back outside the app: import machinery, environment, other modules.

The journal undoes what the rebinding did to the app's own modules. A changed statement can also
reach outside them: add a finder to ``sys.meta_path``, a directory to ``sys.path``, set an
environment variable, import a third-party module, patch ``json.dumps`` or ``builtins.print``.
:func:`capture` records, before the apply, what an undo puts back:

* ``sys.meta_path``, ``sys.path``, ``sys.path_hooks`` and ``sys.path_importer_cache`` (as lists and
  a mapping: the same objects, in the same order);
* ``sys.modules`` outside the app's packages: modules first imported during the failed push are
  dropped, replaced or removed entries are put back (other threads cannot import a new module
  meanwhile: the apply holds the import lock);
* the environment variables the applying thread set or removed (through ``os.environ``, so the
  process environment follows);
* the attributes the changed code assigns or deletes (``json.dumps = ...``, ``sys.stdout = ...``)
  of every module outside the app it names: modules bound in the changed modules' namespaces
  (``import json``), modules named by the changed statements' code, and ``builtins``, ``os`` and
  ``sys``.

Other threads of the app keep running during an apply (only imports wait), so the undo reverts
what the applying thread did, not what happened meanwhile: an environment variable another thread
set, ``sys.stdout`` put back by another thread's ``redirect_stdout`` block stay theirs
(:meth:`Outside.watching` tells the threads apart for the environment and new threads; attributes
are limited to the names the pushed code stores).

What it cannot put back is said, never assumed: a thread the failed push started and that still
runs is named in the failure report (a thread cannot be stopped from outside). Not covered, as
the README says: state held by objects rather than module namespaces (a logger's handlers, a
registry inside a third-party object), attributes set by name (``setattr(json, name, f)``),
modules reached only indirectly, files written and sockets opened.

The cost is what the change names: a copy of a few module dicts and of ``os.environ``, a scan of
the changed statements' bytecode, about 30 µs for a typical push; nothing is walked.
"""

from __future__ import annotations

import builtins
import contextlib
import dis
import os
import sys
import threading
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Outside", "capture"]

_ALWAYS = (builtins, os, sys)
_STORES = frozenset({"STORE_ATTR", "DELETE_ATTR"})


@dataclass
class Outside:
    """The state :func:`capture` recorded, and what the applying thread did since (:meth:`watching`);
    :meth:`restore` puts back what that thread changed."""

    tops: frozenset[str]
    meta_path: list[Any]
    path: list[str]
    path_hooks: list[Any]
    importer_cache: dict[str, Any]
    modules: dict[str, types.ModuleType]  # all of sys.modules: the app's are filtered at restore
    environ: dict[str, str]
    namespaces: list[tuple[types.ModuleType, dict[str, object]]]
    attributes: frozenset[str]  # the attribute names the push's code stores or deletes
    applier: int = 0  # the thread that applies the push
    env_keys: set[str] = field(default_factory=set)  # environment variables it set or removed
    threads: list[threading.Thread] = field(default_factory=list)  # threads it started

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Note which environment variables the applying thread sets or removes and which threads it
        starts, so that an undo reverts those and blames only those: other threads of the app keep
        running during an apply, and what they do is theirs."""
        self.applier = threading.get_ident()
        environ_type, thread_type = type(os.environ), threading.Thread
        setitem, delitem, start = environ_type.__setitem__, environ_type.__delitem__, thread_type.start
        mine, keys, threads = self.applier, self.env_keys, self.threads

        def set_env(env: Any, key: str, value: str) -> None:
            if threading.get_ident() == mine:
                keys.add(key)
            setitem(env, key, value)

        def del_env(env: Any, key: str) -> None:
            if threading.get_ident() == mine:
                keys.add(key)
            delitem(env, key)

        def start_thread(thread: threading.Thread) -> None:
            if threading.get_ident() == mine:
                threads.append(thread)
            start(thread)

        environ_type.__setitem__ = set_env  # type: ignore[method-assign]
        environ_type.__delitem__ = del_env  # type: ignore[method-assign]
        thread_type.start = start_thread  # type: ignore[method-assign, assignment]
        try:
            yield
        finally:
            environ_type.__setitem__ = setitem  # type: ignore[method-assign]
            environ_type.__delitem__ = delitem  # type: ignore[method-assign]
            thread_type.start = start  # type: ignore[method-assign]

    def restore(self) -> list[str]:
        """Put back what the applying thread changed; returns what could not be (one line each, for
        the failure report)."""
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
        for key in self.env_keys:
            if key in self.environ:
                if os.environ.get(key) != self.environ[key]:
                    os.environ[key] = self.environ[key]
            else:
                os.environ.pop(key, None)
        for module, saved in self.namespaces:
            _restore_attributes(module.__dict__, saved, self.attributes)
        return [f"thread {t.name!r} it started is still running (a thread cannot be stopped from outside)"
                for t in self.threads if t.is_alive()]


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
    codes = list(_all_code(code))
    for name in {n for c in codes for n in c.co_names}:
        named = outside.get(name)
        if named is not None and name.partition(".")[0] not in tops:
            watched[id(named)] = named
    return Outside(tops, list(sys.meta_path), list(sys.path), list(sys.path_hooks),
                   dict(sys.path_importer_cache), outside, dict(os.environ),
                   [(m, dict(m.__dict__)) for m in watched.values()], _stored_attributes(codes))


def _all_code(code: Iterable[types.CodeType]) -> Iterator[types.CodeType]:
    """The code objects and every code object nested in them."""
    stack = list(code)
    while stack:
        c = stack.pop()
        yield c
        stack.extend(k for k in c.co_consts if type(k) is types.CodeType)


def _stored_attributes(codes: Iterable[types.CodeType]) -> frozenset[str]:
    """The attribute names the code assigns or deletes (``json.dumps = ...``, ``del sys.x``): the
    only attributes of other modules an undo puts back, so that what other threads of the app set
    meanwhile (``sys.stdout`` restored by a ``redirect_stdout`` block) stays theirs."""
    return frozenset(i.argval for c in codes if c.co_names for i in dis.get_instructions(c) if i.opname in _STORES)


def _restore_attributes(namespace: dict[str, object], saved: dict[str, object], names: frozenset[str]) -> None:
    for key in names:
        before = saved.get(key, _ABSENT)
        if namespace.get(key, _ABSENT) is before:
            continue
        if before is _ABSENT:
            namespace.pop(key, None)
        else:
            namespace[key] = before


_ABSENT = object()
