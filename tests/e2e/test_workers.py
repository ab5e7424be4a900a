"""Every worker, one version: real gunicorn and uvicorn workers, pushes through the real CLI.

The app is ``examples/flask_app`` (gunicorn) or ``examples/fastapi_app`` (uvicorn) as shipped, its
store and trust in the test's directory; the developer's project is a copy. What each process
serves is read from the process itself: requests go to the app's port until every worker's pid has
answered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.e2e import EXAMPLES, TIMEOUT, AppProcess, DevProject, Launcher, get_json, make_project, status_of
from support.workers import GUNICORN_READY, UVICORN_READY, from_every_worker, wait_for_workers

from overlay.storage.state import StateFile

pytestmark = pytest.mark.slow  # real servers, real worker processes, the real CLI

VIEWS = "shop/views.py"
GREETING = 'return "Hello, world"'


# ---------------------------------------------------------------------------------------- helpers


def start_gunicorn(launcher: Launcher, project: DevProject, *, workers: int = 4, extra: tuple[str, ...] = ()
                   ) -> AppProcess:
    argv = [sys.executable, "-m", "gunicorn", "wsgi:app", "-w", str(workers), "-b", "127.0.0.1:0",
            "--chdir", str(EXAMPLES / "flask_app"), "--graceful-timeout", "5", *extra]
    app = launcher.start(argv, env=project.app_env(), cwd=project.root.parent, name="gunicorn",
                         ready=GUNICORN_READY)
    wait_for_workers(project, app, workers + ("--preload" in extra))
    return app


def worker_pids(project: DevProject, app: AppProcess) -> set[int]:
    return {w["pid"] for w in status_of(project, app.url)["workers"]}


def state_of(project: DevProject) -> dict[str, Any]:
    """The store's state file as on disk: the version every process should run, and the mark."""
    state, why = StateFile(str(project.store / "state.json"), project.app_id).read()
    assert state is not None, f"the state file is {why}"
    return dict(state)


def deploy_lock_holder(project: DevProject) -> int | None:
    """The pid holding the store's deploy lock (the process that drives a deploy), from /proc/locks."""
    inode = os.stat(project.store / "deploy.lock").st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and any(f.endswith(f":{inode}") for f in fields):
            return int(fields[4])
    return None


@pytest.fixture
def shop(launcher: Launcher, tmp_path: Path) -> Iterator[tuple[Launcher, DevProject]]:
    yield launcher, make_project(tmp_path / "shop", "flask_app")


def slow_views(project: DevProject, greeting: str, seconds: float) -> None:
    """A version whose module-level code takes ``seconds`` to run: its apply is long enough to act in."""
    project.edit(VIEWS, GREETING, f'return "{greeting}"')
    project.append(VIEWS, f"\nimport time as _time\n_time.sleep({seconds})\n")


def in_background(run: Callable[[], subprocess.CompletedProcess[str]]) -> Callable[[], subprocess.CompletedProcess[str]]:
    box: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: box.append(run()), daemon=True)
    thread.start()

    def result() -> subprocess.CompletedProcess[str]:
        thread.join(TIMEOUT * 2)
        assert box, "the command did not finish"
        return box[0]

    return result


