"""Processes that are not a web server's workers: a fork pool, and listen= shared by processes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.e2e import PACK, TIMEOUT, AppProcess, Launcher, base_env, free_port, get_json, request, signed

from overlay.keys import SigningKey, generate_signing_key

pytestmark = pytest.mark.slow  # real processes and the real CLI

POOL_APP = textwrap.dedent('''\
    import json, multiprocessing, os, sys, time
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import overlay

    sys.path.insert(0, os.environ["APP_DIR"])
    ov = overlay.install(packages=["poolapp"])
    import poolapp


    def work(i):
        import poolapp
        time.sleep(0.005)
        return os.getpid(), poolapp.greet()


    def app(environ, start_response):
        children = sorted({tuple(r) for r in POOL.map(work, range(120), chunksize=1)})
        body = json.dumps({"parent": [os.getpid(), poolapp.greet()], "children": children}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]


    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass


    if __name__ == "__main__":
        POOL = multiprocessing.get_context("fork").Pool(3)  # forked after install(): each child joins
        with make_server("127.0.0.1", 0, ov.wsgi(app), handler_class=Quiet) as server:
            print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
            server.serve_forever()
''')

LISTENER = textwrap.dedent('''\
    import os, sys, time
    import overlay

    sys.path.insert(0, os.environ["APP_DIR"])
    ov = overlay.install(packages=["poolapp"])
    import poolapp
    print(f"listening on http://{ov.address[0]}:{ov.address[1]} pid {os.getpid()}", flush=True)
    while True:
        time.sleep(1)
''')


class Project:
    """A developer's project of ``poolapp`` and an app directory with its code on disk."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "dev"
        (self.root / "poolapp").mkdir(parents=True)
        (self.root / "pyproject.toml").write_text(
            '[tool.habanero]\napp_id = "poolapp"\npackages = ["poolapp"]\nkey = ".habanero/deploy_key"\n')
        self.write("one")
        self.key: SigningKey = generate_signing_key(self.root / ".habanero" / "deploy_key")
        (base / "trusted_keys").write_text(self.key.public.line() + "\n")
        (base / "home").mkdir()
        self.app_id = "poolapp"

    def write(self, greeting: str) -> None:
        (self.root / "poolapp" / "__init__.py").write_text(f"def greet():\n    return {greeting!r}\n")

    def env(self, store: str = "store", **extra: str) -> dict[str, str]:
        return base_env(self.base / "home", HABANERO_STORE=str(self.base / store),
                        HABANERO_TRUSTED_KEYS=str(self.base / "trusted_keys"), APP_DIR=str(self.root), **extra)

    def pack(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PACK, *args], cwd=self.root, env=base_env(self.base / "home"), text=True,
                              capture_output=True, timeout=TIMEOUT)

    def start(self, launcher: Launcher, script: str, name: str, **env: str) -> AppProcess:
        path = self.base / f"{name}.py"
        path.write_text(script)
        return launcher.start([sys.executable, str(path)], env=self.env(**env), cwd=self.base, name=name)


def workers(project: Project, url: str) -> list[dict]:
    reply = request(url, "/_habanero/status", headers=signed(project, "GET", "/_habanero/status"))  # type: ignore[arg-type]
    assert reply.status == 200, reply
    return reply.json()["workers"]


def wait_for(project: Project, url: str, count: int) -> list[dict]:
    deadline = time.monotonic() + TIMEOUT
    while len(found := workers(project, url)) != count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} processes joined"
        time.sleep(0.1)
    return found


def test_a_fork_pool_started_after_install_takes_every_push(launcher, tmp_path) -> None:
    project = Project(tmp_path)
    app = project.start(launcher, POOL_APP, "pool")
    assert len(wait_for(project, app.url, 4)) == 4  # the parent and its three children
    before = get_json(app.url)
    assert before["parent"][1] == "one" and {g for _, g in before["children"]} == {"one"}

    project.write("two")
    pushed = project.pack("push", app.url)

    assert pushed.returncode == 0, pushed.stderr
    assert len(re.findall(r"^  worker \d+\s+v1\s+applied", pushed.stdout, re.M)) == 4
    after = get_json(app.url)
    assert after["parent"][1] == "two" and {g for _, g in after["children"]} == {"two"}
    children = {pid for pid, _ in before["children"]}
    assert {pid for pid, _ in after["children"]} == children, "the same children: they kept running"
    assert {w["pid"] for w in workers(project, app.url)} == children | {after["parent"][0]}


def test_processes_asking_for_one_listen_address_share_it_and_each_takes_the_push(launcher, tmp_path) -> None:
    project = Project(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    first = project.start(launcher, LISTENER, "first", HABANERO_LISTEN=address)
    second = project.start(launcher, LISTENER, "second", HABANERO_LISTEN=address)  # joins, does not fail
    url = f"http://{address}"
    assert first.url == second.url == url
    assert len(wait_for(project, url, 2)) == 2

    project.write("two")
    pushed = project.pack("push", url)
    assert pushed.returncode == 0, pushed.stderr
    assert len(re.findall(r"^  worker \d+\s+v1\s+applied", pushed.stdout, re.M)) == 2


def test_a_listen_address_held_by_another_apps_process_is_refused_at_start(launcher, tmp_path) -> None:
    project = Project(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    project.start(launcher, LISTENER, "first", HABANERO_LISTEN=address)
    other = AppProcess([sys.executable, str(tmp_path / "first.py")], env=project.env("other-store",
                       HABANERO_LISTEN=address), cwd=tmp_path, name="other store")
    launcher.started.append(other)
    assert other.proc.wait(TIMEOUT) != 0
    assert re.search(r"cannot listen on 127\.0\.0\.1:\d+: the port is shared by a process that is not this "
                     r"app's", other.output), other.output
