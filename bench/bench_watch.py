"""Save to live: ``habanero-pack --push --watch`` against a restart-based reloader, 1,000 modules.

The project is bench_build's synthetic one (20 packages x 50 modules of ~50 lines) plus a
``target()`` function in its first module. The app is one aiohttp process that imports all 1,000
modules at start and serves ``/value`` (``target()``'s answer, looked up per request) and ``/count``
(an in-memory counter). Both contenders run the same app on loopback, one after the other:

- **habanero**: the app installs the overlay (mounted at ``/_habanero``); the real console script
  ``habanero-pack --push URL --watch -v`` runs in the project.
- **restart**: ``watchfiles.run_process`` restarts the app (no overlay, bytecode cached on disk) on
  every save, as ``uvicorn --reload`` does; same debounce and step as habanero's watcher, so the
  difference is the restart itself.

Each edit rewrites ``target()`` to return a new value; the clock runs from just before the file
write to the first ``/value`` answer with the new value, polled every millisecond by this process.
After warm-up edits (not counted), the watcher's ``-v`` lines give the bytes of each push and the
phase split (client: status, build, transfer, confirm; server: verify, plan, stage, apply, commit).

Run ``.venv/bin/python bench/bench_watch.py``; it prints markdown tables. ``run()`` returns the rows.
"""

from __future__ import annotations

import ast
import http.client
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import _synthetic as synthetic_project  # noqa: E402  (the same 1,000 modules)

from overlay.keys import generate_signing_key  # noqa: E402

EDITS, WARMUP = 25, 2
POLL_S = 0.001
TIMEOUT = 60.0
DEBOUNCE_MS, STEP_MS = 20, 2  # habanero's defaults (packer.watch), given to the restarter too
_PACK = Path(sys.executable).with_name("habanero-pack")
PACK = [str(_PACK)] if _PACK.exists() else [sys.executable, "-m", "packer"]
TARGETS = "targets: habanero median < 25 ms, p95 < 50 ms, >= 20x faster than the restart"

APP = '''\
import asyncio, importlib, os, pkgutil, sys
from aiohttp import web

root = sys.argv[1]
sys.path.insert(0, root)
packages = open(os.path.join(root, "packages.txt")).read().split()
app = web.Application()
if os.environ.get("BENCH_OVERLAY") == "1":
    import overlay
    overlay.install(packages=packages, app_id="synthetic", trusted_keys=os.path.join(root, "trusted_keys"),
                    store=os.path.join(root, ".store"), app=app)
for package in packages:
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(info.name)
target = importlib.import_module(os.environ["BENCH_TARGET"])
hits = {"count": 0}


async def value(request):
    return web.Response(text=target.target())


async def count(request):
    hits["count"] += 1
    return web.Response(text=str(hits["count"]))


app.router.add_get("/value", value)
app.router.add_get("/count", count)


async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(os.environ["PORT"]))
    await site.start()
    print(f"listening on http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


try:
    asyncio.run(main())
except KeyboardInterrupt:
    pass
'''

RESTARTER = "import sys, watchfiles; watchfiles.run_process(*sys.argv[4:], target=sys.argv[1], " \
            "target_type='command', debounce=int(sys.argv[2]), step=int(sys.argv[3]))"
TARGET = '\n\ndef target():\n    return {value!r}\n'
PUSH_INFO = re.compile(r"info: push v(?P<version>\d+): (?P<bytes>\d+) bytes \((?P<kind>\w+)\), "
                       r"client (?P<client>\{.*?\}), server (?P<server>\{.*\})$")
SAVE_TO_LIVE = re.compile(r"  save-to-live (\d+) ms$")


def run(edits: int = EDITS) -> list[dict]:
    """Both contenders on one project; one dict each: latencies (ms), state kept, bytes, phases."""
    with tempfile.TemporaryDirectory(prefix="habanero-bench-watch-") as tmp:
        project = _Project(Path(tmp) / "project")
        return [_habanero(project, edits), _restart(project, edits)]


