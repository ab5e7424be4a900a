"""examples/django_app as its README runs it: ``manage.py migrate``, then gunicorn workers or
``manage.py runserver`` (its reloader on), pushes through the real CLI.

The app runs from a copy of the example (its database is written next to ``wsgi.py``); the
developer edits and pushes from another. What each worker serves is read from the worker itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.e2e import EXAMPLES, TIMEOUT, DevProject, Launcher, free_port, get_json, make_project, request
from support.workers import GUNICORN_READY, from_every_worker, wait_for_workers

pytestmark = pytest.mark.slow  # real servers, real worker processes, the real CLI

RUNSERVER_READY = r"Starting development server at (?P<url>http://127\.0\.0\.1:{port})/"


@pytest.fixture
def run() -> Iterator[Path]:
    """A runtime directory of the test's own, where the app's source trees are: short, for the Unix
    sockets beside them."""
    path = Path(tempfile.mkdtemp(prefix="hbrt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def migrated_copy(project: DevProject, env: dict[str, str] | None = None) -> Path:
    """The app's own copy of the example, its database created by ``manage.py migrate`` (run with
    ``env``, the app's: every process of a store meets in one runtime directory)."""
    here = project.root.parent / "app"
    shutil.copytree(EXAMPLES / "django_app", here,
                    ignore=shutil.ignore_patterns("__pycache__", ".habanero", "*.sqlite3"))
    proc = subprocess.run([sys.executable, "manage.py", "migrate"], cwd=here, env=env or project.app_env(), text=True,
                          capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return here


def edit_app(project: DevProject) -> None:
    """A template, a model method and a new URL (with its view), in one push."""
    project.edit("polls/templates/polls/questions.html", "<ul>", '<ul class="pushed">')
    project.edit("polls/models.py", 'return f"Q: {self.text}"', 'return f"Question: {self.text}"')
    project.edit("polls/urls.py", 'path("questions/", views.questions),',
                 'path("questions/", views.questions),\n    path("count/", views.count),')
    project.append("polls/views.py", "\n\ndef count(request):\n"
                   "    return JsonResponse({'count': Question.objects.count(), 'pid': os.getpid()})\n")


def test_gunicorn_workers_serve_pushed_urls_templates_and_models_and_a_settings_change_is_reported(
        launcher: Launcher, tmp_path: Path, run: Path) -> None:
    project = make_project(tmp_path / "django", "django_app")
    env = project.app_env(HABANERO_RUNTIME_DIR=str(run))
    here = migrated_copy(project, env)
    app = launcher.start([sys.executable, "-m", "gunicorn", "wsgi", "-w", "2", "-b", "127.0.0.1:0",
                          "--graceful-timeout", "5"], env=env, cwd=here, name="gunicorn",
                         ready=GUNICORN_READY)
    pids = {w["pid"] for w in wait_for_workers(project, app, 2)}
    before = from_every_worker(app.url, pids, "/questions/")
    assert {b["html"] for b in before.values()} == {"<ul><li>Q: Tea or coffee?</li></ul>\n"}
    assert request(app.url, "/count/").status == 404

    edit_app(project)
    project.push(app.url)

    after = from_every_worker(app.url, pids, "/questions/")
    assert {a["html"] for a in after.values()} == {'<ul class="pushed"><li>Question: Tea or coffee?</li></ul>\n'}
    assert {c["count"] for c in from_every_worker(app.url, pids, "/count/").values()} == {1}

    project.edit("mysite/settings.py", 'TIME_ZONE = "UTC"', 'TIME_ZONE = "Europe/Paris"')
    proc = project.push(app.url)
    assert ("  NOT LIVE (django): settings.TIME_ZONE changed; Django read it at start-up; restart the app to "
            "apply it") in proc.stdout.splitlines(), proc.stdout

    project.edit("mysite/settings.py", "DEBUG = True", "DEBUG = False")
    proc = project.push(app.url, "--json")
    notices = json.loads(proc.stdout)["report"]["not_live"]
    assert {"source": "django", "what": "settings.DEBUG changed",
            "fix": "Django read it at start-up; restart the app to apply it"} in notices
    assert {a["html"] for a in from_every_worker(app.url, pids, "/questions/").values()} == \
        {'<ul class="pushed"><li>Question: Tea or coffee?</li></ul>\n'}

    # Restarted, the settings run from habanero's source tree: Django's own BASE_DIR line still finds
    # the project's database (the tree links to it), and the settings pushed meanwhile apply.
    app.stop()
    app = launcher.start([sys.executable, "-m", "gunicorn", "wsgi", "-w", "2", "-b", "127.0.0.1:0",
                          "--graceful-timeout", "5"], env=env, cwd=here, name="gunicorn again",
                         ready=GUNICORN_READY)
    pids = {w["pid"] for w in wait_for_workers(project, app, 2)}
    assert {c["count"] for c in from_every_worker(app.url, pids, "/count/").values()} == {1}
    found = [p for root in (run, project.store) for p in root.rglob("db.sqlite3*")]
    assert found and all(p.is_symlink() for p in found), found  # the trees link to it; no copy, no new one


def test_runserver_with_its_reloader_serves_a_push_in_the_same_process(launcher: Launcher, tmp_path: Path) -> None:
    project = make_project(tmp_path / "django", "django_app")
    here = migrated_copy(project)
    port = free_port()
    app = launcher.start([sys.executable, "manage.py", "runserver", str(port)], env=project.app_env(), cwd=here,
                         name="runserver", ready=re.compile(RUNSERVER_READY.format(port=port)))
    pid = get_json(app.url, "/questions/")["pid"]

    edit_app(project)
    project.edit("mysite/settings.py", 'TIME_ZONE = "UTC"', 'TIME_ZONE = "Europe/Paris"')
    proc = project.push(app.url)

    assert "  NOT LIVE (django): settings.TIME_ZONE changed" in proc.stdout
    now = get_json(app.url, "/questions/")
    assert now == {"html": '<ul class="pushed"><li>Question: Tea or coffee?</li></ul>\n', "pid": pid}
    assert get_json(app.url, "/count/") == {"count": 1, "pid": pid}
