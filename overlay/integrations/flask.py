"""Flask: after a push, the app serves its routes, blueprints, templates and static files as after a
fresh start.

Re-running a changed module runs Flask's setup calls again (``@app.route``, ``@bp.get``,
``app.register_blueprint``), which Flask refuses once the app served a request or the blueprint was
registered. For the apply, this module lifts those checks on every app and blueprint it knows (put
back afterwards and on undo) and:

* An endpoint registered again by a re-run statement replaces its old rules (a route whose path or
  methods changed); a view whose ``def`` was deleted loses its rules. The URL map is rebuilt from
  the rules kept. The map the app serves is never mutated: the apply works on a copy, and an undo
  puts back the very objects that were there.
* A blueprint that gained setup functions (``@bp.get`` on a new view) has just those replayed for
  each of its registrations, with the options it was registered with (recorded from
  ``Blueprint.register``; for a registration made before this module was loaded, the blueprint's
  own ``url_prefix`` and ``subdomain``). Its request functions (``@bp.before_request``, ...) and
  error handlers reach the app as at registration.
* A function registered again by a re-run decorator (``@app.before_request`` whose decorators
  changed) replaces its old registration instead of running twice.
* Templates: a push that changes data files empties the Jinja cache, so the next request renders
  the pushed template, with or without ``TEMPLATES_AUTO_RELOAD``. An app or blueprint whose
  ``root_path`` lies in a package directory that moved (a process's first push serves the app from
  habanero's source tree) is re-pointed there, so templates and static files are the version's own.

What cannot take effect live is reported (:meth:`Push.not_live`): an app or a registered blueprint
created again by a changed statement (the server keeps the one it started with), a blueprint
registered on an already registered blueprint, and a changed URL map setting (``strict_slashes``,
...) that rules read once, when they were added.

This module rebuilds the URL map and replays blueprints, and registers the hooks; its helpers find
the apps and record blueprint registrations (``_flask_apps``), keep the request-function and
error-handler tables right (``_flask_tables``), and serve the pushed templates and static files
(``_flask_files``).
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask.sansio.app import App
from flask.sansio.blueprints import Blueprint
from flask.sansio.scaffold import _endpoint_from_view_func
from werkzeug.routing import Map, Rule
from werkzeug.routing.matcher import StateMachineMatcher

from overlay.integrations._flask_apps import OPTIONS, registered_name, scan
from overlay.integrations._flask_files import templates_and_roots
from overlay.integrations._flask_tables import (
    FUNCTION_TABLES,
    Tables,
    dedupe_tables,
    gone,
    live_twin,
    merge_tables,
    save_tables,
)
from overlay.integrations.hooks import Push, calls_any, register

__all__: list[str] = []

#: Route decorators: a view whose old decorators called one of them loses what they registered.
_ROUTE_DECORATORS = frozenset({"route", "get", "post", "put", "patch", "delete"})
#: URL map settings a rule reads once, when it is added.
_MAP_SETTINGS = ("strict_slashes", "merge_slashes", "redirect_defaults", "host_matching", "sort_parameters")

_OPEN: weakref.WeakKeyDictionary[Push, _Apply] = weakref.WeakKeyDictionary()


def _no_check(f_name: str) -> None:
    """Stands in for ``_check_setup_finished`` during the apply: setup calls are what a push runs."""


# ---------------------------------------------------------------------------------------- the apply


@dataclass(eq=False)
class _Apply:
    """What the ``before`` hook saw, for the ``after`` hook of the same push."""

    push: Push
    apps: list[App]
    blueprints: dict[Blueprint, int]                     # blueprint -> its setup functions before
    bound: dict[tuple[str, str], Any]                    # (module, name) -> app or blueprint bound
    settings: dict[App, tuple[Any, ...]]
    tables: Tables = field(default_factory=dict)
    children: dict[Blueprint, int] = field(default_factory=dict)
    staged: set[App] = field(default_factory=set)        # apps whose URL map the apply works on a copy of
    dirty: set[App] = field(default_factory=set)         # ...from which rules were removed
    registered: dict[App, set[str]] = field(default_factory=dict)  # endpoints registered by the apply
    renewed: set[tuple[App, str]] = field(default_factory=set)     # blueprint registrations made again

    def stage(self, app: App) -> Map:
        """Let the apply change a copy of ``app``'s URL map (the original comes back on undo)."""
        url_map = app.url_map
        if app not in self.staged:
            self.staged.add(app)
            rules = {endpoint: list(found) for endpoint, found in url_map._rules_by_endpoint.items()}
            self.push.setattr(url_map, "_rules_by_endpoint", rules)
            self.push.setattr(url_map, "_matcher", _matcher(url_map, rules))
            self.push.setattr(url_map, "_remap", True)
        return url_map

    def drop_endpoint(self, app: App, endpoint: str) -> None:
        """Take ``endpoint``'s rules and view function out of ``app``."""
        url_map = self.stage(app)
        if endpoint in url_map._rules_by_endpoint:
            del url_map._rules_by_endpoint[endpoint]  # the staged copy: its undo is the stage's
            self.dirty.add(app)
        if endpoint in app.view_functions:
            self.push.delitem(app.view_functions, endpoint)


