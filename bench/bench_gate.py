"""The request gate's cost: request latency at 200 requests/s while one-line changes are pushed.

The app is bench_workers' WSGI app over bench_build's synthetic 1,000-module project, installed with
the overlay and served by one ``gunicorn -k gthread --threads 8`` worker on loopback. A client sends
``/value`` at a fixed 200 requests/s (open loop: each request's latency runs from the moment it was
due, so a request held at the gate counts the time it waited), while ``habanero-pack push`` sends a
one-line change of ``target()`` every ``PUSH_EVERY`` seconds. Twice, side by side: with the gate on
(the default) and off (``HABANERO_GATE=0``). Added latency is gate on minus gate off.

Run ``.venv/bin/python bench/bench_gate.py``; it prints markdown tables. ``run()`` returns them.
"""

from __future__ import annotations

import http.client
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_watch import PACK, _free_port, _Proc, _Project  # noqa: E402
from bench_workers import APP  # noqa: E402

RATE = 200  # requests per second
SECONDS = 12.0
PUSH_EVERY = 0.5
CLIENTS = 16
TARGETS = "targets: added p99 < 10 ms at 200 requests/s while pushing, 0 failed requests"
LISTENING = re.compile(r"Listening at: (http://\S+)")


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="habanero-bench-gate-") as tmp:
        project = _Project(Path(tmp) / "project", app_file="workers_app.py", app=APP)
        return [_measure(project, gate) for gate in (True, False)]


def _measure(project: _Project, gate: bool) -> dict:
    env = {**project.env, "BENCH_OVERLAY": "1", "HABANERO_GATE": "1" if gate else "0"}
    argv = [sys.executable, "-m", "gunicorn", "workers_app:application", "-k", "gthread", "--threads", "8",
            "-w", "1", "-b", f"127.0.0.1:{_free_port()}", "--chdir", str(project.root)]
    app = _Proc(argv, project.root, env)
    try:
        url = app.wait_for(LISTENING)[1]
        push = subprocess.run([*PACK, "push", url, "-q"], cwd=project.root, env=project.env, capture_output=True,
                              text=True)  # the first push moves the app onto bundles (not measured)
        assert push.returncode == 0, push.stderr
        load = _OpenLoop(url)
        pushes: list[float] = []
        failed_pushes = 0
        load.start()
        edit = 0
        while time.monotonic() < load.end - PUSH_EVERY:
            time.sleep(PUSH_EVERY)
            edit += 1
            project.edit(f"edit-{edit}-{'on' if gate else 'off'}")
            started = time.perf_counter()
            result = subprocess.run([*PACK, "push", url, "-q"], cwd=project.root, env=project.env,
                                    capture_output=True, text=True)
            pushes.append((time.perf_counter() - started) * 1000)
            failed_pushes += result.returncode != 0
        load.join()
        return {"gate": gate, "latencies": load.latencies, "failed": load.failed, "pushes": len(pushes),
                "failed_pushes": failed_pushes, "sent": load.sent}
    finally:
        app.stop()


class _OpenLoop:
    """``RATE`` requests a second for ``SECONDS``, each timed from when it was due."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//")[1].split(":")
        self.address = (host, int(port))
        self.latencies: list[float] = []
        self.failed = 0
        self.sent = 0
        self.end = 0.0
        self._due: queue.Queue[float | None] = queue.Queue()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        self._scheduler = threading.Thread(target=self._schedule, daemon=True)

    def start(self) -> None:
        self.end = time.monotonic() + SECONDS
        for thread in self._threads:
            thread.start()
        self._scheduler.start()

    def join(self) -> None:
        self._scheduler.join()
        for thread in self._threads:
            thread.join(30)

    def _schedule(self) -> None:
        begin = time.monotonic()
        count = int(SECONDS * RATE)
        for i in range(count):
            due = begin + i / RATE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._due.put(due)
        for _ in self._threads:
            self._due.put(None)

    def _client(self) -> None:
        conn = http.client.HTTPConnection(*self.address, timeout=30)
        while (due := self._due.get()) is not None:
            try:
                conn.request("GET", "/value")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(*self.address, timeout=30)
            took = (time.monotonic() - due) * 1000
            with self._lock:
                self.sent += 1
                self.latencies.append(took)
                self.failed += not ok
        conn.close()


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def table(rows: list[dict]) -> str:
    lines = ["| 200 requests/s, 1,000-module app, pushing every 0.5 s | p50 | p99 | max | requests | failed | pushes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lat = row["latencies"]
        lines.append(f"| gate {'on (default)' if row['gate'] else 'off'} | {statistics.median(lat):.1f} ms | "
                     f"{_percentile(lat, 99):.1f} ms | {max(lat):.1f} ms | {row['sent']} | {row['failed']} | "
                     f"{row['pushes']} ({row['failed_pushes']} refused) |")
    on, off = rows
    added = _percentile(on["latencies"], 99) - _percentile(off["latencies"], 99)
    lines += ["", f"Gate on minus gate off: {added:+.1f} ms at p99 ({_percentile(on['latencies'], 99):.1f} against "
              f"{_percentile(off['latencies'], 99):.1f} ms; below zero, the run-to-run noise of the pushes' own CLI "
              f"processes on the same CPUs is larger than the gate's cost) and "
              f"{statistics.median(on['latencies']) - statistics.median(off['latencies']):+.1f} ms at the median, "
              f"measured side by side in one run: one gunicorn gthread worker (8 threads), {RATE} requests/s for "
              f"{SECONDS:g} s each, a one-line push every {PUSH_EVERY:g} s through the real CLI. Python "
              f"{platform.python_version()}, {os.cpu_count()} CPUs. {TARGETS}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    print(table(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