class _Project:
    """The synthetic 1,000-module app, with ``app`` written to ``app_file`` (bench_workers' too)."""

    def __init__(self, root: Path, *, app_file: str = "app.py", app: str = APP) -> None:
        synthetic_project(root)
        self.root = root
        self.packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists())
        (root / "packages.txt").write_text("\n".join(self.packages))
        key = generate_signing_key(root / ".habanero" / "deploy_key", comment="bench")
        (root / "trusted_keys").write_text(key.public.line() + "\n")
        (root / app_file).write_text(app)
        self.file = sorted((root / self.packages[0]).glob("m00_*.py"))[0]
        self.module = f"{self.packages[0]}.{self.file.stem}"
        self.original = self.file.read_text() + TARGET.format(value="edit-0")
        self.file.write_text(self.original)
        # As on a developer's machine: bytecode is cached (a restart would otherwise recompile all
        # 1,000 modules each time, which flatters habanero), and no HABANERO_* setting leaks in.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("HABANERO_") and k != "PYTHONDONTWRITEBYTECODE"}
        self.env.update(BENCH_TARGET=self.module, BENCH_ROOT=str(root),
                        PYTHONPATH=str(Path(__file__).resolve().parent.parent))

    def edit(self, value: str) -> None:
        self.file.write_text(self.original.replace("'edit-0'", repr(value)))


def _habanero(project: _Project, edits: int) -> dict:
    app = _Proc([sys.executable, "app.py", str(project.root)], project.root, {**project.env, "PORT": "0",
                                                                              "BENCH_OVERLAY": "1"})
    watcher = None
    try:
        url = app.wait_for(re.compile(r"listening on (\S+)"))[1]
        watcher = _Proc([*PACK, "--push", url, "--watch", "-v"], project.root, project.env)
        watcher.wait_for(re.compile(r"^watching "))
        full = watcher.wait_for(PUSH_INFO)  # the first push: the whole project
        poll = _Poller(url)
        before = _count(poll)
        latencies, infos, reported = [], [], []
        for i in range(1, WARMUP + edits + 1):
            mark = len(watcher.lines)
            latencies.append(_save_and_wait(project, poll, f"edit-{i}"))
            infos.append(watcher.wait_for(PUSH_INFO, after=mark))
            reported.append(int(watcher.wait_for(SAVE_TO_LIVE, after=mark)[1]))
        after = _count(poll)
    finally:
        for proc in (watcher, app):
            if proc is not None:
                proc.stop()
    infos, reported = infos[WARMUP:], reported[WARMUP:]
    client = [ast.literal_eval(m["client"]) for m in infos]
    server = [ast.literal_eval(m["server"]) for m in infos]
    phases = {"save to push start (watch event, refresh, digest)":
              [r - c["total"] for r, c in zip(reported, client)]}
    phases.update({f"client {k}": [c[k] for c in client] for k in ("status", "build", "transfer", "confirm")})
    phases.update({f"server {k}": [s.get(k, 0.0) for s in server]
                   for k in ("verify", "plan", "stage", "apply", "commit", "total")})
    # Negative: the app answers anew before the watcher has read its status back and printed.
    phases["poll sees the new answer, minus the watcher's own figure"] = [
        b - r for b, r in zip(latencies[WARMUP:], reported)]
    return {"contender": "habanero --push --watch", **_stats(latencies[WARMUP:]),
            "state_kept": after == before + 1, "counter": f"{before} -> {after}",
            "bytes_full": int(full["bytes"]), "bytes_delta": statistics.median(int(m["bytes"]) for m in infos),
            "delta": all(m["kind"] == "delta" for m in infos),
            "phases": {k: statistics.median(v) for k, v in phases.items()}}


