"""Paths derived from ``__file__`` lead to the project before a push, after one and after a restart.

A Django-style app computes ``BASE = Path(__file__).resolve().parent.parent`` in its served package
and keeps its ``.env``, its SQLite database and its uploads there. Pushed with the real
``habanero-pack`` and restarted, it must go on reading and writing the project's files, while its
own data file (inside the package) is the pushed version's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support.e2e import DevProject, Launcher, base_env, request

from overlay.keys import generate_signing_key

pytestmark = pytest.mark.slow  # real app processes and the CLI

APP = '''\
import sqlite3
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent  # Django's BASE_DIR
VERSION = "v0"


def application(environ, start_response):
    path, query = environ["PATH_INFO"], environ.get("QUERY_STRING", "")
    if path == "/env":
        body = (BASE / ".env").read_text()
    elif path == "/visit":
        with sqlite3.connect(BASE / "db.sqlite3") as db:
            db.execute("CREATE TABLE IF NOT EXISTS visits (version TEXT)")
            db.execute("INSERT INTO visits VALUES (?)", (VERSION,))
            body = ",".join(row[0] for row in db.execute("SELECT version FROM visits"))
        db.close()
    elif path == "/upload":
        (BASE / "media" / query).write_text(VERSION)
        body = "stored"
    elif path == "/data":
        body = (Path(__file__).parent / "data.txt").read_text()
    else:
        body = __file__
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
'''

SERVE = '''\
import os, sys
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import overlay

ov = overlay.install(packages=["app"], trusted_keys=os.environ["HABANERO_TRUSTED_KEYS"],
                     store=str(HERE / ".habanero" / "store"))
import app

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

application = ov.wsgi(lambda environ, start_response: app.application(environ, start_response))
with make_server("127.0.0.1", 0, application, handler_class=Quiet) as server:
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
'''


@pytest.fixture
def project(tmp_path: Path) -> DevProject:
    root = tmp_path / "mysite"
    (root / "app").mkdir(parents=True)
    (root / "media").mkdir()
    (root / "app" / "__init__.py").write_text(APP)
    (root / "app" / "data.txt").write_text("data of v0")
    (root / ".env").write_text("SECRET=from-the-project\n")
    (root / "serve.py").write_text(SERVE)
    (root / "pyproject.toml").write_text('[tool.habanero]\napp_id = "app"\npackages = ["app"]\n'
                                         'key = ".habanero/deploy_key"\n')
    key = generate_signing_key(root / ".habanero" / "deploy_key", comment="e2e@habanero")
    trusted = tmp_path / "trusted_keys"
    trusted.write_text(key.public.line() + "\n")
    (tmp_path / "home").mkdir()
    return DevProject("paths", root, tmp_path / "home", key, trusted, root / ".habanero" / "store")


def get(url: str, path: str) -> str:
    reply = request(url, path)
    assert reply.status == 200, reply
    return reply.body.decode()


def start(launcher: Launcher, project: DevProject) -> str:
    env = base_env(project.home, HABANERO_TRUSTED_KEYS=str(project.trusted_keys))
    return launcher.start([sys.executable, str(project.root / "serve.py")], env=env, cwd=project.root,
                          name="paths app").url


def test_paths_derived_from_file_reach_the_project_before_and_after_a_push_and_a_restart(launcher, project):
    root = project.root
    url = start(launcher, project)
    assert get(url, "/file") == str(root / "app" / "__init__.py")  # from disk: no version pushed yet
    assert get(url, "/env") == "SECRET=from-the-project\n"
    assert get(url, "/visit") == "v0"
    get(url, "/upload?first.txt")

    project.edit("app/__init__.py", 'VERSION = "v0"', 'VERSION = "v1"')
    (root / "app" / "data.txt").write_text("data of v1")
    project.push(url)
    served = get(url, "/file")
    assert served != str(root / "app" / "__init__.py") and Path(served).read_text() == (root / "app" / "__init__.py").read_text()
    assert get(url, "/env") == "SECRET=from-the-project\n"
    assert get(url, "/visit") == "v0,v1"
    get(url, "/upload?second.txt")
    assert get(url, "/data") == "data of v1"

    (root / "app" / "data.txt").write_text("data on disk, never pushed")
    launcher.stop_all()
    url = start(launcher, project)
    assert get(url, "/file") == served, "the restarted app serves the pushed version from its tree"
    assert get(url, "/env") == "SECRET=from-the-project\n"
    assert get(url, "/visit") == "v0,v1,v1"
    get(url, "/upload?third.txt")
    assert get(url, "/data") == "data of v1"

    assert {p.name: p.read_text() for p in (root / "media").iterdir()} == {
        "first.txt": "v0", "second.txt": "v1", "third.txt": "v1"}
    tree = Path(served).parent.parent
    assert (tree / "db.sqlite3").is_symlink() and (tree / "db.sqlite3").samefile(root / "db.sqlite3")
    assert not list(project.store.rglob("db.sqlite3*")), "no database was made inside the store"
    assert not [p for p in tree.iterdir() if p.name.startswith("db.sqlite3") and not p.is_symlink()]
    assert os.path.realpath(tree / "media") == str(root / "media")
