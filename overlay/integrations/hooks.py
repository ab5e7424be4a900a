"""The hook API: code that runs inside a push's transaction, told what the push changed.

Re-running a changed module rebuilds what that module owns. It does not rebuild what a framework
keeps in tables of its own: a router compiled at start-up, a template cache, a model registry, a
setting read once. A hook does, or says what it cannot do. Each framework habanero knows has one
module in this package (``flask``, ``django``, ``starlette``, ``aiohttp``), loaded when the
framework itself is loaded; an app registers its own the same way::

    from overlay.integrations import register

    def rebuild_menu(push):
        if push.touches("myapp.menu"):
            push.setattr(myapp.ui, "MENU", build_menu())   # undone if the push fails later

    register("menu", after=rebuild_menu)

A hook gets a :class:`Push`. ``before`` hooks run once the new version's files and index are in
place and before any changed module runs again; ``after`` hooks run once every changed module ran.
Both run inside the transaction, on the thread that applies the push, holding the import lock: a
hook that raises fails the push, and everything (the hook's own changes made through
:class:`Push`, the modules, the files) is undone; the old version keeps serving. Hooks run in the
order they were registered, ``before`` and ``after`` alike; a rollback runs them too.

A change a hook cannot make live is reported with :meth:`Push.not_live`: it is listed in the push
report (the CLI's output and ``--json``) with what to do about it. Nothing is silently ignored.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from overlay.rebinding.journal import Journal

if TYPE_CHECKING:
    from overlay.rebind import ModuleReport

__all__ = ["Hook", "Push", "applying", "arm", "calls_any", "register", "registered", "run", "unregister"]

log = logging.getLogger("overlay.integrations")

Hook = Callable[["Push"], object]
Phase = Literal["before", "after"]

#: The integrations habanero ships: the module whose presence in ``sys.modules`` means the app
#: uses the framework, and the module of this package that rebuilds the framework's tables.
BUILTIN: dict[str, tuple[str, str]] = {
    "flask": ("flask", "overlay.integrations.flask"),
    "django": ("django.apps", "overlay.integrations.django"),
    "starlette": ("starlette.routing", "overlay.integrations.starlette"),
    "aiohttp": ("aiohttp.web", "overlay.integrations.aiohttp"),
}


@dataclass(frozen=True)
class _Registered:
    name: str
    before: Hook | None
    after: Hook | None
    when: str | None


_HOOKS: dict[str, _Registered] = {}
_LOADED: set[str] = set()


def register(name: str, *, before: Hook | None = None, after: Hook | None = None, when: str | None = None
             ) -> None:
    """Run ``before`` and/or ``after`` in every push and rollback of this process from now on.

    ``name`` names the hook in reports and errors; registering a name again replaces the hook of
    that name (a module that registers at import time may be imported again). ``when`` is a module
    name: the hooks run only once that module is imported (``when="flask"``), so an integration
    costs nothing to an app that does not use its framework.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("register(): name must be a non-empty string")
    if before is None and after is None:
        raise TypeError(f"register({name!r}): give a before= or an after= hook (or both)")
    for hook in (before, after):
        if hook is not None and not callable(hook):
            raise TypeError(f"register({name!r}): {hook!r} is not callable")
    _HOOKS.pop(name, None)  # a replaced hook moves to the end, as if registered now
    _HOOKS[name] = _Registered(name, before, after, when)


def unregister(name: str) -> None:
    """Stop running the hook ``name`` (nothing happens if there is none)."""
    _HOOKS.pop(name, None)


def registered() -> list[str]:
    """The names of the hooks registered, in the order they run."""
    return list(_HOOKS)


def arm() -> None:
    """Load the integration of every framework the process has imported so far (once each).

    Called at start-up, before each app module runs and at each push, so a framework's integration
    is in place before the app registers its first route; cheap enough for that (a dict lookup per
    framework). One loaded by a push (whose new code imported the framework first) is unloaded
    again if that push is undone: the undo drops the framework's modules it imported.
    """
    for name, (trigger, module) in BUILTIN.items():
        if name not in _LOADED and trigger in sys.modules:
            _LOADED.add(name)
            before = set(_HOOKS)
            try:
                importlib.import_module(module)
            except Exception:  # an integration that cannot load must not take the app down
                log.exception("habanero's %s integration failed to load; pushes will not rebuild %s's "
                              "tables (please report this)", name, name)
            if _APPLYING:
                added = set(_HOOKS) - before
                _APPLYING[-1].call(lambda: None, functools.partial(_unload, name, module, added))


def _unload(name: str, module: str, hooks: set[str]) -> None:
    _LOADED.discard(name)
    for hook in hooks:
        _HOOKS.pop(hook, None)
    sys.modules.pop(module, None)


#: The journal of the push applying in this process now, if one is (pushes apply one at a time).
_APPLYING: list[Journal] = []


@contextlib.contextmanager
def applying(journal: Journal) -> Iterator[None]:
    """Mark the block as a push's apply: what :func:`arm` loads meanwhile is undone with it."""
    _APPLYING.append(journal)
    try:
        yield
    finally:
        _APPLYING.pop()


