"""``habanero-pack --push`` end to end: a one-line change in a 1,000-module app, CLI start to confirmed.

The project is bench_build's synthetic one (20 packages x 50 modules of ~50 lines: imports,
constants, two functions, a dataclass). The app is a real process that installs the overlay with
``listen="127.0.0.1:0"`` and imports all 1,000 modules. After a first full push (not measured), each
measured push changes one line in one function and runs the real console script, ``habanero-pack
--push URL --json``, as a subprocess: the wall time is what a developer waits, interpreter start
included. The CLI's JSON splits it (status, build, transfer, server, confirm) and carries the
server's own report (verify, plan, stage, apply, commit); "outside the CLI's clock" is interpreter
start, imports, config and key loading, and exit.

Run ``.venv/bin/python bench/bench_push.py``; it prints a markdown table. ``run()`` returns the rows.
"""

from __future__ import annotations

import json
import os
import re
import signal
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

PUSHES = 21
TIMEOUT = 60
_PACK = Path(sys.executable).with_name("habanero-pack")
PACK = [str(_PACK)] if _PACK.exists() else [sys.executable, "-m", "packer"]
TARGETS = "targets: server side < 10 ms; whole command < 300 ms, interpreter start included"

# The app: serve the project's packages from the overlay, import every module, report the address.
APP = '''\
import importlib, os, pkgutil, sys, threading
import overlay

root = sys.argv[1]
sys.path.insert(0, root)
packages = open(os.path.join(root, "packages.txt")).read().split()
ov = overlay.install(packages=packages, app_id="synthetic", trusted_keys=os.path.join(root, "trusted_keys"),
                     store=os.path.join(root, ".store"), listen="127.0.0.1:0")
count = 0
for package in packages:
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        importlib.import_module(info.name)
        count += 1
print(f"habanero on http://{ov.address[0]}:{ov.address[1]} serving {count} modules", flush=True)
threading.Event().wait()
'''

# (label, where in the JSON, indent): the table's rows, in the order of one push.
PHASES = [
    ("whole command: CLI start to confirmed", ("wall",), 0),
    ("outside the CLI's clock: interpreter, imports, config, key, exit", ("outside",), 1),
    ("status: ask the app for its version", ("timings_ms", "status"), 1),
    ("build: collect, hash, compress, sign", ("timings_ms", "build"), 1),
    ("transfer", ("timings_ms", "transfer"), 1),
    ("server side (the push handler)", ("timings_ms", "server"), 1),
    ("verify", ("report", "timings_ms", "verify"), 2),
    ("plan (diff, compile)", ("report", "timings_ms", "plan"), 2),
    ("stage (new objects, the bundle file)", ("report", "timings_ms", "stage"), 2),
    ("apply (source tree, re-run, patch in place)", ("report", "timings_ms", "apply"), 2),
    ("commit", ("report", "timings_ms", "commit"), 2),
    ("confirm: read the status back", ("timings_ms", "confirm"), 1),
]


def run(pushes: int = PUSHES) -> list[dict]:
    """Time ``pushes`` one-line pushes; one dict per row: phase, indent, median, p95 and unit."""
    with tempfile.TemporaryDirectory(prefix="habanero-bench-push-") as tmp:
        root = _project(Path(tmp) / "project")
        env = _env(Path(tmp) / "pycache")
        app = _App(root, env)
        try:
            url = app.url
            _push(root, url, env)  # v1: the whole project, replacing what was imported from disk
            samples = [_push(root, url, env, edit=i) for i in range(pushes)]
        finally:
            app.stop()
    rows = []
    for label, path, indent in PHASES:
        values = [_dig(s, path) for s in samples]
        rows.append({"phase": label, "indent": indent, "median": statistics.median(values), "p95": _p95(values),
                     "unit": "ms"})
    sizes = [float(s["bytes"]) for s in samples]
    rows.append({"phase": "bytes sent (a delta)", "indent": 0, "median": statistics.median(sizes),
                 "p95": _p95(sizes), "unit": "B"})
    return rows


def _project(root: Path) -> Path:
    synthetic_project(root)
    config = (root / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)"', re.search(r"packages = \[(.*)\]", config)[1])
    (root / "packages.txt").write_text(" ".join(packages))
    key = generate_signing_key(root / ".habanero" / "deploy_key", comment="bench")
    (root / "trusted_keys").write_text(key.public.line() + "\n")
    (root / "app.py").write_text(APP)
    return root


def _env(pycache: Path) -> dict[str, str]:
    """No HABANERO_* settings leaking in; bytecode cached (in ``pycache``) as on a developer's machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HABANERO_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


class _App:
    """The app process: its own process group, killed and reaped by ``stop()``."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.url = ""
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(root / "app.py"), str(root)], cwd=root, text=True,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.append(line)
                if line.startswith("habanero on "):
                    self.url = line.split()[2]
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        try:
            if not ready.wait(TIMEOUT) or not self.url:
                raise RuntimeError("the bench app did not start:\n" + "".join(self.lines))
        except BaseException:  # Ctrl-C included
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)
        self.proc.stdout.close()  # type: ignore[union-attr]


_LINE = re.compile(r'out\.setdefault\("(\w+)", \d+\)')


def _push(root: Path, url: str, env: dict[str, str], edit: int | None = None) -> dict:
    """One ``habanero-pack --push --json``; with ``edit``, change one line of one module first."""
    if edit is not None:
        first_package = (root / "packages.txt").read_text().split()[0]
        target = next((root / first_package).glob("m07_*.py"))  # one file, edited again and again
        target.write_text(_LINE.sub(lambda m: f'out.setdefault("{m[1]}", {1000 + edit})', target.read_text(), 1))
    started = time.perf_counter()
    proc = subprocess.run([*PACK, "--push", url, "--json"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    wall = (time.perf_counter() - started) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"push failed:\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(proc.stdout)
    if edit is not None and result["report"]["changed"] != [_module_name(root, target)]:
        raise RuntimeError(f"expected one changed module, got {result['report']['changed']}")
    result["wall"] = wall
    result["outside"] = wall - result["timings_ms"]["total"]
    return result


def _module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def _dig(sample: dict, path: tuple[str, ...]) -> float:
    value: object = sample
    for key in path:
        value = value[key]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def interpreter_start_ms(runs: int = 9) -> float:
    """``python -c pass`` in this venv: the floor under any command's wall time."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=TIMEOUT)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def table(rows: list[dict]) -> str:
    lines = ["| phase | median | p95 |", "|---|---:|---:|"]
    for r in rows:
        label = "&nbsp;&nbsp;&nbsp;&nbsp;" * r["indent"] + r["phase"]
        digits = ".1f" if r["unit"] == "ms" else ",.0f"
        lines.append(f"| {label} | {r['median']:{digits}} {r['unit']} | {r['p95']:{digits}} {r['unit']} |")
    return "\n".join(lines)


def main() -> int:
    rows = run()
    print(table(rows))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{PUSHES} pushes of a one-line change to one of 1,000 modules, after a first full push; "
          f"`python -c pass` takes {interpreter_start_ms():.1f} ms here. Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {load} (other work on the machine inflates every figure). "
          f"{TARGETS}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
