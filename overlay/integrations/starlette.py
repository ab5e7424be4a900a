"""FastAPI and Starlette: routes, their request analysis and the middleware stack, rebuilt by a push.

What each framework keeps that re-running a module does not rebuild:

* **FastAPI analyses an endpoint once**, when its route is made: the parameters it reads (query,
  path, body, dependencies), the response model, the handler built from them. A push patches the
  endpoint in place (same object, new code), so the route would keep reading the old signature.
  Every ``APIRoute`` whose endpoint or any dependency in its tree was patched gets its analysis
  built afresh, in place (the route object stays; its ``__dict__`` is journaled), and the
  included-router and OpenAPI caches are invalidated.
* **A route's path changed** (its decorator ran again): the old route of that endpoint goes, as it
  would after a fresh start, and the new one calls the live endpoint (the object the module keeps).
  **An endpoint deleted** from a module that ran again: its route goes.
* **Routes added** to the app or to an included ``APIRouter`` are served as they are added: Starlette
  matches each request against the route list, and FastAPI's included routers follow theirs.
* **The middleware stack** is built at the first request: a changed statement that adds middleware
  or an exception handler gets it rebuilt.

Reported as not live (:meth:`Push.not_live`): an app or router object created anew by a changed
statement (the server keeps the one it started with), a changed function that registers routes
(``add_api_route``, ``include_router``...) that nothing calls again, a route whose analysis cannot
be rebuilt. A push that fails puts every route list, route and stack back as it was.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route, Router

from overlay.integrations.hooks import Push, calls_any, register
from overlay.integrations.known import Known

log = logging.getLogger(__name__)

_APPS = Known()  # Starlette apps (FastAPI ones too)
_ROUTERS = Known()  # routers bound in the app's modules
_MISSING = object()
#: Calls that register routes: a changed function making them, which ran at start-up, is not re-run.
_REGISTERS = frozenset({"add_api_route", "add_route", "include_router", "mount", "add_api_websocket_route",
                        "add_websocket_route", "api_route", "add_middleware", "add_exception_handler"})
_RESTART = "restart the app to apply it"
_ROUTE_DECORATORS = frozenset({"get", "post", "put", "patch", "delete", "options", "head", "trace", "api_route",
                               "route", "websocket", "websocket_route"})


@dataclass
class _Before:
    """What the ``before`` hook saw, for the ``after`` hook of the same push."""

    push: Push
    reran: frozenset[str]
    routes: dict[int, tuple[Router, list[BaseRoute]]] = field(default_factory=dict)
    #: APIRoutes that read a function of a module that runs again: the functions' state, and
    #: whether FastAPI inferred the response model and description (to infer them again).
    watched: dict[int, tuple[Any, list[tuple[Any, tuple[Any, ...]]], bool, bool]] = field(default_factory=dict)
    stacks: dict[int, tuple[Starlette, Any, list[Any], dict[Any, Any]]] = field(default_factory=dict)
    bound: dict[tuple[str, str], Any] = field(default_factory=dict)


#: The before hook's findings, for the after hook of the same push (a push that fails between the
#: two leaves nothing behind: the entry goes with the push).
_PENDING: weakref.WeakKeyDictionary[Push, _Before] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------- discovery


def _scan(modules: Iterable[types.ModuleType | None]) -> None:
    """Remember the apps and routers bound in these modules' namespaces."""
    for module in modules:
        if not isinstance(module, types.ModuleType):
            continue
        for value in list(module.__dict__.values()):
            if isinstance(value, Starlette):
                _APPS.add(value)
            elif isinstance(value, Router):
                _ROUTERS.add(value)


def _routers() -> list[Router]:
    """Every router reachable from the known apps and routers: included routers and mounts too."""
    seen: dict[int, Router] = {}
    stack: list[Router] = [app.router for app in list(_APPS)] + list(_ROUTERS)
    while stack:
        router = stack.pop()
        if id(router) in seen:
            continue
        seen[id(router)] = router
        for route in router.routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included router
            if inner is None and isinstance(route, Mount):
                inner = route.app.router if isinstance(route.app, Starlette) else route.app
            if isinstance(inner, Router):
                stack.append(inner)
    return list(seen.values())