@dataclass(eq=False)
class Push:
    """What a push (or rollback) changes in this process, as its hooks are told.

    Module names are dotted (``shop.views``); files are paths in the bundle (``shop/templates/a.html``).
    The methods that change objects (:meth:`setattr`, :meth:`setitem`, ...) record an undo: use them
    for every change a hook makes, so that a push that fails later leaves the framework as it was.
    """

    action: str                      #: "push" or "rollback"
    version: int
    previous_version: int | None
    added: tuple[str, ...]           #: modules the new version adds
    changed: tuple[str, ...]         #: modules whose source changed
    removed: tuple[str, ...]         #: modules the new version no longer has
    files: tuple[str, ...]           #: data files added, changed or removed
    #: Imported modules whose changed statements run again, in order; by the ``after`` hooks, also
    #: those that ran again to follow a name they import from a changed module.
    reran: tuple[str, ...]
    #: Package directories that moved (``{old: new}``): on a process's first push, every live module
    #: of the app moves from the code on disk to the source tree habanero serves it from.
    moved: dict[str, str] = field(default_factory=dict)
    #: What the rebinding did to each module that ran again (filled in before ``after`` hooks run).
    modules: list[ModuleReport] = field(default_factory=list)
    #: What could not take effect live: ``{"source", "what", "fix"}`` each (see :meth:`not_live`).
    notices: list[dict[str, str]] = field(default_factory=list)
    _journal: Journal = field(default_factory=Journal, repr=False)
    _source: str = field(default="app", repr=False)

    # ---------------------------------------------------------------- what changed

    def touches(self, *prefixes: str) -> bool:
        """Whether the push added, changed or removed a module or file at or below any of ``prefixes``
        (``"shop.views"``, ``"shop"``, ``"shop/templates/"``)."""
        return any(_below(name, p) for name in (*self.added, *self.changed, *self.removed, *self.files)
                   for p in prefixes)

    def files_under(self, directory: str) -> list[str]:
        """The data files the push added, changed or removed below ``directory`` (a bundle path)."""
        prefix = directory.rstrip("/") + "/"
        return [f for f in self.files if f.startswith(prefix)]

    def decorators_changed(self, fn: Any) -> tuple[list[str], list[str]] | None:
        """For ``fn``, a top-level function of a module that ran again: its decorators before and
        after the push, as source text, when the push changed them (``(["app.get('/a')"], [])``:
        a route decorator was deleted); else None. What the old decorators registered is stale."""
        module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
        if module not in self.reran or getattr(fn, "__qualname__", None) != name:
            return None
        for report in self.modules:
            if report.module == module and name in report.redecorated:
                return report.redecorated[name]
        return None

    # ---------------------------------------------------------------- undoable changes

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        self._journal.setattr(obj, name, value)

    def delattr(self, obj: Any, name: str) -> None:
        self._journal.delattr(obj, name)

    def setitem(self, mapping: MutableMapping[Any, Any], key: Any, value: Any) -> None:
        self._journal.setitem(mapping, key, value)

    def delitem(self, mapping: MutableMapping[Any, Any], key: Any) -> None:
        self._journal.delitem(mapping, key)

    def snapshot(self, mapping: MutableMapping[Any, Any]) -> None:
        """Record the whole of ``mapping``: an undo puts back exactly these items."""
        self._journal.snapshot(mapping)

    def on_undo(self, undo: Callable[[], object]) -> None:
        """Call ``undo`` if the push fails after this point (undos run last-recorded first)."""
        self._journal.call(lambda: None, undo)

    # ---------------------------------------------------------------- reporting

    def not_live(self, what: str, fix: str) -> None:
        """Report a change that did not take effect live, and what to do: it is listed in the push
        report under ``not_live``, with the name of the hook that reported it."""
        notice = {"source": self._source, "what": str(what), "fix": str(fix)}
        if notice not in self.notices:
            self.notices.append(notice)


def run(phase: Phase, push: Push) -> None:
    """Run every registered hook of ``phase`` whose module is loaded; the first error propagates,
    naming the hook (the transaction then undoes the push)."""
    arm()
    for hook in list(_HOOKS.values()):
        fn = hook.before if phase == "before" else hook.after
        if fn is None or (hook.when is not None and hook.when not in sys.modules):
            continue
        push._source = hook.name
        try:
            fn(push)
        except Exception as exc:
            raise HookFailed(hook.name, phase, exc) from exc
        finally:
            push._source = "app"


class HookFailed(Exception):
    """A hook raised: the push fails and is undone, and the message says which hook."""

    def __init__(self, name: str, phase: Phase, error: BaseException) -> None:
        super().__init__(f"the {name!r} hook ({phase} the push) raised {type(error).__name__}: {error}")
        self.name, self.phase, self.error = name, phase, error


def _below(name: str, prefix: str) -> bool:
    if name == prefix or (prefix.endswith(("/", ".")) and name.startswith(prefix)):
        return True
    return name.startswith((prefix + ".", prefix + "/"))


def calls_any(decorators: Iterable[str], names: Iterable[str]) -> bool:
    """Whether any of ``decorators`` (source text, as :meth:`Push.decorators_changed` gives them)
    calls one of ``names``: ``"app.get('/a')"`` calls ``get``, ``"routes.route('*', '/')"`` ``route``."""
    wanted = frozenset(names)
    return any(d.partition("(")[0].rpartition(".")[2].strip() in wanted for d in decorators)


def describe(notices: Iterable[dict[str, str]]) -> list[str]:
    """One line per notice, as logs show them."""
    return [f"{n['source']}: {n['what']} ({n['fix']})" for n in notices]
