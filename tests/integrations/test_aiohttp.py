"""aiohttp (``overlay.integrations.aiohttp``): routes a push adds, moves or deletes, on a frozen router.

The app is built and frozen (as ``AppRunner.setup()`` does at start-up) by a module of a package a
real overlay serves; requests are resolved by the app's own router.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from support.frameworks import Live

import overlay
import overlay.integrations.aiohttp  # noqa: F401  (loaded with its framework, as in an app)
from overlay.errors import ActivationFailed

PACKAGE = "aioshop"

VIEWS = '''
from aiohttp import web

routes = web.RouteTableDef()


@routes.get("/")
async def index(request):
    return web.json_response({"index": 1})


async def direct(request):
    return web.json_response({"direct": 1})
'''

APP = '''
from aiohttp import web

from aioshop import views

app = web.Application()
app.add_routes(views.routes)
app.router.add_get("/direct", views.direct)
app.freeze()
'''


@pytest.fixture
def live(import_state, tmp_path, trusted_keys_file, signing_key, monkeypatch) -> Iterator[Live]:
    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)
    ov = overlay.install(packages=[PACKAGE], trusted_keys=trusted_keys_file, store=tmp_path / "store")
    try:
        yield Live(ov, signing_key, PACKAGE)
    finally:
        ov.uninstall()


def get(app: web.Application, path: str) -> tuple[int, Any]:
    async def go() -> tuple[int, Any]:
        request = make_mocked_request("GET", path, app=app)
        match = await app.router.resolve(request)
        if match.http_exception is not None:
            return match.http_exception.status, None
        response = await match.handler(request)
        return response.status, response.text

    return asyncio.run(go())


def started(live: Live, views: str = VIEWS, app: str = APP) -> web.Application:
    live.start({"views": views, "app": app}, "app")
    application = live.module("app").app
    assert application.router.frozen and get(application, "/")[0] == 200
    return application


def test_a_route_added_to_a_route_table_is_served_by_the_frozen_app(live):
    app = started(live)
    live.push({"views": VIEWS + '\n\n@routes.get("/new")\nasync def new(request):\n'
                                '    return web.json_response({"new": 1})\n', "app": APP})

    assert get(app, "/new") == (200, '{"new": 1}')
    assert app.router.frozen


def test_a_changed_path_moves_the_route_to_the_live_handler(live):
    app = started(live)
    index = live.module("views").index
    live.push({"views": VIEWS.replace('@routes.get("/")', '@routes.get("/home")'), "app": APP})

    assert get(app, "/home")[0] == 200 and get(app, "/")[0] == 404
    assert [r.handler for r in app.router.routes() if r.resource.canonical == "/home"] == [index, index]  # GET, HEAD
    assert [d.handler for d in live.module("views").routes] == [index]


def test_a_deleted_handler_loses_its_route(live):
    app = started(live)
    live.push({"views": VIEWS.replace('async def direct(request):\n    return web.json_response({"direct": 1})\n',
                                      ''),
               "app": APP.replace('app.router.add_get("/direct", views.direct)\n', '')})

    assert get(app, "/direct")[0] == 404
    assert get(app, "/")[0] == 200


def test_a_failing_push_leaves_the_router_exactly_as_it_was(live):
    app = started(live)
    resources = list(app.router._resources)
    index = dict(app.router._resource_index)
    with pytest.raises(ActivationFailed):
        live.push({"views": VIEWS.replace('@routes.get("/")', '@routes.get("/home")')
                   + '\n\n@routes.get("/new")\nasync def new(request):\n    return web.Response()\n'
                   + '\nraise RuntimeError("boom")\n', "app": APP})

    assert app.router._resources == resources and app.router._resource_index == index
    assert app.router.frozen
    assert len(live.module("views").routes) == 1
    assert get(app, "/")[0] == 200 and get(app, "/new")[0] == 404 and get(app, "/home")[0] == 404


def test_a_changed_setup_function_is_reported_not_live_by_name(live):
    app_source = APP.replace("app.freeze()", 'def setup(app):\n    app.router.add_get("/s", views.direct)\n\n\n'
                                             'setup(app)\napp.freeze()')
    started(live, app=app_source)
    report = live.push({"views": VIEWS, "app": app_source.replace('"/s"', '"/s2"')})

    assert [(n["source"], n["what"]) for n in report.not_live] == [
        ("aiohttp", "aioshop.app.setup: it registers routes and was changed; what it registered before the push "
                    "stays as it was")]


def test_a_route_table_no_app_added_is_reported_not_live(live):
    started(live, views=VIEWS + '\nspare = web.RouteTableDef()\n')
    report = live.push({"views": VIEWS + '\nspare = web.RouteTableDef()\n\n\n@spare.get("/spare")\n'
                                         'async def spare_view(request):\n    return web.Response()\n',
                        "app": APP})

    assert [n["what"] for n in report.not_live] == [
        "aioshop.views.spare: 1 new route(s) (GET /spare) in a RouteTableDef no running app added"]


def test_a_push_that_changes_only_a_handler_body_reports_nothing(live):
    app = started(live)
    report = live.push({"views": VIEWS.replace('{"index": 1}', '{"index": 2}'), "app": APP})

    assert report.not_live == [] and get(app, "/") == (200, '{"index": 2}')