# ------------------------------------------------------------------------------------- functions


def _unwrap(call: Any) -> Any:
    while isinstance(call, functools.partial):
        call = call.func
    try:
        return inspect.unwrap(call)
    except ValueError:
        return call


def _functions(call: Any) -> Iterator[types.FunctionType]:
    """The Python functions whose signature FastAPI reads for ``call`` (a class: its ``__init__``)."""
    call = _unwrap(call)
    if isinstance(call, types.FunctionType):
        yield call
    elif isinstance(call, type) and isinstance(call.__dict__.get("__init__"), types.FunctionType):
        yield call.__dict__["__init__"]
    elif call is not None and isinstance(method := getattr(type(call), "__call__", None), types.FunctionType):  # noqa: B004
        yield method


def _state(fn: types.FunctionType) -> tuple[Any, ...]:
    return fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__annotations__


def _live(fn: Any) -> Any:
    """The object the module of ``fn`` binds at its qualified name now (``_MISSING`` if none)."""
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


def _renewed(endpoint: Any) -> Any:
    """The live function a route's endpoint should be: itself, or the object of the same name that
    the module kept when a changed statement made the endpoint anew (``None``: nothing to say)."""
    if not isinstance(endpoint, types.FunctionType):
        return None
    live = _live(endpoint)
    if isinstance(live, types.FunctionType) and live is not endpoint and live.__qualname__ == endpoint.__qualname__:
        return live
    return None


def _dependant_calls(dependant: Any) -> Iterator[Any]:
    stack = [dependant]
    while stack:
        d = stack.pop()
        yield d.call
        stack.extend(d.dependencies)


# ------------------------------------------------------------------------------------- FastAPI


def _fastapi() -> Any:
    return sys.modules.get("fastapi.routing")


def _api_route_class() -> type[Any]:
    routing = _fastapi()
    return routing.APIRoute if routing is not None else type(None)  # no FastAPI: no APIRoute


def _is_api_route(route: Any) -> bool:
    return isinstance(route, _api_route_class())


def _inferred_doc(endpoint: Any) -> str:
    return str(inspect.cleandoc(getattr(endpoint, "__doc__", None) or "").split("\f")[0].strip())


def _inferred_model(route: Any) -> bool:
    """Whether FastAPI took the route's response model from the endpoint's return annotation."""
    from fastapi.dependencies.utils import get_typed_return_annotation
    from starlette.responses import Response

    try:
        annotation = get_typed_return_annotation(route.endpoint)
    except Exception:  # an annotation that no longer resolves: FastAPI would say so on rebuild
        return False
    if isinstance(annotation, type) and issubclass(annotation, Response):
        annotation = None
    return bool(route.response_model == annotation)


@functools.cache
def _route_parameters() -> tuple[str, ...]:
    routing = _fastapi()
    names = inspect.signature(routing.APIRoute.__init__).parameters
    return tuple(n for n in names if n not in ("self", "path", "endpoint"))


def _rebuild_api_route(push: Push, route: Any, endpoint: Any, model_inferred: bool, doc_inferred: bool) -> None:
    """Analyse the route's endpoint again, in place: the route object stays, its state is new."""
    routing = _fastapi()
    kwargs = {name: getattr(route, name) for name in _route_parameters() if hasattr(route, name)}
    if model_inferred:
        kwargs.pop("response_model", None)
    if doc_inferred:
        kwargs.pop("description", None)
    fresh = object.__new__(type(route))  # its own get_route_handler(), if a route_class overrides it
    routing.APIRoute.__init__(fresh, route.path, endpoint, **kwargs)
    push.snapshot(route.__dict__)
    route.__dict__.update(fresh.__dict__)
    cache = getattr(routing, "_endpoint_context_cache", None)
    if isinstance(cache, dict) and id(endpoint) in cache:
        push.delitem(cache, id(endpoint))


