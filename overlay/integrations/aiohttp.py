"""aiohttp: routes added, moved or deleted by a push are served as after a fresh start.

aiohttp freezes an application's router when the app starts: registering a route afterwards
raises ``RuntimeError: Cannot register a resource into frozen router``, so a changed statement that
adds one would fail the push. For the length of the apply every known app's router (sub-apps too)
is unfrozen, then:

* a route a changed statement added is indexed and served; on a sub-application it gets the
  sub-application's prefix, as ``add_subapp`` gives the routes it finds;
* ``RouteTableDef`` tables (``routes = web.RouteTableDef()``, ``@routes.get(...)``) in a module that
  ran again: their new routes are added to every router the table was added to before
  (``app.add_routes(routes)``, recorded as it happens);
* a handler whose decorator ran again (its path changed) loses its old route, and the new route
  calls the live handler (the object the module keeps, which later pushes patch);
* a handler deleted from its module loses its route.

The router is then indexed again and frozen. Everything is journaled: a failed push leaves every
router exactly as it was. Reported as not live: a changed function that registers routes (a
``setup_routes(app)`` called at start-up, which nothing calls again), an application created anew
by a changed statement, and a table added to no router habanero knows of.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import types
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import MatchedSubAppResource, PrefixedSubAppResource, Resource, UrlDispatcher

from overlay.integrations.hooks import Push, calls_any, register
from overlay.integrations.known import Known

_APPS = Known()  # web.Application objects
#: RouteTableDefs and the routers they were added to (``UrlDispatcher.add_routes``, recorded).
_TABLES: weakref.WeakKeyDictionary[web.RouteTableDef, Known] = weakref.WeakKeyDictionary()
_MISSING = object()
_REGISTERS = frozenset({"add_get", "add_post", "add_put", "add_patch", "add_delete", "add_head", "add_route",
                        "add_routes", "add_view", "add_static", "add_resource", "add_subapp"})
_RESTART = "restart the app to apply it"
_ROUTE_DECORATORS = frozenset({"get", "post", "put", "patch", "delete", "head", "view", "route"})


@dataclass
class _Before:
    push: Push
    reran: frozenset[str]
    routers: dict[int, tuple[UrlDispatcher, list[Any], str, bool]] = field(default_factory=dict)  # + prefix, frozen
    routes: set[int] = field(default_factory=set)  # every route that existed before the push
    tables: dict[int, tuple[web.RouteTableDef, list[Any]]] = field(default_factory=dict)
    bound: dict[tuple[str, str], web.Application] = field(default_factory=dict)


#: The before hook's findings, for the after hook of the same push (a push that fails between the
#: two leaves nothing behind: the entry goes with the push).
_PENDING: weakref.WeakKeyDictionary[Push, _Before] = weakref.WeakKeyDictionary()


def _record_add_routes() -> None:
    """Remember which routers each RouteTableDef was added to (patched once, at class level)."""
    original = UrlDispatcher.add_routes
    if getattr(original, "_habanero", False):
        return

    @functools.wraps(original)
    def add_routes(self: UrlDispatcher, routes: Iterable[Any]) -> Any:
        if isinstance(routes, web.RouteTableDef):
            with contextlib.suppress(Exception):  # remembering must never keep the app from adding routes
                _TABLES.setdefault(routes, Known()).add(self)
        return original(self, routes)

    add_routes._habanero = True  # type: ignore[attr-defined]
    UrlDispatcher.add_routes = add_routes  # type: ignore[method-assign]


def _scan(modules: Iterable[Any]) -> None:
    for module in modules:
        if isinstance(module, types.ModuleType):
            for value in list(module.__dict__.values()):
                if isinstance(value, web.Application):
                    _APPS.add(value)


def _routers() -> Iterator[tuple[UrlDispatcher, str]]:
    """Every known app's router and its sub-applications', each with the prefix its routes carry;
    then the routers route tables were added to."""
    seen: set[int] = set()
    stack: list[tuple[web.Application, str]] = [(app, "") for app in list(_APPS)]
    while stack:
        app, prefix = stack.pop()
        router = app.router
        if id(router) in seen:
            continue
        seen.add(id(router))
        yield router, prefix
        for resource in router._resources:
            if isinstance(resource, PrefixedSubAppResource):
                stack.append((resource._app, resource.canonical))
            elif isinstance(resource, MatchedSubAppResource):
                stack.append((resource._app, prefix))
    for owners in list(_TABLES.values()):
        for router in owners:
            if id(router) not in seen:
                seen.add(id(router))
                yield router, ""


def _handler(route: Any) -> Any:
    handler = route.handler
    return getattr(handler, "__wrapped__", handler)


def _live(fn: Any) -> Any:
    qualname = getattr(fn, "__qualname__", "")
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or not qualname or "<" in qualname:
        return fn if module is not None else _MISSING
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _renewed(fn: Any) -> Any:
    """The live handler of the same name when a changed statement made ``fn`` anew, else None."""
    if not inspect.isfunction(fn):
        return None
    live = _live(fn)
    return live if inspect.isfunction(live) and live is not fn and live.__qualname__ == fn.__qualname__ else None


# ------------------------------------------------------------------------------------- hooks


def _app_modules(names: Iterable[str]) -> list[Any]:
    """The live modules of the packages these modules belong to (where the app keeps its objects)."""
    tops = {name.partition(".")[0] for name in names}
    return [m for name, m in list(sys.modules.items()) if name.partition(".")[0] in tops]



def _before(push: Push) -> None:
    if not push.reran and not push.removed:
        return
    reran = frozenset(push.reran) | frozenset(push.removed)
    _scan(_app_modules(reran))
    state = _Before(push, reran)
    for router, prefix in _routers():
        state.routers[id(router)] = (router, list(router._resources), prefix, router.frozen)
        state.routes.update(id(route) for route in router.routes())
        _journal_router(push, router)
        if router.frozen:
            push.setattr(router, "_frozen", False)  # changed statements may add routes
    for name in reran:
        for key, value in list(getattr(sys.modules.get(name), "__dict__", {}).items()):
            if isinstance(value, web.RouteTableDef):
                state.tables[id(value)] = (value, list(value))
                push.on_undo(functools.partial(_restore_list, value._items, list(value._items)))
            elif isinstance(value, web.Application):
                state.bound[(name, key)] = value
    _PENDING[push] = state


def _journal_router(push: Push, router: UrlDispatcher) -> None:
    """Undo puts back the router's tables and each resource's routes, in place."""
    push.on_undo(functools.partial(_restore_list, router._resources, list(router._resources)))
    push.on_undo(functools.partial(_restore_list, router._matched_sub_app_resources,
                                   list(router._matched_sub_app_resources)))
    push.snapshot(router._named_resources)
    push.on_undo(functools.partial(_reindex, router))
    for resource in router._resources:
        if isinstance(resource, Resource):
            push.snapshot(resource._routes)
            push.snapshot(resource.__dict__)


def _restore_list(target: list[Any], saved: list[Any]) -> None:
    target[:] = saved


def _reindex(router: UrlDispatcher) -> None:
    """Build the router's path index again from its resources (aiohttp ≥ 3.10 keeps one)."""
    if not hasattr(router, "_resource_index"):
        return
    router._resource_index.clear()
    for resource in router._resources:
        if not isinstance(resource, MatchedSubAppResource):
            router.index_resource(resource)