def _restart(project: _Project, edits: int) -> dict:
    port = _free_port()
    command = shlex.join([sys.executable, "app.py", str(project.root)])
    paths = [str(project.root / p) for p in project.packages]
    project.edit("edit-0")
    restarter = _Proc([sys.executable, "-c", RESTARTER, command, str(DEBOUNCE_MS), str(STEP_MS), *paths],
                      project.root, {**project.env, "PORT": str(port)})
    try:
        poll = _Poller(f"http://127.0.0.1:{port}")
        poll.wait_for("/value", "edit-0")
        before = _count(poll)
        # Each value a different length: CPython's bytecode cache trusts a .pyc whose source has the
        # same mtime (whole seconds) and size, so two same-size edits within a second would restart
        # into the old code and never show the new value. A real pitfall of restart reloaders, kept
        # out of this measurement.
        latencies = [_save_and_wait(project, poll, f"restart-{i}-" + "." * i) for i in range(1, WARMUP + edits + 1)]
        after = _count(poll)
    finally:
        restarter.stop()
    return {"contender": "watchfiles.run_process restart", **_stats(latencies[WARMUP:]),
            "state_kept": after == before + 1, "counter": f"{before} -> {after}",
            "bytes_full": None, "bytes_delta": None, "delta": False, "phases": {}}


def _save_and_wait(project: _Project, poll: _Poller, value: str) -> float:
    time.sleep(0.05)  # let the previous save settle: each edit is measured on its own
    started = time.perf_counter()
    project.edit(value)
    return (poll.wait_for("/value", value) - started) * 1000


def _count(poll: _Poller) -> int:
    """The app's in-memory counter, one more with each call."""
    answer = poll.get("/count")
    if answer is None:
        raise RuntimeError("the app does not answer /count")
    return int(answer)


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(values), "median_ms": statistics.median(values),
            "p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "min_ms": ordered[0], "max_ms": ordered[-1]}


class _Poller:
    """GET on one keep-alive connection, reconnecting while the app is away (a restart)."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.address = (host, int(port))
        self.conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> str | None:
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.address, timeout=5)
            self.conn.request("GET", path)
            return self.conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return None

    def wait_for(self, path: str, want: str) -> float:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.get(path) == want:
                return time.perf_counter()
            time.sleep(POLL_S)
        raise RuntimeError(f"{path} never answered {want!r}")


def _default_sigint() -> None:
    """A benchmark started in the background inherits an ignored SIGINT, and so would the app: then
    run_process's SIGINT would not stop it, and every restart would wait out its 5 s timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Proc:
    """A child in its own session whose output lines a thread collects."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_sigint)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        with self._changed:
            while time.monotonic() < deadline and self.proc.poll() is None:
                for line in self.lines[after:]:
                    if found := pattern.search(line):
                        return found
                self._changed.wait(0.1)
        raise RuntimeError(f"no {pattern.pattern!r}:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the watcher prints its summary; run_process stops the app
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        self.proc.wait(TIMEOUT)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table(rows: list[dict]) -> str:
    lines = ["| save to live, 1,000-module app | median | p95 | min | max | in-memory state | bytes per push |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        kind = "delta" if r["delta"] else "full"
        sent = "n/a"
        if r["bytes_full"]:
            sent = f"{r['bytes_delta']:,.0f} B {kind} (first push {r['bytes_full']:,} B full)"
        state = f"{'kept' if r['state_kept'] else 'lost'} (counter {r['counter']})"
        lines.append(f"| {r['contender']} | {r['median_ms']:.1f} ms | {r['p95_ms']:.1f} ms | "
                     f"{r['min_ms']:.1f} ms | {r['max_ms']:.1f} ms | {state} | {sent} |")
    phases = rows[0]["phases"]
    lines += ["", "| habanero, where the time goes (medians) | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.1f} |" for name, ms in phases.items()]
    return "\n".join(lines)


def main() -> int:
    rows = run()
    print(table(rows))
    ours, restart = rows
    print(f"\nhabanero is {restart['median_ms'] / ours['median_ms']:.1f}x faster than the restart at the median "
          f"({restart['p95_ms'] / ours['p95_ms']:.1f}x at p95). {EDITS} edits of one function each, after "
          f"{WARMUP} warm-up edits; file write to the app's new answer, polled every {POLL_S * 1000:g} ms. "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs. {TARGETS}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
