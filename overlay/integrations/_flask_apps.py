"""The Flask apps and blueprints the integration knows, and how each blueprint was registered.

A push finds the apps bound in the modules it re-ran; an app seen once is kept (weakly) for every
later push, since a push that re-runs only a blueprint's module must still reach the app it is
registered on. ``Blueprint.register`` is wrapped, from this module's load on, to record each
registration's options (``url_prefix``, ``name``, ...): replaying a blueprint's new setup functions
needs them.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from flask.sansio.app import App
from flask.sansio.blueprints import Blueprint

from overlay.integrations.hooks import Push

__all__ = ["OPTIONS", "known_apps", "registered_name", "scan"]

#: Apps seen in an earlier push (found in the app's modules or through a blueprint's registration).
_APPS: weakref.WeakSet[App] = weakref.WeakSet()
#: ``{app: {registered name: the options of Blueprint.register}}``, recorded from this module's load on.
OPTIONS: weakref.WeakKeyDictionary[App, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _record_options(register: Callable[[Blueprint, App, dict[str, Any]], None]
                    ) -> Callable[[Blueprint, App, dict[str, Any]], None]:
    @functools.wraps(register)
    def recording(self: Blueprint, app: App, options: dict[str, Any]) -> None:
        register(self, app, options)
        OPTIONS.setdefault(app, {})[registered_name(self, options)] = dict(options)
        _APPS.add(app)

    recording.__habanero__ = True  # type: ignore[attr-defined]
    return recording


if not getattr(Blueprint.register, "__habanero__", False):  # this module may be imported again
    Blueprint.register = _record_options(Blueprint.register)  # type: ignore[method-assign,assignment]


def registered_name(bp: Blueprint, options: dict[str, Any]) -> str:
    """The name ``bp`` is registered under with ``options`` (``parent.child`` when nested)."""
    return f"{options.get('name_prefix', '')}.{options.get('name', bp.name)}".lstrip(".")


def scan(modules: Iterable[str]) -> tuple[list[App], list[Blueprint], dict[tuple[str, str], Any]]:
    """The apps and blueprints bound in ``modules``' namespaces, with every app seen before.

    A blueprint registered on an app not seen yet (its registration came before this module was
    loaded) sends the search through every module of the same top-level packages, once.
    """
    modules = list(modules)
    bound: dict[tuple[str, str], Any] = {}
    blueprints: list[Blueprint] = []
    _look_in(modules, bound, blueprints)
    known = {id(bp) for app in _APPS for bp in app.blueprints.values()}
    if any(bp._got_registered_once and id(bp) not in known for bp in blueprints):
        tops = {name.partition(".")[0] for name in modules}
        skip = set(modules)
        _look_in([n for n in list(sys.modules) if n.partition(".")[0] in tops and n not in skip], {}, [])
    return list(_APPS), blueprints, bound


def _look_in(modules: Iterable[str], bound: dict[tuple[str, str], Any], blueprints: list[Blueprint]) -> None:
    for module_name in modules:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for name, value in list(module.__dict__.items()):
            if isinstance(value, App):
                _APPS.add(value)
                bound[module_name, name] = value
            elif isinstance(value, Blueprint):
                blueprints.append(value)
                bound[module_name, name] = value


def known_apps(push: Push) -> list[App]:
    """Every app of the process worth re-pointing: those seen before, and on a move (a process's first
    push, a forked worker) those bound in the modules that moved."""
    if push.moved:
        dirs = tuple(new.rstrip(os.sep) + os.sep for new in push.moved.values())
        _look_in([name for name, module in list(sys.modules.items())
                  if str(getattr(module, "__file__", None) or "").startswith(dirs)], {}, [])
    return list(_APPS)