def _after(push: Push) -> None:
    state = _PENDING.pop(push, None)
    if state is None or state.push is not push:
        return
    renewed = _add_table_routes(push, state)
    renewed.update(_repoint(push, state))
    for router, saved, prefix, frozen in state.routers.values():
        old = {id(r) for r in saved}
        for resource in router._resources:
            if id(resource) not in old:
                if prefix:
                    resource.add_prefix(prefix)  # as add_subapp did to the routes it found
                resource.freeze()
        _drop_stale_routes(router, state, renewed)
        _reindex(router)
        if frozen:
            push.setattr(router, "_frozen", True)
    _report(push, state)


def _add_table_routes(push: Push, state: _Before) -> set[int]:
    """New RouteDefs of a table that ran again go to every router the table was added to; returns
    the live handlers whose decorator ran again."""
    renewed_all: set[int] = set()
    for table, saved in state.tables.values():
        old = {id(d) for d in saved}
        new = [d for d in table if id(d) not in old]
        if not new:
            continue
        # a handler whose decorator ran again: its old definition leaves the table, the new one
        # names the live handler
        renewed = {id(live): live for d in new if (live := _renewed(getattr(d, "handler", None))) is not None}
        kept: list[Any] = []
        for d in table._items:
            handler = getattr(d, "handler", None)
            if id(d) in old and id(handler) in renewed:
                continue
            live = _renewed(handler) if id(d) not in old else None
            kept.append(web.RouteDef(d.method, d.path, live, d.kwargs) if live is not None else d)  # type: ignore[attr-defined]
        table._items[:] = kept
        renewed_all.update(renewed)
        new = [d for d in kept if id(d) not in old]
        owners = list(_TABLES.get(table, ())) or _owners(saved)
        if not owners:
            push.not_live(f"{_where(table)}: {len(new)} new route(s) ({_defs(new)}) in a RouteTableDef no "
                          "running app added", _RESTART)
            continue
        for router in owners:
            for d in new:
                d.register(router)
    return renewed_all


