"""The watcher end to end: ``habanero-pack --push --watch`` as a real process, and the app it feeds.

Apps come from ``support.e2e`` (its ``Launcher`` kills and reaps them at teardown). The watcher is a
long running child whose lines a thread collects; tests wait for lines (readiness signals), never
for time, and every wait has a deadline. The ``watchers`` fixture (``tests/packer/conftest.py``)
stops each watcher at teardown, even when the test failed: SIGTERM, on which it kills its
``--check`` (which runs in a process group of its own), then SIGKILL to its process group if it did
not exit; reap; close the pipe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from support.e2e import EXAMPLES, PACK, TIMEOUT, AppProcess, DevProject, Launcher, base_env

#: One push line: ``12:00:01  v2  hello.views  patched 1, replaced 0  save-to-live 14 ms``.
PUSHED = re.compile(r"^\d\d:\d\d:\d\d  v(?P<version>\d+)  (?P<changed>.+?)  patched (?P<patched>\d+), "
                    r"replaced (?P<replaced>\d+)  (save-to-live (?P<ms>\d+) ms|pushed at start in \d+ ms)$")
WATCHING = re.compile(r"^watching hello for ")
SUMMARY = re.compile(r"^stopped: (?P<pushes>\d+) push(es)?, (?P<failures>\d+) failures?"
                     r"(, (?P<blocked>\d+) stopped by the check)?, "
                     r"(median save-to-live (?P<median>\d+) ms|no save went live)$")
STOP_TIMEOUT = 5.0  # for a watcher to stop on SIGTERM before it is killed
VIEWS = "hello/views.py"
GREETING = 'return "Hello, world"'


class WatchProcess:
    """``habanero-pack --push URL --watch ARGS`` running in the project; its output, line by line."""

    def __init__(self, project: DevProject, url: str, *args: str) -> None:
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen([*PACK, "--push", url, "--watch", *args], cwd=project.root,
                                     env=base_env(project.home), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._drain, name="drain-watch", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], *, after: int = 0,
                 timeout: float = TIMEOUT) -> tuple[int, re.Match[str]]:
        """The first line at index ``after`` or later that matches: ``(index, match)``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i in range(after, len(self.lines)):
                    if found := pattern.search(self.lines[i]):
                        return i, found
                if self._eof:
                    raise AssertionError(f"the watcher exited ({self.proc.poll()}) before printing "
                                         f"{pattern.pattern!r}:\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern.pattern!r} within {timeout:g} s:\n{self.output}")
                self._changed.wait(left)

    def matching(self, pattern: re.Pattern[str], *, after: int = 0) -> list[str]:
        with self._changed:
            return [line for line in self.lines[after:] if pattern.search(line)]

    def interrupt(self) -> re.Match[str]:
        """Ctrl-C: the watcher must exit 0 with its one-line summary last."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        assert code == 0, f"exit {code}:\n{self.output}"
        found = SUMMARY.search(self.lines[-1]) if self.lines else None
        assert found, f"no summary line last:\n{self.output}"
        return found

    def stop(self) -> None:
        """SIGTERM first (the watcher kills its --check's process group), then SIGKILL; reap, close."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_app(launcher: Launcher, project: DevProject, *, port: int = 0) -> AppProcess:
    """The developer's copy of the aiohttp example (``serve.py`` as shipped) on ``port``."""
    env = {**project.app_env(), "PORT": str(port)}
    return launcher.start([sys.executable, str(project.root / "serve.py")], env=env, cwd=project.root,
                          name="aiohttp example")


def save(project: DevProject, greeting: str, *, extra: str = "") -> None:
    """Rewrite the example's views so that ``greeting()`` returns ``greeting``."""
    text = (EXAMPLES / "aiohttp_app" / VIEWS).read_text(encoding="utf-8")
    # Written whole and renamed into place, as editors that save atomically do: an in-place write
    # can be caught half-done by the watcher (the push of a half file is then refused or fails).
    target = project.root / VIEWS
    scratch = target.with_name(f".{target.name}.saving")
    scratch.write_text(text.replace(GREETING, f"return {greeting!r}") + extra, encoding="utf-8")
    os.replace(scratch, target)


def wait_until(probe: Callable[[], object], *, timeout: float = TIMEOUT, what: str = "") -> object:
    """Poll ``probe`` until it returns something true; fail at the deadline with its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or probe} did not happen within {timeout:g} s (last: {value!r})")
        time.sleep(0.01)