def _matcher(url_map: Map, rules: dict[Any, list[Rule]]) -> StateMachineMatcher:
    matcher = StateMachineMatcher(url_map.merge_slashes)
    for found in rules.values():
        for rule in found:
            if not rule.build_only:
                matcher.add(rule)
    return matcher


def _before(push: Push) -> None:
    if not push.reran:
        return
    apps, found_blueprints, bound = scan(push.reran)
    blueprints = {bp: len(bp.deferred_functions) for app in apps for bp in app.blueprints.values()}
    blueprints.update((bp, len(bp.deferred_functions)) for bp in found_blueprints if bp not in blueprints)
    state = _Apply(push, apps, blueprints, bound,
                   {app: tuple(getattr(app.url_map, s, None) for s in _MAP_SETTINGS) for app in apps})
    _OPEN[push] = state
    push.on_undo(lambda: _OPEN.pop(push, None))
    for app in apps:
        _open_app(state, app)
    for bp in blueprints:
        push.setattr(bp, "_check_setup_finished", _no_check)
        saved = list(bp.deferred_functions)
        push.on_undo(functools.partial(_put_back, bp.deferred_functions, saved))
        state.children[bp] = len(bp._blueprints)
        save_tables(push, state.tables, bp)


def _open_app(state: _Apply, app: App) -> None:
    push = state.push
    push.setattr(app, "_check_setup_finished", _no_check)
    push.setattr(app, "add_url_rule", functools.partial(_add_url_rule, state, app))
    push.setattr(app, "register_blueprint", functools.partial(_register_blueprint, state, app))
    push.setattr(app.url_map, "add", functools.partial(_map_add, state, app))
    push.snapshot(app.view_functions)  # Flask adds to these without us: an undo puts them back whole
    push.snapshot(app.blueprints)
    save_tables(push, state.tables, app)


def _put_back(target: list[Any], saved: list[Any]) -> None:
    target[:] = saved


def _map_add(state: _Apply, app: App, rulefactory: Any) -> None:
    Map.add(state.stage(app), rulefactory)


def _add_url_rule(state: _Apply, app: App, rule: str, endpoint: str | None = None,
                  view_func: Callable[..., Any] | None = None, *args: Any, **kw: Any) -> None:
    """``app.add_url_rule`` during the apply: a statement that ran again registers its endpoint
    again, and that registration replaces the endpoint's old rules."""
    name = endpoint if endpoint is not None else _endpoint_from_view_func(view_func)  # type: ignore[arg-type]
    done = state.registered.setdefault(app, set())
    if name not in done:
        done.add(name)
        if name in app.view_functions or name in app.url_map._rules_by_endpoint:
            state.drop_endpoint(app, name)
    type(app).add_url_rule(app, rule, endpoint, view_func, *args, **kw)


def _register_blueprint(state: _Apply, app: App, blueprint: Blueprint, **options: Any) -> None:
    """``app.register_blueprint`` during the apply: registering a blueprint again under the name it
    holds (its ``url_prefix`` changed, say) replaces the old registration."""
    name = registered_name(blueprint, options)
    if app.blueprints.get(name) is blueprint:
        _unregister(state, app, name)
    type(app).register_blueprint(app, blueprint, **options)


def _unregister(state: _Apply, app: App, name: str) -> None:
    push = state.push
    below = (name, f"{name}.")
    for registered in [n for n in app.blueprints if n == name or n.startswith(below[1])]:
        push.delitem(app.blueprints, registered)
        state.renewed.add((app, registered))
    for endpoint in [e for e in app.url_map._rules_by_endpoint if e.startswith(below[1])]:
        state.drop_endpoint(app, endpoint)
    for endpoint in [e for e in app.view_functions if e.startswith(below[1])]:
        state.drop_endpoint(app, endpoint)
    for table in (*(getattr(app, t) for t in FUNCTION_TABLES), app.error_handler_spec):
        for key in [k for k in table if isinstance(k, str) and (k == name or k.startswith(below[1]))]:
            push.delitem(table, key)


def _after(push: Push) -> None:
    state = _OPEN.pop(push, None)
    if state is not None:
        dedupe_tables(push, state.tables)
        _replay_blueprints(state)
        dedupe_tables(push, state.tables)  # what the replayed setup functions registered again
        _drop_removed_views(state)
        for app in state.apps:
            _close_app(state, app)
        for bp in state.blueprints:
            push.delattr(bp, "_check_setup_finished")
        _report(state)
    if push.files or push.moved:
        templates_and_roots(push)


def _close_app(state: _Apply, app: App) -> None:
    push, url_map = state.push, app.url_map
    if app in state.dirty:
        push.setattr(url_map, "_matcher", _matcher(url_map, url_map._rules_by_endpoint))
        push.setattr(url_map, "_remap", True)
    for endpoint in state.registered.get(app, ()):
        live = live_twin(app.view_functions.get(endpoint))
        if live is not None:
            push.setitem(app.view_functions, endpoint, live)
    for name in ("_check_setup_finished", "add_url_rule", "register_blueprint"):
        push.delattr(app, name)
    push.delattr(url_map, "add")


