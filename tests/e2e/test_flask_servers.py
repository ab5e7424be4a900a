"""examples/flask_app under real servers: a push adds a route and a blueprint route and changes a
template, and every process serves them on its next request; what cannot go live is in the CLI's
output and its ``--json``.

The app runs as shipped (its store and trust in the test's directory) under gunicorn's worker
processes and under ``flask run``; the developer edits and pushes a copy with the real CLI.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.e2e import EXAMPLES, TIMEOUT, DevProject, Launcher, free_port, make_project, request, status_of

pytestmark = pytest.mark.slow  # real servers, real worker processes, the real CLI

GUNICORN_READY = re.compile(r"Listening at: (?P<url>http://[\d.]+:\d+)")
SERVED_BY = re.compile(r"served by worker (\d+)")


def _edit_routes_and_template(project: DevProject) -> None:
    project.append("shop/views.py", '\n\n@app.get("/hello")\ndef hello():\n'
                                    '    return jsonify(message="a new route", pid=os.getpid())\n')
    project.append("shop/catalog.py", '\n\n@catalog.get("/sale")\ndef sale():\n'
                                      '    return {"sale": ITEMS[:1], "pid": os.getpid()}\n')
    project.edit("shop/templates/catalog.html", "<h1>Catalog</h1>", "<h1>Catalog, pushed</h1>")


def _from_every_worker(url: str, path: str, pids: set[int], read: Callable[[bytes], tuple[int, Any]]
                       ) -> dict[int, Any]:
    """What each process in ``pids`` answers at ``path``, asking until each has answered."""
    seen: dict[int, Any] = {}
    for _ in range(2000):
        reply = request(url, path)
        assert reply.status == 200, (path, reply)
        pid, answer = read(reply.body)
        seen.setdefault(pid, answer)
        if pids <= set(seen):
            return seen
    raise AssertionError(f"only {sorted(seen)} of {sorted(pids)} answered {path}")


def _json(body: bytes) -> tuple[int, Any]:
    data = json.loads(body)
    return data["pid"], data


def _html(body: bytes) -> tuple[int, Any]:
    text = body.decode()
    found = SERVED_BY.search(text)
    assert found, text
    return int(found[1]), text


def _serves_the_push(url: str, pids: set[int]) -> None:
    hello = _from_every_worker(url, "/hello", pids, _json)
    assert {a["message"] for a in hello.values()} == {"a new route"}
    sale = _from_every_worker(url, "/catalog/sale", pids, _json)  # under the prefix it was registered with
    assert {tuple(a["sale"]) for a in sale.values()} == {("green tea",)}
    pages = _from_every_worker(url, "/catalog/", pids, _html)
    assert all("<h1>Catalog, pushed</h1>" in page for page in pages.values()), pages


def _workers(project: DevProject, url: str, count: int) -> set[int]:
    for _ in range(int(TIMEOUT / 0.1)):
        try:
            pids = {w["pid"] for w in status_of(project, url)["workers"]}
        except (AssertionError, OSError):
            pids = set()
        if len(pids) == count:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not join")


def test_gunicorn_workers_serve_pushed_routes_blueprint_routes_and_templates_and_report_what_is_not_live(
        launcher: Launcher, tmp_path) -> None:
    project = make_project(tmp_path / "shop", "flask_app")
    argv = [sys.executable, "-m", "gunicorn", "wsgi:app", "-w", "2", "-b", "127.0.0.1:0",
            "--chdir", str(EXAMPLES / "flask_app"), "--graceful-timeout", "5"]
    app = launcher.start(argv, env=project.app_env(), cwd=project.root.parent, name="gunicorn",
                         ready=GUNICORN_READY)
    pids = _workers(project, app.url, 2)
    first = _from_every_worker(app.url, "/catalog/", pids, _html)  # each worker rendered (cached) it
    assert all("<h1>Catalog</h1>" in page for page in first.values())
    _edit_routes_and_template(project)

    pushed = project.push(app.url)

    assert "NOT LIVE" not in pushed.stdout, pushed.stdout
    _serves_the_push(app.url, pids)

    project.edit("shop/views.py", "app = Flask(__name__)", 'app = Flask(__name__, static_url_path="/assets")')
    said = project.push(app.url)
    project.edit("shop/views.py", 'static_url_path="/assets"', 'static_url_path="/files"')
    as_json = json.loads(project.push(app.url, "--json").stdout)

    assert re.search(r"^  NOT LIVE \(flask\): shop\.views\.app: the Flask app was created again by a changed "
                     r"statement; .*; restart the app", said.stdout, re.M), said.stdout
    assert [(n["source"], n["what"].split(":")[0]) for n in as_json["report"]["not_live"]] == [
        ("flask", "shop.views.app")]
    assert "restart the app" in as_json["report"]["not_live"][0]["fix"]
    _serves_the_push(app.url, pids)  # the app the server started with still serves


def test_flask_run_serves_pushed_routes_blueprint_routes_and_templates(launcher: Launcher, tmp_path) -> None:
    project = make_project(tmp_path / "shop", "flask_app")
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", "wsgi:app", "run", "--port", str(port)]
    app = launcher.start(argv, env=project.app_env(), cwd=EXAMPLES / "flask_app", name="flask run",
                         ready=re.compile(rf"Running on (?P<url>http://127\.0\.0\.1:{port})"))
    pid = _html(request(app.url, "/catalog/").body)[0]
    _edit_routes_and_template(project)

    pushed = project.push(app.url)

    assert "NOT LIVE" not in pushed.stdout, pushed.stdout
    _serves_the_push(app.url, {pid})
