"""Every worker, one version: save to live on all four gunicorn workers, against ``kill -HUP``.

The project is bench_build's synthetic one (20 packages x 50 modules of ~50 lines) plus a
``target()`` function in its first module. The app is a WSGI app that imports all 1,000 modules at
start and answers ``/value`` (the worker's pid and ``target()``'s answer), ``/count`` (the worker's
pid and an in-memory counter) and ``/memory`` (the worker's pid, RSS and PSS). It runs under
``gunicorn -w 4`` on loopback, twice:

- **habanero**: the app installs the overlay and serves its routes on its own port
  (``ov.wsgi(app)``); ``habanero-pack push --watch URL -v`` runs in the project. The clock runs
  from just before the file write to the watcher's line for that push, which it prints once the
  app answered: after every worker applied and the store committed. Each push is then checked
  (untimed) by asking until all four workers answered with the new value.
- **kill -HUP**: the same app without the overlay, bytecode cached; the file is edited, gunicorn's
  master gets SIGHUP (its graceful reload), and the clock runs until four new workers have answered
  with the new value.

Memory: each worker's RSS (and PSS, which shares a shared library's pages between the processes
that map it) with the overlay, against the same app imported from disk: right after the pushes, at
rest a few seconds later (the store's worker gives the heap the pushes freed back to the system
after ``TRIM_AFTER`` seconds without work), and in new workers started (by a ``kill -HUP``) after
them, which serve the pushed version from the store.

Run ``.venv/bin/python bench/bench_workers.py``; it prints markdown tables. ``run()`` returns them.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_watch import PACK, _free_port, _Poller, _Proc, _Project, _stats  # noqa: E402

from overlay.storage.worker import TRIM_AFTER  # noqa: E402

WORKERS = 4
EDITS, WARMUP = 25, 2
HUP_EDITS = 5
TIMEOUT = 90.0
TARGETS = ("targets: save to live on all four workers, median < 40 ms, p95 < 80 ms, >= 20x faster than "
           "kill -HUP with each worker's state kept; habanero's share of a worker's RSS <= 12 MiB")

APP = '''\
import importlib, os, pkgutil, sys

root = os.environ["BENCH_ROOT"]
sys.path.insert(0, root)
packages = open(os.path.join(root, "packages.txt")).read().split()
ov = None
if os.environ.get("BENCH_OVERLAY") == "1":
    import overlay
    ov = overlay.install(packages=packages, app_id="synthetic", trusted_keys=os.path.join(root, "trusted_keys"),
                         store=os.path.join(root, ".store"))
for package in packages:
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(info.name)
target = importlib.import_module(os.environ["BENCH_TARGET"])
hits = {"count": 0}


def memory():
    def field(path, name):
        for line in open(path):
            if line.startswith(name):
                return int(line.split()[1])
    return field("/proc/self/status", "VmRSS:"), field("/proc/self/smaps_rollup", "Pss:")


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/value":
        body = f"{os.getpid()} {target.target()}"
    elif path == "/count":
        hits["count"] += 1
        body = f"{os.getpid()} {hits['count']}"
    elif path == "/memory":
        rss, pss = memory()
        body = f"{os.getpid()} {rss} {pss}"
    else:
        body = "not here"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


application = ov.wsgi(app) if ov is not None else app
'''
LISTENING = re.compile(r"Listening at: (http://\S+)")
PUSHED = re.compile(r"info: push v(?P<version>\d+): ")


def _gunicorn(project: _Project, overlay: bool) -> tuple[_Proc, str]:
    argv = [sys.executable, "-m", "gunicorn", "workers_app:application", "-w", str(WORKERS), "-b",
            f"127.0.0.1:{_free_port()}", "--chdir", str(project.root), "--graceful-timeout", "10"]
    proc = _Proc(argv, project.root, {**project.env, "BENCH_OVERLAY": "1" if overlay else "0"})
    return proc, proc.wait_for(LISTENING)[1]


def _answers(poll: _Poller, path: str, count: int, *, want: str | None = None,
             exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """One answer per worker pid (``count`` of them, none in ``exclude``) whose value is ``want``."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + TIMEOUT
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: only {sorted(seen)} answered {want!r}")
        answer = poll.get(path)
        if answer is None:
            time.sleep(0.005)
            continue
        pid, _, value = answer.partition(" ")
        if pid not in exclude and (want is None or value == want):
            seen[pid] = value
        poll.conn = None  # a new connection each time: gunicorn's sync workers take turns
    return seen


def _memory(poll: _Poller) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in v.split()) for v in _answers(poll, "/memory", WORKERS).values()]  # type: ignore[misc]


