"""``habanero-pack --push --watch`` end to end: the real watcher, a real app process, real saves.

The developer's project is a temporary copy of the aiohttp example with a fresh key; the app runs
that copy's ``serve.py`` on a port of its own choosing, with its store and trust file beside it.
Each test reads the watcher's lines as they come (the ``watching`` line, one line per push, the
summary at Ctrl-C) and asks the app itself what it serves. Speed is measured in ``make bench``,
never asserted here.

The last tests drive a :class:`~packer.watch.WatchSession` in the test process against an overlay
serving a real loopback endpoint, and count the requests its client sends: one per save, and one
status read more when the app moved on since the session's last push.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.e2e import AppProcess, DevProject, get_json, make_project, status_of
from support.watch import GREETING, PUSHED, VIEWS, save, start_app, wait_until

from packer.client import Remote
from packer.deploy import BaseCache, push_once
from packer.watch import WatchSession

pytestmark = pytest.mark.slow  # real watcher and app processes; the in-process sessions run git through the packer's build


@pytest.fixture
def project(tmp_path: Path) -> DevProject:
    return make_project(tmp_path, "aiohttp_app")


@pytest.fixture
def app(launcher, project: DevProject) -> AppProcess:
    return start_app(launcher, project)


def message(app: AppProcess) -> str:
    return get_json(app.url)["message"]


def test_a_save_goes_live_in_the_same_process_and_keeps_its_state(app, project, watchers) -> None:
    watcher = watchers(project, app.url)
    assert re.search(r"  v1  .*pushed at start in \d+ ms$", watcher.output, re.M)  # it ran the disk's code
    before = get_json(app.url)
    mark = len(watcher.lines)

    save(project, "Hello, habanero")

    _, pushed = watcher.wait_for(PUSHED, after=mark)
    assert (pushed["version"], pushed["changed"]) == ("2", "hello.views")
    assert (pushed["patched"], pushed["replaced"]) == ("1", "0")
    assert pushed["ms"] is not None
    now = get_json(app.url)
    assert (now["message"], now["pid"], now["hits"]) == ("Hello, habanero", app.pid, before["hits"] + 1)
    summary = watcher.interrupt()
    assert (summary["pushes"], summary["failures"], summary["median"]) == ("2", "0", pushed["ms"])


def test_a_refused_save_is_reported_once_and_the_next_good_save_goes_live(app, project, watchers) -> None:
    watcher = watchers(project, app.url)
    mark = len(watcher.lines)

    save(project, "never served", extra="\ndef broken(:\n")
    refused, _ = watcher.wait_for(re.compile("  refused: syntax_error: hello.views does not compile"),
                                  after=mark)
    assert message(app) == "Hello, world"
    save(project, "Hello, fixed")
    fixed, _ = watcher.wait_for(PUSHED, after=refused)

    assert message(app) == "Hello, fixed"
    shown = "\n".join(watcher.lines[mark:fixed])
    assert shown.count("does not compile") == 1
    assert f"({project.root / VIEWS}, line " in shown  # the app's path, mapped onto the developer's file
    assert "the app still serves its previous version" in shown
    summary = watcher.interrupt()
    assert (summary["pushes"], summary["failures"]) == ("2", "1")


CHECK = """\
import sys
if "BLOCK" in open("hello/views.py").read():
    sys.exit("check says no")
