"""Routes and signatures changed by a push, served by real servers: FastAPI under uvicorn's worker
processes, and the aiohttp example under its own ``serve.py``; every push through the real CLI.

The apps are ``examples/fastapi_app`` and ``examples/aiohttp_app`` as shipped; the developer's project
is a copy (``support.e2e``), and every process is stopped at teardown even when a test fails.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from support.e2e import EXAMPLES, get_json, make_project, request, start_example
from support.workers import UVICORN_READY, from_every_worker, wait_for_workers

pytestmark = pytest.mark.slow  # real servers, real worker processes, the real CLI

MAIN = "api/main.py"
VIEWS = "hello/views.py"


def test_a_new_query_parameter_and_a_new_route_reach_every_uvicorn_worker(launcher, tmp_path) -> None:
    project = make_project(tmp_path / "api", "fastapi_app")
    argv = [sys.executable, "-m", "uvicorn", "asgi:app", "--workers", "2", "--port", "0", "--host", "127.0.0.1",
            "--app-dir", str(EXAMPLES / "fastapi_app")]
    app = launcher.start(argv, env=project.app_env(), cwd=EXAMPLES / "fastapi_app", name="uvicorn",
                         ready=UVICORN_READY)
    pids = {w["pid"] for w in wait_for_workers(project, app, 2)}
    project.push(app.url)
    from_every_worker(app.url, pids)  # every worker has analysed index() as it was

    project.edit(MAIN, "def index() -> dict:", "def index(shout: bool = False) -> dict:")
    project.edit(MAIN, '"message": greeting(),', '"message": greeting().upper() if shout else greeting(), '
                                                 '"shout": shout,')
    project.append(MAIN, '\n\n@api.get("/new")\ndef new() -> dict:\n    return {"new": True, "pid": os.getpid()}\n')
    proc = project.push(app.url)

    assert "NOT LIVE" not in proc.stdout
    answers = from_every_worker(app.url, pids, "/?shout=true")
    assert {(a["message"], a["shout"]) for a in answers.values()} == {("HELLO, WORLD", True)}
    assert set(from_every_worker(app.url, pids, "/new")) == pids

    project.edit(MAIN, "api = FastAPI()", 'api = FastAPI(title="v3")')
    report = json.loads(project.push(app.url, "--json").stdout)
    assert [n["what"] for n in report["report"]["not_live"]] == [
        "api.main.api: a changed statement made a new FastAPI; the server keeps serving the FastAPI it started with"]


def test_a_route_added_to_the_aiohttp_example_is_served_and_a_not_live_change_is_named(launcher, tmp_path) -> None:
    project = make_project(tmp_path / "hello", "aiohttp_app")
    app = start_example(launcher, project)
    project.push(app.control)
    assert request(app.url, "/new").status == 404

    project.append(VIEWS, '\n\n@routes.get("/new")\nasync def new(request: web.Request) -> web.Response:\n'
                          '    return web.json_response({"new": True})\n')
    project.push(app.control)
    assert get_json(app.url, "/new") == {"new": True}
    assert get_json(app.url)["message"] == "Hello, world"

    project.append(VIEWS, '\n\ndef setup(app: web.Application) -> None:\n    app.router.add_get("/s", index)\n')
    project.push(app.control)
    project.edit(VIEWS, 'add_get("/s"', 'add_get("/s2"')
    proc = project.push(app.control)
    assert re.search(r"^  NOT LIVE \(aiohttp\): hello\.views\.setup: it registers routes and was changed; what it "
                     r"registered before the push stays as it was; restart the app to apply it$", proc.stdout, re.M)
