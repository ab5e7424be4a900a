"""FastAPI and Starlette (``overlay.integrations.starlette``): a push rebuilds what the routes analysed.

Each test starts a FastAPI app as a package served by a real overlay, pushes a new version of its
source and asks the app, through ASGI, what it serves now.
"""

from __future__ import annotations

from collections.abc import Iterator

import fastapi  # noqa: F401  (imported once for the whole run: the import state fixture keeps it)
import pytest
from support.frameworks import Live, asgi_get

import overlay
import overlay.integrations.starlette  # noqa: F401  (loaded with its framework, as in an app)
from overlay.errors import ActivationFailed

PACKAGE = "fastshop"

MAIN = '''
from fastapi import APIRouter, Depends, FastAPI

app = FastAPI()
router = APIRouter()


def user() -> str:
    return "ada"


@app.get("/hello")
def hello(name: str = "world") -> dict:
    return {"hello": name}


@router.get("/items")
def items(who: str = Depends(user)) -> dict:
    return {"who": who}


app.include_router(router, prefix="/api")
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


def started(live: Live, main: str = MAIN) -> object:
    live.start({"main": main}, "main")
    app = live.module("main").app
    assert asgi_get(app, "/hello")[0] == 200  # started: the middleware stack is built
    return app


def test_a_new_query_parameter_is_read_after_the_push(live):
    app = started(live)
    live.push({"main": MAIN.replace('def hello(name: str = "world") -> dict:\n    return {"hello": name}',
                                    'def hello(name: str = "world", shout: bool = False) -> dict:\n'
                                    '    return {"hello": name.upper() if shout else name, "shout": shout}')})

    assert asgi_get(app, "/hello", "name=bo&shout=true") == (200, {"hello": "BO", "shout": True})
    assert live.module("main").hello in [r.endpoint for r in app.router.routes if hasattr(r, "endpoint")]


def test_a_changed_dependency_is_used_by_a_route_of_an_included_router(live):
    app = started(live)
    assert asgi_get(app, "/api/items") == (200, {"who": "ada"})
    live.push({"main": MAIN.replace('def user() -> str:\n    return "ada"',
                                    'def user(token: str = "none") -> str:\n    return "user:" + token')})

    assert asgi_get(app, "/api/items", "token=t1") == (200, {"who": "user:t1"})


def test_routes_added_to_the_app_and_to_an_included_router_are_served_and_in_openapi(live):
    app = started(live)
    assert "/api/more" not in asgi_get(app, "/openapi.json")[1]["paths"]
    live.push({"main": MAIN + '''

@app.get("/new")
def new() -> dict:
    return {"new": True}


@router.get("/more")
def more() -> dict:
    return {"more": True}
'''})

    assert asgi_get(app, "/new") == (200, {"new": True})
    assert asgi_get(app, "/api/more") == (200, {"more": True})
    assert {"/new", "/api/more"} <= set(asgi_get(app, "/openapi.json")[1]["paths"])


def test_a_changed_path_moves_the_route_and_a_deleted_endpoint_loses_its_route(live):
    app = started(live)
    hello = live.module("main").hello
    source = MAIN.replace('@app.get("/hello")', '@app.get("/greet")')
    source = source.replace('@router.get("/items")\ndef items(who: str = Depends(user)) -> dict:\n'
                            '    return {"who": who}\n', '')
    live.push({"main": source})

    assert asgi_get(app, "/greet", "name=x") == (200, {"hello": "x"})
    assert asgi_get(app, "/hello")[0] == 404
    assert asgi_get(app, "/api/items")[0] == 404
    greet = [r for r in app.router.routes if getattr(r, "path", None) == "/greet"]
    assert len(greet) == 1 and greet[0].endpoint is hello  # the live function, which later pushes patch
    paths = asgi_get(app, "/openapi.json")[1]["paths"]
    assert "/greet" in paths and "/hello" not in paths and "/api/items" not in paths


def test_a_changed_return_annotation_changes_the_response_model(live):
    app = started(live, MAIN + '\n\n@app.get("/n")\ndef n() -> int:\n    return "3"\n')
    assert asgi_get(app, "/n") == (200, 3)
    live.push({"main": MAIN + '\n\n@app.get("/n")\ndef n() -> str:\n    return "3"\n'})

    assert asgi_get(app, "/n") == (200, "3")


def test_middleware_added_by_a_changed_statement_is_used(live):
    app = started(live)
    live.push({"main": MAIN + '''

from starlette.middleware.base import BaseHTTPMiddleware


async def stamp(request, call_next):
    response = await call_next(request)
    response.headers["x-stamp"] = "v2"
    return response


app.add_middleware(BaseHTTPMiddleware, dispatch=stamp)
'''})

    assert app.middleware_stack is None  # built again, with the new middleware, at the next request
    assert asgi_get(app, "/hello")[0] == 200
    assert any(m.cls.__name__ == "BaseHTTPMiddleware" for m in app.user_middleware)


def test_an_unchanged_middleware_stack_is_kept(live):
    app = started(live)
    stack = app.middleware_stack
    live.push({"main": MAIN.replace('"ada"', '"bob"')})

    assert app.middleware_stack is stack
    assert asgi_get(app, "/api/items") == (200, {"who": "bob"})


def test_a_failing_push_leaves_every_route_as_it_was(live):
    app = started(live)
    routes = list(app.router.routes)
    analysis = {id(r): dict(r.__dict__) for r in routes}
    with pytest.raises(ActivationFailed):
        live.push({"main": MAIN.replace('def hello(name: str = "world")', 'def hello(name: str = "world", n: int = 0)')
                   + '\n\n@app.get("/new")\ndef new() -> dict:\n    return {}\n\nraise RuntimeError("boom")\n'})

    assert app.router.routes == routes
    assert all(r.__dict__ == analysis[id(r)] for r in routes)
    assert asgi_get(app, "/new")[0] == 404
    assert asgi_get(app, "/hello", "n=x") == (200, {"hello": "world"})  # n is not read: the old analysis


def test_an_app_made_anew_by_a_changed_statement_is_reported_not_live(live):
    started(live)
    report = live.push({"main": MAIN.replace("app = FastAPI()", 'app = FastAPI(title="v2")')})

    assert [n["what"] for n in report.not_live] == [
        "fastshop.main.app: a changed statement made a new FastAPI; the server keeps serving the FastAPI it "
        "started with"]
    assert report.not_live[0]["source"] == "starlette" and "restart" in report.not_live[0]["fix"]


def test_a_changed_function_that_registered_routes_at_start_up_is_reported_not_live(live):
    source = MAIN + '\n\ndef setup(target):\n    target.add_api_route("/s", hello)\n\n\nsetup(app)\n'
    started(live, source)
    report = live.push({"main": source.replace('"/s"', '"/s2"')})

    assert [n["what"] for n in report.not_live] == [
        "fastshop.main.setup: it registers routes or middleware and was changed; what it registered before the "
        "push stays as it was"]


def test_a_push_that_changes_no_route_reports_nothing(live):
    app = started(live)
    report = live.push({"main": MAIN.replace('"ada"', '"eve"')})

    assert report.not_live == []
    assert asgi_get(app, "/api/items") == (200, {"who": "eve"})


def test_install_refuses_an_asgi_app_for_app_and_says_to_wrap_it(tmp_path, trusted_keys_file, import_state):
    with pytest.raises(overlay.ConfigError, match=r"app = ov\.asgi\(app\).*no second port"):
        overlay.install(packages=[PACKAGE], trusted_keys=trusted_keys_file, store=tmp_path / "s",
                        app=fastapi.FastAPI())