def _rebuild_route(push: Push, route: Any, endpoint: Any) -> None:
    """A plain Starlette route, made again for the live endpoint."""
    fresh = Route(route.path, endpoint, methods=sorted(route.methods or ()) or None, name=route.name,
                  include_in_schema=route.include_in_schema)
    push.snapshot(route.__dict__)
    route.__dict__.update(fresh.__dict__)


def _clear_call_caches() -> None:
    """FastAPI caches per callable whether it is a coroutine or generator function: a patched one may
    have changed kind."""
    models = sys.modules.get("fastapi.dependencies.models")
    for value in list(getattr(models, "__dict__", {}).values()):
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def _touch(push: Push, router: Router) -> None:
    """Tell FastAPI's caches (included routers, OpenAPI) that the router's routes changed."""
    if hasattr(router, "_routes_version"):
        push.setattr(router, "_routes_version", router._routes_version + 1)


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
    for router in _routers():
        saved = list(router.routes)
        state.routes[id(router)] = (router, saved)
        push.on_undo(functools.partial(_restore_routes, router, saved))
        for route in saved:
            if isinstance(route, _api_route_class()):
                fns = [fn for call in _dependant_calls(route.dependant) for fn in _functions(call)]
                if any(fn.__module__ in reran for fn in fns):
                    state.watched[id(route)] = (route, [(fn, _state(fn)) for fn in fns], _inferred_model(route),
                                                route.description == _inferred_doc(route.endpoint))
    for app in list(_APPS):
        if app.middleware_stack is not None:  # let changed statements add middleware; rebuilt if they do
            state.stacks[id(app)] = (app, app.middleware_stack, list(app.user_middleware),
                                     dict(app.exception_handlers))
            push.setattr(app, "middleware_stack", None)
    for name in reran:
        for key, value in list(getattr(sys.modules.get(name), "__dict__", {}).items()):
            if isinstance(value, (Starlette, Router)):
                state.bound[(name, key)] = value
    if state.watched:
        push.on_undo(_clear_call_caches)
    _PENDING[push] = state


def _restore_routes(router: Router, saved: list[BaseRoute]) -> None:
    router.routes[:] = saved
    if hasattr(router, "_routes_version"):
        router._routes_version += 1  # a number no cache has seen


def _after(push: Push) -> None:
    state = _PENDING.pop(push, None)
    if state is None or state.push is not push:
        return
    touched: set[int] = set()
    _drop_replaced_and_removed(push, state, touched)
    rebuilt = _rebuild_changed(push, state, touched)
    for router_id in touched:
        _touch(push, state.routes[router_id][0] if router_id in state.routes else _find(router_id))
    if touched:
        for app in list(_APPS):
            if getattr(app, "openapi_schema", None) is not None:
                push.setattr(app, "openapi_schema", None)
    if rebuilt:
        _clear_call_caches()
    _middleware(push, state)
    _report_rebound(push, state)
    _report_registrars(push, state)


def _find(router_id: int) -> Router:
    return next(r for r in _routers() if id(r) == router_id)


def _drop_replaced_and_removed(push: Push, state: _Before, touched: set[int]) -> None:
    """Routes of an endpoint whose decorator ran again (the new route replaces them) and routes of
    an endpoint deleted from its module go, as after a fresh start."""
    renewed: dict[int, Any] = {}
    for router in _routers():
        old = {id(r) for r in state.routes.get(id(router), (router, []))[1]}
        for route in router.routes:
            if id(route) not in old:
                live = _renewed(getattr(route, "endpoint", None))
                if live is not None:
                    renewed[id(live)] = live
    for router in _routers():
        keep = []
        existed = {id(r) for r in state.routes.get(id(router), (router, []))[1]}
        for route in router.routes:
            endpoint = getattr(route, "endpoint", None)
            gone = (id(route) in existed and isinstance(endpoint, types.FunctionType)
                    and endpoint.__module__ in state.reran
                    and (id(endpoint) in renewed or _live(endpoint) is _MISSING
                         or _unrouted(push, endpoint)))
            if not gone:
                keep.append(route)
        if len(keep) != len(router.routes):
            router.routes[:] = keep  # the before hook's undo puts the list back
            touched.add(id(router))


