"""The store under faults, against the example's real app processes and the real ``habanero-pack``.

A version whose commit failed is never run again, by a rollback or a restart; a link planted in the
store or in a source tree creates nothing outside and the app still starts; colliding entries are
refused; a push built on an older version is refused unless forced; a captured signed rollback is
not taken again after a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import zstandard
from support.bundles import wrap
from support.e2e import (
    EXAMPLES,
    AppProcess,
    DevProject,
    Launcher,
    hello_bundle,
    make_project,
    push_bytes,
    request,
    rollback_request,
    signed,
    start_example,
    status_of,
)

from overlay.bundle import FORMAT, build_bundle

pytestmark = pytest.mark.slow  # real app processes and the real CLI

HELLO_VIEWS = "hello/views.py"
GREETING = 'return "Hello, world"'

# The aiohttp example's app, whose store cannot replace its state file while a marker file exists
# (a full disk at the commit point, on cue).
FAULTY_APP = '''\
import asyncio, errno, os, sys
from aiohttp import web
import overlay

sys.path.insert(0, os.environ["E2E_APP_DIR"])
app = web.Application()
ov = overlay.install(packages=["hello"], app=app)
state, write = ov.store._state, ov.store._state.write


def full_disk(*args, **kwargs):
    if os.path.exists(os.environ["E2E_DISK_FULL"]):
        raise OSError(errno.ENOSPC, "No space left on device")
    return write(*args, **kwargs)


state.write = full_disk
from hello import views
app.router.add_get("/", views.index)


async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
'''


@pytest.fixture
def project(tmp_path) -> DevProject:
    return make_project(tmp_path / "hello", "aiohttp_app")


def start_faulty(launcher: Launcher, project: DevProject) -> AppProcess:
    script = project.root.parent / "faulty_app.py"
    script.write_text(FAULTY_APP, encoding="utf-8")
    return launcher.start([sys.executable, str(script)], cwd=project.root.parent, name="faulty app",
                          env=project.app_env(E2E_APP_DIR=str(EXAMPLES / "aiohttp_app"),
                                              E2E_DISK_FULL=str(project.root.parent / "disk-full")))


def message(app: AppProcess) -> str:
    return str(request(app.url).json()["message"])


def edit_and_push(project: DevProject, app: AppProcess, old: str, new: str, *args: str) -> None:
    project.edit(HELLO_VIEWS, f'return "{old}"', f'return "{new}"')
    project.push(app.control, *args)


def test_a_version_whose_commit_failed_is_never_rolled_back_to_nor_started_on(launcher, project) -> None:
    app = start_faulty(launcher, project)
    project.push(app.control)
    marker = project.root.parent / "disk-full"
    marker.touch()
    project.edit(HELLO_VIEWS, GREETING, 'return "Hello, never committed"')
    failed = project.pack("push", app.control)
    assert failed.returncode == 1 and "activation_failed" in failed.stderr, failed.stderr
    marker.unlink()
    assert message(app) == "Hello, world"
    for attempt in range(2):  # before and after a restart
        refused = project.pack("rollback", app.control, "--to", "2")
        assert refused.returncode == 1 and "version 2 is not in the store" in refused.stderr, refused.stderr
        assert message(app) == "Hello, world" and status_of(project, app.url)["version"] == 1
        if attempt == 0:
            app.stop()
            (project.store / "state.json").write_text("{torn")  # the start falls back to what verifies
            app = start_faulty(launcher, project)


def test_a_link_planted_in_the_store_creates_nothing_outside_and_the_app_starts_on_what_verifies(
        launcher, project, tmp_path) -> None:
    app = start_example(launcher, project)
    project.push(app.control)
    edit_and_push(project, app, "Hello, world", "Hello, two")
    app.stop()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(project.store / "staged", outside / "staged")
    (project.store / "staged").symlink_to(outside / "staged")
    (project.store / "history.jsonl").rename(outside / "history.jsonl")
    (project.store / "history.jsonl").symlink_to(outside / "history.jsonl")
    before = {p: p.read_bytes() if p.is_file() else None for p in outside.rglob("*")}
    app = start_example(launcher, project)
    status = status_of(project, app.url)
    assert (status["version"], message(app)) == (2, "Hello, two")
    assert any("symbolic link" in problem for problem in status["startup_problems"])
    project.edit(HELLO_VIEWS, 'return "Hello, two"', 'return "Hello, three"')
    refused = project.pack("push", app.control)
    assert refused.returncode == 1 and "store_unsafe" in refused.stderr, refused.stderr
    assert message(app) == "Hello, two"
    assert {p: p.read_bytes() if p.is_file() else None for p in outside.rglob("*")} == before


def test_a_link_in_place_of_a_package_of_the_source_tree_starts_the_app_on_the_code_on_disk(
        launcher, project, tmp_path) -> None:
    app = start_example(launcher, project)
    edit_and_push(project, app, "Hello, world", "Hello, pushed")
    tree = status_of(project, app.url)["tree"]
    app.stop()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(os.path.join(tree, "hello"), tmp_path / "old-hello")
    os.symlink(outside, os.path.join(tree, "hello"))
    app = start_example(launcher, project)
    status = status_of(project, app.url)
    assert status["version"] is None and message(app) == "Hello, world"  # the code on disk
    assert any("source tree" in problem and "symbolic link" in problem for problem in status["startup_problems"])
    assert list(outside.iterdir()) == []


def _bundle(project: DevProject, version: int, rows: list[tuple[str, str, bytes]]) -> bytes:
    """A signed bundle of these entries, as given (the builder would refuse the ones tested here)."""
    entries = [{"name": n, "kind": k, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, k, b in rows]
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"".join(b for _, _, b in rows))
    payload = {"codec": "zstd", "size": len(frame), "uncompressed_size": sum(len(b) for _, _, b in rows),
               "sha256": hashlib.sha256(frame).hexdigest()}
    manifest = {"format": FORMAT, "app_id": project.app_id, "version": version, "parent": None,
                "created": "2026-01-01T00:00:00Z", "builder": {}, "payload": payload, "entries": entries}
    return wrap(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), project.key, frame)


def test_colliding_entries_are_refused_by_the_app_and_by_the_packer(launcher, project) -> None:
    app = start_example(launcher, project)
    views = (EXAMPLES / "aiohttp_app" / "hello" / "views.py").read_bytes()
    for rows in ([("hello", "package", b""), ("hello.__init__", "module", b"raise SystemExit\n"),
                  ("hello.views", "module", views)],
                 [("hello", "package", b""), ("hello.views", "module", views),
                  ("hello/tools/run.py", "data", b"raise SystemExit\n")]):
        reply = push_bytes(app.control, _bundle(project, 1, rows))
        assert (reply.status, reply.error()["code"]) == (422, "bad_entry_name"), reply
    (project.root / "hello" / "tools").mkdir()
    (project.root / "hello" / "tools" / "run.py").write_text("print('run')\n")
    refused = project.pack("push", app.control)
    assert refused.returncode == 1 and "add hello/tools/__init__.py" in refused.stderr, refused.stderr
    assert status_of(project, app.url)["version"] is None


def test_a_full_push_built_on_an_older_version_is_refused_and_force_replaces_it(launcher, project) -> None:
    app = start_example(launcher, project)
    project.push(app.control)
    v1 = status_of(project, app.url)["active"]["digest"]
    edit_and_push(project, app, "Hello, world", "Hello, two")
    stale = build_bundle(
        {"hello": ("package", (project.root / "hello" / "__init__.py").read_bytes()),
         "hello.views": ("module", views_saying(project, "Hello, from v1"))},
        app_id=project.app_id, version=3, signers=[project.key], parent=v1)
    reply = push_bytes(app.control, stale)
    error = reply.error()
    assert (reply.status, error["code"]) == (409, "stale_parent")
    assert "built on v1" in error["message"] and "runs v2" in error["message"]
    assert message(app) == "Hello, two"
    assert project.pack("rollback", app.control).returncode == 0  # pushes after a rollback build on it
    edit_and_push(project, app, "Hello, two", "Hello, after the rollback")
    assert message(app) == "Hello, after the rollback"
    edit_and_push(project, app, "Hello, after the rollback", "Hello, forced", "--force")
    assert message(app) == "Hello, forced"


def views_saying(project: DevProject, text: str) -> bytes:
    views = (project.root / HELLO_VIEWS).read_text(encoding="utf-8")
    start = views.index('return "') + len('return "')
    return (views[:start] + text + views[views.index('"', start):]).encode()


def test_a_captured_signed_rollback_is_refused_when_replayed_after_a_restart(launcher, project) -> None:
    app = start_example(launcher, project)
    project.push(app.control)
    edit_and_push(project, app, "Hello, world", "Hello, two")
    body = json.dumps({"to": None, "expect": 2}).encode()
    captured = signed(project, "POST", "/_habanero/rollback", body)  # seen on the wire
    assert rollback_request(project, app.control, body=body, headers=captured).status == 200
    assert message(app) == "Hello, world"
    assert project.pack("rollback", app.control, "--to", "2").returncode == 0  # v2 active: "expect" holds again
    app.stop()
    app = start_example(launcher, project)
    replayed = rollback_request(project, app.control, body=body, headers=captured)
    assert (replayed.status, replayed.error()["code"]) == (401, "replayed_request")
    assert message(app) == "Hello, two" and status_of(project, app.url)["version"] == 2