"""


def test_a_failing_check_blocks_the_push_and_a_passing_one_lets_it_through(app, project, watchers) -> None:
    (project.root / "check.py").write_text(CHECK, encoding="utf-8")
    watcher = watchers(project, app.url, "--check", f"{shlex.quote(sys.executable)} check.py")
    watcher.wait_for(PUSHED)  # the first push runs the check too
    mark = len(watcher.lines)

    save(project, "BLOCK me")
    failed, _ = watcher.wait_for(re.compile(r"  check failed \(exit 1\) in \d+ ms, not pushed: "), after=mark)
    watcher.wait_for(re.compile(r"^    check says no$"), after=failed)
    assert message(app) == "Hello, world"
    save(project, "Hello, checked")
    watcher.wait_for(PUSHED, after=failed)

    assert message(app) == "Hello, checked"
    summary = watcher.interrupt()
    assert (summary["pushes"], summary["failures"], summary["blocked"]) == ("2", "0", "1")


SLOW_CHECK = """\
import os, subprocess, sys, time
if "SLOW" in open("hello/views.py").read():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open("check.pids.tmp", "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    os.replace("check.pids.tmp", "check.pids")
    time.sleep(60)
"""


def test_a_newer_save_kills_the_stale_check_and_its_children_and_starts_over(app, project, watchers):
    (project.root / "check.py").write_text(SLOW_CHECK, encoding="utf-8")
    watcher = watchers(project, app.url, "--check", f"{shlex.quote(sys.executable)} check.py")
    watcher.wait_for(PUSHED)
    mark = len(watcher.lines)

    save(project, "SLOW")
    pids = wait_until(lambda: _read(project.root / "check.pids"), what="the slow check to start")
    save(project, "Hello, quick")
    watcher.wait_for(PUSHED, after=mark)

    assert message(app) == "Hello, quick"
    for pid in map(int, pids.split()):  # type: ignore[union-attr]
        wait_until(lambda pid=pid: not _alive(pid), timeout=10, what=f"check process {pid} to die")
    assert not watcher.matching(re.compile("check failed"), after=mark)  # cancelled, not failed
    assert watcher.interrupt()["pushes"] == "2"


def test_a_burst_of_saves_ends_in_the_final_state_with_fewer_pushes(app, project, watchers) -> None:
    watcher = watchers(project, app.url)
    mark = len(watcher.lines)

    for i in range(10):  # ten writes within a few milliseconds
        save(project, f"burst {i}")

    wait_until(lambda: message(app) == "burst 9", what="the last save to go live")
    version = status_of(project, app.url)["version"]
    watcher.wait_for(re.compile(rf"  v{version}  hello.views  "), after=mark)
    pushes = watcher.matching(PUSHED, after=mark)
    assert 1 <= len(pushes) < 10, pushes
    assert watcher.interrupt()["pushes"] == str(1 + len(pushes))


def test_a_save_caught_between_truncate_and_write_is_not_pushed_half_done(app, project, watchers) -> None:
    watcher = watchers(project, app.url, "-v", "--debounce", "2000")  # a long hold: no race with the test
    mark = len(watcher.lines)
    views = project.root / VIEWS
    text = views.read_text(encoding="utf-8").replace(GREETING, 'return "Hello, in one piece"')

    with views.open("w", encoding="utf-8") as fh:  # truncated, as editors that write in place do
        watcher.wait_for(re.compile(r"info: hello.views became empty: holding the push up to 2000 ms"),
                         after=mark)
        fh.write(text)

    _, pushed = watcher.wait_for(PUSHED, after=mark)
    assert message(app) == "Hello, in one piece"
    assert watcher.matching(PUSHED, after=mark) == [pushed[0]]
    assert watcher.interrupt()["pushes"] == "2"


def test_saving_identical_bytes_pushes_nothing(app, project, watchers) -> None:
    watcher = watchers(project, app.url, "-v")
    mark = len(watcher.lines)
    views = project.root / VIEWS

    views.write_bytes(views.read_bytes())

    # Either read once, or (caught after the truncate) read empty, then whole again.
    watcher.wait_for(re.compile(r"(info: saved, nothing changed: hello/views.py|"
                                r"  back to the code the app runs; nothing to push)$"), after=mark)
    assert not watcher.matching(PUSHED, after=mark)
    assert status_of(project, app.url)["version"] == 1
    assert watcher.interrupt()["pushes"] == "1"


def test_the_watch_outlives_an_app_restart_and_pushes_what_was_saved_meanwhile(launcher, project, watchers):
    first = start_app(launcher, project)
    port = int(first.url.rpartition(":")[2])
    watcher = watchers(project, first.url)
    first.stop()
    mark = len(watcher.lines)

    save(project, "saved while down")
    down = re.compile(rf"  cannot reach http://127.0.0.1:{port}: connection refused; retrying with backoff")
    watcher.wait_for(down, after=mark)
    again = start_app(launcher, project, port=port)  # same port, same store
    back, _ = watcher.wait_for(re.compile(rf"  http://127.0.0.1:{port} answers again$"), after=mark)
    _, pushed = watcher.wait_for(PUSHED, after=back)

    assert pushed["version"] == "2"  # numbered from what the restarted app's store accepted
    now = get_json(again.url)
    assert (now["message"], now["pid"]) == ("saved while down", again.pid)
    save(project, "and after")
    watcher.wait_for(re.compile(r"  v3  hello.views  "), after=back)
    assert message(again) == "and after"
    assert len(watcher.matching(re.compile("cannot reach"))) == 1  # one message, however many tries
    assert watcher.interrupt()["pushes"] == "3"


# ------------------------------------------------------------ requests per push, in process


class Session:
    """A WatchSession on a served overlay whose client logs each request as ``"GET status"``."""

    def __init__(self, config, url: str, key) -> None:
        self.remote = Remote(url, app_id=config.app_id, key=key)
        self.sent: list[str] = []
        self.lines: list[str] = []
        request = self.remote.request

        def logged(method: str, route: str, *args, **kwargs):
            self.sent.append(f"{method} {route}")
            return request(method, route, *args, **kwargs)

        self.remote.request = logged  # type: ignore[method-assign]
        self.watch = WatchSession(self.remote, config, out=self.lines.append)
        self.root = config.root

    def save(self, rel: str, text: str) -> None:
        """Write a file and hand the watch its event, as watchfiles' thread would."""
        path = self.root / rel
        path.write_text(text)
        self.watch.events.put(("saved", {path}, time.time()))
        self.watch._step()

    def since(self, mark: int) -> list[str]:
        return self.sent[mark:]


@pytest.fixture
def served(tmp_path: Path, trusted_keys_file, signing_key, import_state, monkeypatch) -> Iterator[tuple]:
    """An overlay serving package ``wapp`` on a loopback endpoint, and a watch session on its project."""
    import overlay
    from support.project import make_project as make_packer_project
    from packer.config import load_config

    monkeypatch.delenv("HABANERO_DISABLE", raising=False)
    files = {"wapp/__init__.py": "", **{f"wapp/m{i}.py": f"def f():\n    return {i}\n" for i in range(5)}}
    root = make_packer_project(tmp_path / "proj", files, table='packages = ["wapp"]\n')
    ov = overlay.install(packages=["wapp"], trusted_keys=str(trusted_keys_file), store=str(tmp_path / "store"),
                         listen="127.0.0.1:0", code_cache=False)
    config = load_config(root, key=str(signing_key.path))
    url = f"http://127.0.0.1:{ov.address[1]}"
    session = Session(config, url, signing_key)
    try:
        yield ov, session, config, url
    finally:
        session.remote.close()
        ov.uninstall()


def _f(module: str) -> object:
    import importlib

    return importlib.import_module(module).f()


def test_after_its_first_push_the_watch_sends_one_request_per_save_on_one_connection(served) -> None:
    ov, session, _, _ = served
    session.watch._start()
    assert session.sent == ["GET status", "GET status", "POST push"]  # is it live? / where does it stand?
    assert _f("wapp.m3") == 3  # imported: each save patches it in place
    connection, mark = session.remote._conn, len(session.sent)

    for i in range(3):
        session.save("wapp/m3.py", f"def f():\n    return 'save {i}'\n")

    assert session.since(mark) == ["POST push"] * 3  # the push's answer confirms it: no status read
    assert session.remote._conn is connection  # kept alive from the first request on
    assert (_f("wapp.m3"), ov.version) == ("save 2", 4)
    assert re.search(r"  v4  wapp\.m3  patched 1, replaced 0  save-to-live \d+ ms$", session.lines[-1])


def test_a_push_from_elsewhere_costs_the_next_save_one_status_read_and_a_second_try(served, signing_key) -> None:
    ov, session, config, url = served
    session.watch._start()
    (config.root / "wapp/m4.py").write_text("def f():\n    return 'theirs'\n")  # another developer's code
    with Remote(url, app_id=config.app_id, key=signing_key) as other:  # another developer: v2
        push_once(other, config, bases=BaseCache(None))
    mark = len(session.sent)

    session.save("wapp/m3.py", "def f():\n    return 'mine'\n")  # built on v1, which the app no longer runs

    assert session.since(mark) == ["POST push", "GET status", "POST push"]
    assert [(e["version"], e["code"]) for e in ov.history()][-2:] == [(None, "parent_missing"), (3, None)]
    assert (_f("wapp.m3"), ov.version) == ("mine", 3)
    mark = len(session.sent)
    session.save("wapp/m3.py", "def f():\n    return 'mine again'\n")
    assert session.since(mark) == ["POST push"]
    assert (_f("wapp.m3"), ov.version) == ("mine again", 4)


def test_a_version_taken_meanwhile_costs_one_status_read_and_a_second_try(served, signing_key) -> None:
    ov, session, config, url = served
    session.watch._start()
    (config.root / "wapp/m4.py").write_text("def f():\n    return 'theirs'\n")  # another developer's code
    with Remote(url, app_id=config.app_id, key=signing_key) as other:  # v2 pushed, then rolled back to v1
        push_once(other, config, bases=BaseCache(None))
        other.rollback(1, expect=2)
    mark = len(session.sent)

    session.save("wapp/m3.py", "def f():\n    return 'mine'\n")  # v2 on v1: the app runs v1, v2 is taken

    assert session.since(mark) == ["POST push", "GET status", "POST push"]
    assert [(e["version"], e["code"]) for e in ov.history()][-2:] == [(2, "stale_version"), (3, None)]  # the refused bundle is named
    assert (_f("wapp.m3"), ov.version) == ("mine", 3)


def test_after_a_refused_push_the_next_one_reads_the_status_first(served) -> None:
    ov, session, _, _ = served
    session.watch._start()
    session.save("wapp/m3.py", "def f(:\n")
    assert "refused: syntax_error: wapp.m3 does not compile" in session.lines[-2]
    mark = len(session.sent)

    session.save("wapp/m3.py", "def f():\n    return 'fixed'\n")

    assert session.since(mark) == ["GET status", "POST push"]
    assert (_f("wapp.m3"), ov.version) == ("fixed", 2)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    """Running, and not a zombie nobody reaped (in a container, PID 1 may never reap orphans)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_the_watch_does_not_push_a_no_op_version_at_start_after_a_one_off_push(served, signing_key) -> None:
    ov, session, config, url = served
    with Remote(url, app_id=config.app_id, key=signing_key) as once:
        push_once(once, config, bases=BaseCache(None))
    assert ov.version == 1
    session.watch._start()
    assert session.sent == ["GET status"]
    assert ov.version == 1 and ov.store.highest == 1
    assert session.lines[-1].endswith("v1 is live and runs this code; nothing to push")


def test_a_one_off_push_whose_version_was_taken_reads_the_status_again_and_pushes_once_more(
        served, signing_key) -> None:
    ov, session, config, url = served
    session.watch._start()  # v1
    (config.root / "wapp/m4.py").write_text("def f():\n    return 'theirs'\n")
    reads: list[int] = []
    with Remote(url, app_id=config.app_id, key=signing_key) as mine, \
            Remote(url, app_id=config.app_id, key=signing_key) as other:
        real_status = mine.status

        def status() -> dict:
            answer = real_status()
            if not reads:  # another developer's push lands between our status read and our push
                push_once(other, config, bases=BaseCache(None))
                (config.root / "wapp/m3.py").write_text("def f():\n    return 'mine'\n")  # our edit
            reads.append(answer["highest"])
            return answer

        mine.status = status  # type: ignore[method-assign]
        result = push_once(mine, config, bases=BaseCache(None))
    assert reads == [1, 2, 3] and result.version == 3 and ov.version == 3  # the last read confirms it
    assert [(e["version"], e["code"]) for e in ov.history()][-2:] == [(2, "stale_version"), (3, None)]  # the refused bundle is named
    assert (_f("wapp.m3"), _f("wapp.m4")) == ("mine", "theirs")