def _unrouted(push: Push, fn: Any) -> bool:
    """Whether the push changed the decorators of ``fn`` and the old ones made its route (deleted
    or replaced: a route decorator still there made a new route, which is kept)."""
    changed = push.decorators_changed(fn)
    return changed is not None and calls_any(changed[0], _ROUTE_DECORATORS)


def _rebuild_changed(push: Push, state: _Before, touched: set[int]) -> int:
    """Analyse again every route whose endpoint or dependencies changed, or that should call the
    live endpoint rather than the object a changed statement made."""
    count = 0
    for router in _routers():
        before = {id(r) for r in state.routes.get(id(router), (router, []))[1]}
        for route in router.routes:
            endpoint = getattr(route, "endpoint", None)
            fresh = id(route) not in before or getattr(endpoint, "__module__", None) in state.reran
            live = _renewed(endpoint) if fresh else None
            watched = state.watched.get(id(route))
            changed = watched is not None and any(
                a is not b for fn, saved in watched[1] for a, b in zip(_state(fn), saved))
            if live is None and not changed:
                continue
            target = live or endpoint
            try:
                if _is_api_route(route):
                    model, doc = (watched[2], watched[3]) if watched else (True, True)
                    _rebuild_api_route(push, route, target, model, doc)
                elif isinstance(route, Route):
                    _rebuild_route(push, route, target)
                else:
                    continue
            except Exception as exc:  # FastAPI refuses the new signature: the push must not go live
                raise RuntimeError(f"route {_describe(route)}: FastAPI cannot analyse "
                                   f"{getattr(target, '__qualname__', target)} again: {exc}") from exc
            touched.add(id(router))
            count += 1
    return count


def _middleware(push: Push, state: _Before) -> None:
    for app, stack, middleware, handlers in state.stacks.values():
        if app.middleware_stack is None and list(app.user_middleware) == middleware and \
                dict(app.exception_handlers) == handlers:
            push.setattr(app, "middleware_stack", stack)  # nothing changed: keep the stack (and its state)
        # else: built again at the next request, with the new middleware and handlers


def _report_rebound(push: Push, state: _Before) -> None:
    for (module, name), old in state.bound.items():
        new = getattr(sys.modules.get(module), name, None)
        if new is not old and isinstance(new, type(old)):
            kind = type(old).__name__
            push.not_live(f"{module}.{name}: a changed statement made a new {kind}; the server keeps serving the "
                          f"{kind} it started with", _RESTART)


def _report_registrars(push: Push, state: _Before) -> None:
    """A changed function that registers routes: what its earlier calls registered is not redone."""
    for report in push.modules:
        module = sys.modules.get(report.module)
        for qualname in report.patched:
            obj: Any = module
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            fn = _unwrap(obj)
            if isinstance(fn, types.FunctionType) and _REGISTERS & set(fn.__code__.co_names) and \
                    not _is_endpoint(fn):
                push.not_live(f"{report.module}.{qualname}: it registers routes or middleware and was changed; "
                              "what it registered before the push stays as it was", _RESTART)


def _is_endpoint(fn: Any) -> bool:
    return any(getattr(route, "endpoint", None) is fn for router in _routers() for route in router.routes)


def _describe(route: Any) -> str:
    methods = ",".join(sorted(getattr(route, "methods", None) or ())) or "ANY"
    return f"{methods} {getattr(route, 'path', '?')}"


_scan(list(sys.modules.values()))
register("starlette", before=_before, after=_after, when="starlette.routing")