def _owners(saved: list[Any]) -> list[UrlDispatcher]:
    """Routers serving every route of a table (its add_routes() ran before habanero could see it)."""
    defs = [d for d in saved if hasattr(d, "handler")]
    if not defs:
        return []
    found = []
    for router, _ in _routers():
        handlers = {(r.method, id(_handler(r))) for r in router.routes()}
        if all((d.method, id(d.handler)) in handlers for d in defs):
            found.append(router)
    return found


def _repoint(push: Push, state: _Before) -> set[int]:
    """A route whose handler is not the object its module keeps (made anew by a changed statement)
    calls the live one; returns the live handlers that a changed statement registered anew."""
    renewed: set[int] = set()
    for router, _, _, _ in state.routers.values():
        for route in router.routes():
            live = None if hasattr(route.handler, "__wrapped__") else _renewed(route.handler)
            if live is not None:
                push.setattr(route, "_handler", live)
                if id(route) not in state.routes:
                    renewed.add(id(live))
    return renewed


def _drop_stale_routes(router: UrlDispatcher, state: _Before, renewed: set[int]) -> None:
    """A route that existed before the push goes if its handler was deleted from a module that ran
    again, or if the handler's decorator ran again and registered it anew (on another path)."""
    for resource in list(router._resources):
        routes = getattr(resource, "_routes", None)
        if not isinstance(resource, Resource) or not isinstance(routes, dict):
            continue
        for method, route in list(routes.items()):
            handler = _handler(route)
            if id(route) not in state.routes or getattr(handler, "__module__", None) not in state.reran:
                continue
            if _live(handler) is _MISSING or id(handler) in renewed or _unrouted(state.push, handler):
                del routes[method]
                if resource._any_route is route:
                    resource._any_route = None
                resource._allowed_methods = resource._allowed_methods - {method}  # the snapshot keeps the old set
        if not routes:
            router._resources.remove(resource)
            if resource.name is not None:
                router._named_resources.pop(resource.name, None)


def _unrouted(push: Push, fn: Any) -> bool:
    """Whether the push changed the decorators of ``fn`` and the old ones routed it (a
    ``RouteTableDef`` decorator): the route they made goes, as after a fresh start."""
    changed = push.decorators_changed(fn)
    return changed is not None and calls_any(changed[0], _ROUTE_DECORATORS)


def _report(push: Push, state: _Before) -> None:
    for (module, name), old in state.bound.items():
        new = getattr(sys.modules.get(module), name, None)
        if new is not old and isinstance(new, web.Application):
            push.not_live(f"{module}.{name}: a changed statement made a new web.Application; the server keeps "
                          "serving the one it started with", _RESTART)
    for report in push.modules:
        for qualname in report.patched:
            obj: Any = sys.modules.get(report.module)
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if inspect.isfunction(obj) and _REGISTERS & set(obj.__code__.co_names):
                push.not_live(f"{report.module}.{qualname}: it registers routes and was changed; what it "
                              "registered before the push stays as it was", _RESTART)


def _where(table: web.RouteTableDef) -> str:
    for name, module in list(sys.modules.items()):
        for key, value in list(getattr(module, "__dict__", {}).items()):
            if value is table:
                return f"{name}.{key}"
    return "a RouteTableDef"


def _defs(defs: list[Any]) -> str:
    return ", ".join(f"{getattr(d, 'method', '')} {getattr(d, 'path', getattr(d, 'prefix', ''))}" for d in defs)


_record_add_routes()
_scan(list(sys.modules.values()))
register("aiohttp", before=_before, after=_after, when="aiohttp.web")