def _habanero(project: _Project) -> dict:
    app, url = _gunicorn(project, overlay=True)
    watcher = None
    try:
        poll = _Poller(url)
        _answers(poll, "/value", WORKERS)  # every worker up
        before = {pid: int(v) for pid, v in _answers(poll, "/count", WORKERS).items()}
        watcher = _Proc([*PACK, "push", url, "--watch", "-v"], project.root, project.env)
        watcher.wait_for(re.compile(r"^watching "))
        watcher.wait_for(PUSHED)  # the first push: the whole project, on every worker
        latencies = []
        for i in range(1, WARMUP + EDITS + 1):
            time.sleep(0.05)
            mark = len(watcher.lines)
            started = time.perf_counter()
            project.edit(f"edit-{i}")
            watcher.wait_for(PUSHED, after=mark)
            latencies.append((time.perf_counter() - started) * 1000)
            _answers(poll, "/value", WORKERS, want=f"edit-{i}")  # the proof, off the clock
        after = {pid: int(v) for pid, v in _answers(poll, "/count", WORKERS).items()}
        busy = _memory(poll)
        time.sleep(TRIM_AFTER + 1.0)  # at rest: the store's worker has given freed memory back
        memory = _memory(poll)
        # New workers (gunicorn's graceful reload) start on the store's active version: the
        # memory of a worker that never saw a push, serving the pushed code.
        os.kill(app.proc.pid, signal.SIGHUP)
        _answers(poll, "/value", WORKERS, want=f"edit-{WARMUP + EDITS}", exclude=frozenset(map(str, after)))
        fresh = _memory(poll)
    finally:
        for proc in (watcher, app):
            if proc is not None:
                proc.stop()
    # The same workers, each counter gone on from where it was (asking every worker counts too).
    kept = set(after) == set(before) and all(after[pid] > before[pid] for pid in before)
    return {"contender": f"habanero push --watch, gunicorn -w {WORKERS}", **_stats(latencies[WARMUP:]),
            "state_kept": kept, "memory_busy": busy, "memory": memory, "memory_fresh": fresh}


def _hup(project: _Project) -> dict:
    project.edit("edit-0")
    app, url = _gunicorn(project, overlay=False)
    try:
        poll = _Poller(url)
        workers = frozenset(_answers(poll, "/value", WORKERS))
        memory = _memory(poll)
        before = _answers(poll, "/count", WORKERS)
        latencies = []
        for i in range(1, HUP_EDITS + 1):
            time.sleep(0.05)
            started = time.perf_counter()
            project.edit(f"hup-{i}")
            os.kill(app.proc.pid, signal.SIGHUP)
            workers = frozenset(_answers(poll, "/value", WORKERS, want=f"hup-{i}", exclude=workers))
            latencies.append((time.perf_counter() - started) * 1000)
        after = _answers(poll, "/count", WORKERS)
    finally:
        app.stop()
    kept = set(after) == set(before)  # new workers: each counter starts again
    return {"contender": f"kill -HUP of gunicorn -w {WORKERS} (graceful reload)", **_stats(latencies),
            "state_kept": kept, "memory": memory}


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="habanero-bench-workers-") as tmp:
        project = _Project(Path(tmp) / "project", app_file="workers_app.py", app=APP)
        return [_habanero(project), _hup(project)]


def table(rows: list[dict]) -> str:
    ours, hup = rows
    lines = [f"| save to live on all {WORKERS} workers, 1,000-module app | median | p95 | min | max | "
             "each worker's in-memory state |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['median_ms']:.1f} ms | {r['p95_ms']:.1f} ms | {r['min_ms']:.1f} ms | "
                     f"{r['max_ms']:.1f} ms | {'kept' if r['state_kept'] else 'lost'} |")
    lines += ["", "| a worker's memory (median of 4) | with habanero | imported from disk | habanero's share |",
              "|---|---:|---:|---:|"]
    pushes = WARMUP + EDITS + 1
    for when, key in ((f"right after {pushes} pushes", "memory_busy"), (f"{TRIM_AFTER + 1:g} s after them", "memory"),
                      ("started after them", "memory_fresh")):
        for column, name in ((0, "RSS"), (1, "PSS")):
            ma = statistics.median(m[column] for m in ours[key])
            mb = statistics.median(m[column] for m in hup["memory"])
            lines.append(f"| {name}, {when} | {ma / 1024:.1f} MiB | {mb / 1024:.1f} MiB | "
                         f"{(ma - mb) / 1024:.1f} MiB |")
    return "\n".join(lines)


def main() -> int:
    rows = run()
    print(table(rows))
    ours, hup = rows
    print(f"\nhabanero is {hup['median_ms'] / ours['median_ms']:.0f}x faster than kill -HUP at the median "
          f"({hup['p95_ms'] / ours['p95_ms']:.0f}x at p95). {EDITS} edits of one function each after {WARMUP} "
          f"warm-up edits ({HUP_EDITS} reloads for kill -HUP); Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs. {TARGETS}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