# ------------------------------------------------------------------------------------- blueprints


def _replay_blueprints(state: _Apply) -> None:
    """Run the setup functions a blueprint gained for every registration it has, as a fresh start
    would have run them; drop the ones they replace."""
    for bp, before in state.blueprints.items():
        new = bp.deferred_functions[before:]
        registrations = [(app, name) for app in state.apps for name, b in app.blueprints.items()
                         if b is bp and (app, name) not in state.renewed]  # a renewed one ran them all
        if new:
            replaced = {_deferred_endpoint(f) for f in new} - {None}
            kept = [f for f in bp.deferred_functions[:before]
                    if _deferred_endpoint(f) not in replaced and not gone(_deferred_view(f), state.push)]
            bp.deferred_functions[:] = kept + new  # undone by the before hook's record
            for app, name in registrations:
                options = OPTIONS.get(app, {}).get(name)
                if options is None:  # registered before this module was loaded: the blueprint's own
                    prefix, _, own = name.rpartition(".")
                    options = {"name": own, "name_prefix": prefix} if prefix else {"name": own}
                first = next(n for n, b in app.blueprints.items() if b is bp) == name
                setup = bp.make_setup_state(app, options, first)
                for deferred in new:
                    deferred(setup)
            for fn in new:
                cells = _deferred_route(fn)
                live = live_twin(cells["view_func"].cell_contents) if cells is not None else None
                if cells is not None and live is not None:
                    state.push.setattr(cells["view_func"], "cell_contents", live)
        for app, name in registrations:
            merge_tables(state.push, state.tables, bp, app, name)
        if len(bp._blueprints) > state.children.get(bp, len(bp._blueprints)) and registrations:
            state.push.not_live(f"blueprint {bp.name!r}: a blueprint registered on it after it was registered "
                                "on the app", "restart the app to serve the nested blueprint")


def _deferred_route(fn: Any) -> dict[str, Any] | None:
    """The cells of a setup function made by ``Blueprint.add_url_rule`` (``endpoint``, ``view_func``,
    ...), or None for any other setup function."""
    code = getattr(fn, "__code__", None)
    if code is None or code.co_qualname != "Blueprint.add_url_rule.<locals>.<lambda>":
        return None
    return dict(zip(code.co_freevars, fn.__closure__ or ()))


def _deferred_endpoint(fn: Any) -> str | None:
    cells = _deferred_route(fn)
    if cells is None:
        return None
    endpoint, view = cells["endpoint"].cell_contents, cells["view_func"].cell_contents
    return endpoint if endpoint is not None else getattr(view, "__name__", None)


def _deferred_view(fn: Any) -> Any:
    cells = _deferred_route(fn)
    return cells["view_func"].cell_contents if cells is not None else None


# ---------------------------------------------------------------------------------- removed views


def _drop_removed_views(state: _Apply) -> None:
    for app in state.apps:
        for endpoint, view in list(app.view_functions.items()):
            if endpoint not in state.registered.get(app, ()) and (gone(view, state.push)
                                                                  or _unrouted(view, state.push)):
                state.drop_endpoint(app, endpoint)


def _unrouted(fn: Any, push: Push) -> bool:
    """Whether the push changed the decorators of ``fn`` (its ``def`` stays) and the old ones routed
    it: what they registered goes, as after a fresh start (a route decorator that is still there
    registered the endpoint again, which keeps it)."""
    changed = push.decorators_changed(fn)
    return changed is not None and calls_any(changed[0], _ROUTE_DECORATORS)


# ----------------------------------------------------------------------------------------- reports


def _report(state: _Apply) -> None:
    push = state.push
    for (module_name, name), old in state.bound.items():
        module = sys.modules.get(module_name)
        new = module.__dict__.get(name) if module is not None else None
        if new is old or not isinstance(new, type(old)):
            continue
        if isinstance(old, App):
            push.not_live(f"{module_name}.{name}: the Flask app was created again by a changed statement; the "
                          "server keeps serving the app it started with",
                          "restart the app (changes to the app's configuration and routes go live; a change "
                          "to the statement that creates the app does not)")
        elif any(b is old for app in state.apps for b in app.blueprints.values()) and \
                not any(b is new for app in state.apps for b in app.blueprints.values()):
            push.not_live(f"{module_name}.{name}: blueprint {old.name!r} was created again by a changed "
                          "statement; the apps keep the one registered at start",
                          "restart the app to serve the new blueprint")
    for app, before in state.settings.items():
        after = tuple(getattr(app.url_map, s, None) for s in _MAP_SETTINGS)
        for setting, old, new in zip(_MAP_SETTINGS, before, after):
            if old != new:
                push.not_live(f"app {app.name!r}: url_map.{setting} changed from {old!r} to {new!r}; the "
                              "routes added before keep the old setting",
                              "restart the app to apply it to every route")


register("flask", before=_before, after=_after, when="flask")
