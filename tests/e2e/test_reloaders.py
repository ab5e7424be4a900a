"""Dev servers with their reloaders on, wired as the README says: a push is not an edit.

Each server runs an example as shipped (its files never change during the test); the developer
edits and pushes from a copy. A push must reach the app without the reloader restarting it: the
same process answers, with its in-memory state, and the new code.
"""

from __future__ import annotations

import re
import shutil
import sys
import time

import pytest
from support.e2e import EXAMPLES, TIMEOUT, DevProject, Launcher, free_port, get_json, make_project

pytestmark = pytest.mark.slow  # real dev servers, their reloaders, the real CLI

GREETING = 'return "Hello, world"'


def push_is_not_an_edit(launcher: Launcher, project: DevProject, argv: list[str], ready: str, views: str,
                        entry: str) -> None:
    """Pushes leave the same process serving; an edit of the app's own entry file restarts it (the
    reloader does watch), into the pushed version."""
    port = free_port()
    here = project.root.parent / "app"  # the app's own copy, which its reloader watches
    shutil.copytree(EXAMPLES / project.example, here, ignore=shutil.ignore_patterns("__pycache__", ".habanero"))
    app = launcher.start([sys.executable, *[a.format(port=port) for a in argv]], env=project.app_env(),
                         cwd=here, name=argv[1], ready=re.compile(ready.format(port=port)))
    url = f"http://127.0.0.1:{port}"
    first = _served(url)
    assert first["message"] == "Hello, world"
    for n, greeting in enumerate(("Hello, pushed", "Hello, again"), start=1):
        project.edit(views, 'return "Hello, world"' if n == 1 else 'return "Hello, pushed"', f'return "{greeting}"')
        project.push(url)
        time.sleep(1.5)  # a reloader polls once a second: give it the chance to (wrongly) restart
        now = _served(url)
        assert now["message"] == greeting
        assert now["pid"] == first["pid"], f"the app restarted:\n{app.output}"
        assert now["hits"] == first["hits"] + n, "the app's memory was lost"
    with (here / entry).open("a", encoding="utf-8") as fh:
        fh.write("\n# an edit on disk\n")
    deadline = time.monotonic() + TIMEOUT
    while (restarted := _served(url))["pid"] == first["pid"]:
        assert time.monotonic() < deadline, f"the reloader did not restart the app on an edit:\n{app.output}"
        time.sleep(0.2)
    assert restarted["message"] == "Hello, again"  # the restart serves the pushed version from the store


def _served(url: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return get_json(url)
        except OSError:
            assert time.monotonic() < deadline, f"{url} does not answer"
            time.sleep(0.1)


def test_flask_debug_server_takes_pushes_without_reloading(launcher, tmp_path) -> None:
    project = make_project(tmp_path / "flask", "flask_app")
    push_is_not_an_edit(launcher, project, ["-m", "flask", "--app", "wsgi:app", "run", "--debug", "--port", "{port}"],
                        r"Debugger is active|Running on (?P<url>http://127\.0\.0\.1:{port})", "shop/views.py",
                        "wsgi.py")


def test_django_runserver_takes_pushes_without_reloading(launcher, tmp_path) -> None:
    project = make_project(tmp_path / "django", "django_app")
    push_is_not_an_edit(launcher, project, ["manage.py", "runserver", "{port}"],
                        r"Starting development server at (?P<url>http://127\.0\.0\.1:{port})/", "polls/views.py",
                        "wsgi.py")


def test_uvicorn_reload_takes_pushes_without_reloading(launcher, tmp_path) -> None:
    project = make_project(tmp_path / "api", "fastapi_app")
    push_is_not_an_edit(launcher, project, ["-m", "uvicorn", "asgi:app", "--reload", "--port", "{port}"],
                        r"Application startup complete|Uvicorn running on (?P<url>http://127\.0\.0\.1:{port})",
                        "api/main.py", "asgi.py")