def wait_until(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------- gunicorn


def test_one_push_reaches_every_gunicorn_worker_and_each_keeps_its_state(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project)
    pids = worker_pids(project, app)
    before = from_every_worker(app.url, pids)
    project.edit(VIEWS, GREETING, 'return "Hello, workers"')

    proc = project.push(app.url)

    lines = re.findall(r"^  worker (\d+)\s+v1\s+applied\s+[\d.]+ ms$", proc.stdout, re.M)
    assert {int(pid) for pid in lines} == pids, proc.stdout
    after = from_every_worker(app.url, pids)
    assert {a["message"] for a in after.values()} == {"Hello, workers"}
    for pid in pids:  # every worker's in-memory counter went on: no restart, state kept
        assert after[pid]["hits"] > before[pid]["hits"]
    assert state_of(project)["highest"] == 1


def test_each_worker_reads_the_files_of_the_version_it_runs(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=2)
    pids = worker_pids(project, app)
    project.push(app.url)
    files = {a["file"] for a in from_every_worker(app.url, pids, "/banner").values()}
    assert len(files) == 2, "each worker has a tree of its own"
    # A version whose code fails in one worker only: every worker undoes it, and each one still
    # reads the banner of the version it runs (a shared tree would show the new one to all).
    victim = min(pids)
    (project.root / "shop" / "banner.txt").write_text("Closed for a new version\n")
    project.append(VIEWS, f"\nif os.getpid() == {victim}:\n    raise RuntimeError('not in this worker')\n")
    refused = project.pack("push", app.url)
    assert refused.returncode == 1 and f"failed while running in process {victim}" in refused.stderr
    assert {a["banner"] for a in from_every_worker(app.url, pids, "/banner").values()} == {"Welcome to the shop"}
    project.edit(VIEWS, f"\nif os.getpid() == {victim}:\n    raise RuntimeError('not in this worker')\n", "\n")
    project.push(app.url)
    assert {a["banner"] for a in from_every_worker(app.url, pids, "/banner").values()} == {"Closed for a new version"}


def test_with_preload_the_forked_workers_switch_too(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, extra=("--preload",))
    pids = worker_pids(project, app)
    # The master imported the app and forked the workers: it takes part too (it serves nothing, but
    # the workers it forks next start on the version it runs).
    assert app.pid in pids and len(pids) == 5
    project.edit(VIEWS, GREETING, 'return "Hello, preloaded"')
    proc = project.push(app.url)
    assert len(re.findall(r"^  worker \d+\s+v1\s+applied", proc.stdout, re.M)) == 5
    serving = pids - {app.pid}
    assert {a["message"] for a in from_every_worker(app.url, serving).values()} == {"Hello, preloaded"}
    victim = min(serving)
    os.kill(victim, signal.SIGKILL)  # gunicorn forks a new one from the master
    respawned = {w["pid"] for w in wait_for_workers(project, app, 5)} - pids
    assert {a["message"] for a in from_every_worker(app.url, respawned).values()} == {"Hello, preloaded"}


def test_a_worker_started_after_a_push_serves_the_active_version_from_its_first_request(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=2, extra=("--max-requests", "30"))
    project.edit(VIEWS, GREETING, 'return "Hello, recycled"')
    project.push(app.url)
    old = worker_pids(project, app)
    first_answers: dict[int, str] = {}
    for _ in range(200):  # each worker retires after 30 requests; gunicorn starts new ones
        answer = get_json(app.url)
        first_answers.setdefault(answer["pid"], answer["message"])
    recycled = set(first_answers) - old
    assert recycled, "no worker was recycled"
    assert {first_answers[pid] for pid in recycled} == {"Hello, recycled"}


def test_after_kill_hup_the_new_workers_serve_the_active_version(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=2)
    project.edit(VIEWS, GREETING, 'return "Hello, after HUP"')
    project.push(app.url)
    old = worker_pids(project, app)
    os.kill(app.pid, signal.SIGHUP)
    new = {w["pid"] for w in wait_for_workers(project, app, 2, exclude=old)}
    assert {a["message"] for a in from_every_worker(app.url, new).values()} == {"Hello, after HUP"}


def test_a_worker_killed_mid_push_leaves_every_survivor_on_the_old_version(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=3)
    project.push(app.url)
    pids = worker_pids(project, app)
    slow_views(project, "Hello, never", 4)
    pushing = in_background(lambda: project.pack("push", app.url))
    wait_until(lambda: deploy_lock_holder(project) is not None, "the deploy")
    time.sleep(1)  # every worker is now applying (sleeping in the new module's top level)
    driver = deploy_lock_holder(project)
    victim = max(pids - {driver})
    os.kill(victim, signal.SIGKILL)
    proc = pushing()

    assert proc.returncode == 1, proc.stdout
    assert f"process {victim}" in proc.stderr and "is still serving" in proc.stderr
    survivors = pids - {victim}
    assert {a["message"] for a in from_every_worker(app.url, survivors).values()} == {"Hello, world"}
    assert state_of(project)["active"]["version"] == 1 and state_of(project)["highest"] == 1
    respawned = {w["pid"] for w in wait_for_workers(project, app, 3)} - survivors
    assert {a["message"] for a in from_every_worker(app.url, respawned).values()} == {"Hello, world"}


def test_the_driving_worker_killed_mid_push_leaves_every_survivor_on_one_version(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=3)
    project.push(app.url)
    pids = worker_pids(project, app)
    slow_views(project, "Hello, orphan", 4)
    pushing = in_background(lambda: project.pack("push", app.url))
    wait_until(lambda: deploy_lock_holder(project) is not None, "the deploy")
    time.sleep(1)
    driver = deploy_lock_holder(project)
    assert driver in pids
    os.kill(driver, signal.SIGKILL)
    proc = pushing()

    assert proc.returncode != 0
    survivors = pids - {driver}
    state = state_of(project)
    messages = {a["message"] for a in from_every_worker(app.url, survivors).values()}
    # Nothing was committed: the survivors, left without their driver, asked the store and undid it.
    assert state["active"]["version"] == 1 and messages == {"Hello, world"}
    assert state["highest"] == 1
    project.edit(VIEWS, "_time.sleep(4)", "_time.sleep(0)")
    project.push(app.url)  # the store is consistent: the next push goes through everywhere
    everyone = {w["pid"] for w in wait_for_workers(project, app, 3)}
    assert {a["message"] for a in from_every_worker(app.url, everyone).values()} == {"Hello, orphan"}


def test_two_deployers_at_once_end_on_one_version_everywhere(shop, tmp_path) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=2)
    other = make_project(tmp_path / "other", "flask_app")  # a second developer: another copy, another key
    with open(project.trusted_keys, "a", encoding="utf-8") as fh:
        fh.write(other.key.public.line() + "\n")
    old = worker_pids(project, app)
    os.kill(app.pid, signal.SIGHUP)  # workers reload the trusted keys
    pids = {w["pid"] for w in wait_for_workers(project, app, 2, exclude=old)}
    # The old workers trust the old keys only: until they are gone they take part in deploys and
    # refuse the second developer's bundle (gunicorn stops them gracefully, slowly on a busy machine).
    wait_until(lambda: worker_pids(project, app) == pids, "the old workers leaving")
    project.edit(VIEWS, GREETING, 'return "Hello from one"')
    other.edit(VIEWS, GREETING, 'return "Hello from two"')

    first = in_background(lambda: project.pack("push", app.url))
    second = other.pack("push", app.url, env=None)
    results = [first(), second]

    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    state = state_of(project)
    assert state["highest"] == 2 and state["active"]["version"] == 2
    messages = {a["message"] for a in from_every_worker(app.url, pids).values()}
    assert len(messages) == 1 and messages <= {"Hello from one", "Hello from two"}


