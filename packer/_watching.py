"""What ``--watch`` asks of the operating system: file events, a check process, SIGTERM.

Each piece reports to one queue of events that :class:`~packer.watch.WatchSession` alone consumes:
``("saved", paths, wall time)``, ``("checked", run, exit status, output, ms)`` and
``("watch_failed", exception)``. Nothing here decides what to push; it only says what happened.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import watchfiles

__all__ = ["CheckRun", "Event", "FileEvents", "step_ms", "stop_on_sigterm"]

Event = tuple[Any, ...]
_MTIME_WINDOW_S = 2.0  # an older mtime is not the save that woke us (a copy that kept its mtime)


def step_ms(debounce_ms: int) -> int:
    """How often watchfiles looks for news: a tenth of the debounce, 1 to 10 ms.

    At 2 ms (the default) a lone save is seen 2-4 ms after the write, for about 2% of one core
    while idle; ``--debounce 100`` trades that for 10-20 ms and a quarter of the wake-ups.
    """
    return max(1, min(10, debounce_ms // 10))


class FileEvents(threading.Thread):
    """watchfiles' loop on a daemon thread: each batch becomes a ``("saved", paths, wall time)``."""

    def __init__(self, paths: Iterable[Path], events: queue.Queue[Event], debounce_ms: int) -> None:
        super().__init__(name="habanero-watch", daemon=True)
        self.paths, self.events, self.debounce_ms = list(paths), events, debounce_ms
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for changes in watchfiles.watch(*self.paths, debounce=self.debounce_ms,
                                            step=step_ms(self.debounce_ms), stop_event=self.stop,
                                            raise_interrupt=False):
                seen = time.time()
                paths = {Path(p) for _, p in changes}
                self.events.put(("saved", paths, _saved_at(paths, seen)))
        except Exception as exc:  # re-raised by the main thread: a dead watch must not look idle
            self.events.put(("watch_failed", exc))


def _saved_at(paths: Iterable[Path], seen: float) -> float:
    """When the batch was saved: its earliest recent mtime, else when the watcher saw it."""
    times = []
    for path in paths:
        try:
            times.append(os.stat(path).st_mtime)
        except OSError:  # deleted or renamed away: only the event time is known
            continue
    return min((t for t in times if seen - _MTIME_WINDOW_S <= t <= seen), default=seen)


class CheckRun:
    """One run of the ``--check`` command, in a process group of its own so it can be killed whole."""

    def __init__(self, command: str, cwd: Path, events: queue.Queue[Event]) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(command, shell=True, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=self._wait, args=(events,), name="habanero-check", daemon=True).start()

    def _wait(self, events: queue.Queue[Event]) -> None:
        output, _ = self.proc.communicate()
        elapsed = (time.perf_counter() - self.started) * 1000
        events.put(("checked", self, self.proc.returncode, output.decode(errors="replace"), elapsed))

    def cancel(self) -> None:
        with contextlib.suppress(OSError):  # finished already, with every child
            os.killpg(self.proc.pid, signal.SIGKILL)


def stop_on_sigterm() -> Callable[[], None]:
    """Let SIGTERM stop the watch as Ctrl-C does (summary, no stray check); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
