"""A fleet on loopback for the channel's tests and benchmark: "machines" of app processes and a project.

A *machine* is what two real machines would not share: its own store, its own trusted-keys file and
its own runtime directory. Each runs ``processes`` real app processes (a plain HTTP server that
installs the overlay with ``channel=`` and serves what its code says), all subscribed to one Redis.
The project is the developer's copy, pushed with the real ``habanero-pack`` through the channel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.e2e import PACK, TIMEOUT, AppProcess, Launcher, base_env, get_json

from overlay.keys import SigningKey, generate_signing_key

APP_ID = "fleetapp"

SERVE = '''\
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.environ["FLEET_CODE"])  # the code on disk, until a version is pushed
import overlay

ov = overlay.install(packages=["fleetapp"])   # HABANERO_STORE, _TRUSTED_KEYS, _CHANNEL from the environment
from fleetapp import views


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "version": views.VERSION, "bundle": ov.version,
                           "store": os.environ["HABANERO_STORE"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
'''


@dataclass
class Machine:
    """One machine of the fleet: a store, a trust file, a runtime directory, its processes."""

    name: str
    root: Path
    trusted_keys: Path
    apps: list[AppProcess] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def runtime(self) -> Path:
        return self.root / "rt"


@dataclass
class FleetProject:
    root: Path     # the developer's project: pyproject.toml, fleetapp/
    home: Path
    key: SigningKey
    channel: str

    def pack(self, *args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PACK, *args], cwd=self.root, env=env or base_env(self.home), text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)

    def edit(self, rel: str, old: str, new: str) -> None:
        path = self.root / rel
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} is not in {rel}"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")


def make_fleet_project(base: Path, channel: str, *, modules: int = 0) -> FleetProject:
    """The project: ``fleetapp`` (``views.VERSION = 1``), ``modules`` more modules for size, a key."""
    root = base / "dev"
    (root / "fleetapp").mkdir(parents=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "fleetapp"\n\n[tool.habanero]\napp_id = "{APP_ID}"\n'
                                         f'packages = ["fleetapp"]\nchannel = "{channel}"\n', encoding="utf-8")
    (root / "fleetapp" / "__init__.py").write_text(  # the app uses every module: all of them are live
        "".join(f"from . import mod{n:04d}\n" for n in range(modules)), encoding="utf-8")
    (root / "fleetapp" / "views.py").write_text("import os\nimport time\n\nVERSION = 1\n", encoding="utf-8")
    for n in range(modules):
        (root / "fleetapp" / f"mod{n:04d}.py").write_text(
            f'"""Module {n}."""\n\nVALUE = {n}\n\n\ndef f{n}(x):\n    return x + VALUE\n', encoding="utf-8")
    key = generate_signing_key(root / ".habanero" / "deploy_key", comment="fleet@habanero")
    home = base / "home"
    home.mkdir()
    return FleetProject(root, home, key, channel)


def make_machine(name: str, trusted: list[str]) -> Machine:
    """A machine's directories, short (its Unix sockets' paths must stay under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix=f"hb{name}-"))
    (root / "rt").mkdir(mode=0o700)
    keys = root / "trusted_keys"
    keys.write_text("".join(line + "\n" for line in trusted), encoding="utf-8")
    return Machine(name, root, keys)


def start_process(launcher: Launcher, machine: Machine, project: FleetProject, **env: str) -> AppProcess:
    script = machine.root / "serve.py"
    script.write_text(SERVE, encoding="utf-8")
    app = launcher.start([sys.executable, str(script)], cwd=machine.root, name=f"{machine.name}-{len(machine.apps)}",
                         env=base_env(project.home, **{"HABANERO_STORE": str(machine.store),
                                      "HABANERO_TRUSTED_KEYS": str(machine.trusted_keys),
                                      "HABANERO_CHANNEL": project.channel, "HABANERO_RUNTIME_DIR": str(machine.runtime),
                                      "FLEET_CODE": str(project.root), **env}))
    machine.apps.append(app)
    return app


def serving(apps: list[AppProcess]) -> dict[int, int]:
    """What each process serves: ``{pid: views.VERSION}``."""
    return {answer["pid"]: answer["version"] for answer in (get_json(app.url) for app in apps)}


def wait_serving(apps: list[AppProcess], version: int, timeout: float = TIMEOUT) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = serving(apps)
        if set(seen.values()) == {version} or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def members(project: FleetProject, count: int, timeout: float = TIMEOUT) -> dict[str, Any]:
    """``habanero-pack status --json`` once ``count`` members are live."""
    deadline = time.monotonic() + timeout
    while True:
        proc = project.pack("status", "--json")
        status = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}
        if len(status.get("members") or []) == count and len(status.get("workers") or []) == count:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"not {count} members after {timeout:g} s: {proc.stdout}\n{proc.stderr}")
        time.sleep(0.2)