def test_rollbacks_and_pushes_through_any_worker_never_lower_the_mark(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=3)
    pids = worker_pids(project, app)
    project.push(app.url)
    marks = [state_of(project)["highest"]]
    for step in range(3):
        project.edit(VIEWS, "return \"", f"return \"{step}:", )
        project.push(app.url)
        marks.append(state_of(project)["highest"])
        back = project.pack("rollback", app.url)  # a new connection: any worker may take it
        assert back.returncode == 0, back.stderr
        marks.append(state_of(project)["highest"])
        versions = {w["version"] for w in status_of(project, app.url)["workers"]}
        assert versions == {state_of(project)["active"]["version"]}
    assert marks == [1, 2, 2, 3, 3, 4, 4], "the mark never went down, whichever worker took the request"
    served = {a["message"] for a in from_every_worker(app.url, pids).values()}
    assert len(served) == 1


def test_status_lists_every_live_worker_and_drops_a_dead_one(shop) -> None:
    launcher, project = shop
    app = start_gunicorn(launcher, project, workers=3)
    project.push(app.url)
    proc = project.pack("status", app.url, "--json")
    workers = json.loads(proc.stdout)["workers"]
    assert len(workers) == 3 and all(w["version"] == 1 and w["last_outcome"]["outcome"] == "ok" for w in workers)
    assert all({"pid", "version", "started", "last_outcome"} <= set(w) for w in workers)
    victim = workers[-1]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(project, app), "the dead worker dropping out")
    text = project.pack("status", app.url).stdout
    assert f"pid {victim}:" not in text and text.count("\nworker     pid ") >= 2


# ------------------------------------------------------------------------------------ uvicorn


def test_one_push_reaches_every_uvicorn_worker(launcher, tmp_path) -> None:
    project = make_project(tmp_path / "api", "fastapi_app")
    argv = [sys.executable, "-m", "uvicorn", "asgi:app", "--workers", "3", "--port", "0", "--host", "127.0.0.1",
            "--app-dir", str(EXAMPLES / "fastapi_app")]
    app = launcher.start(argv, env=project.app_env(), cwd=EXAMPLES / "fastapi_app", name="uvicorn",
                         ready=UVICORN_READY)
    pids = {w["pid"] for w in wait_for_workers(project, app, 3)}
    project.edit("api/main.py", GREETING, 'return "Hello, uvicorn"')
    proc = project.push(app.url)
    assert len(re.findall(r"^  worker \d+\s+v1\s+applied", proc.stdout, re.M)) == 3
    assert {a["message"] for a in from_every_worker(app.url, pids).values()} == {"Hello, uvicorn"}
