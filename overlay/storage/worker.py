"""The store's worker thread: what a push makes necessary but need not wait for.

Flushes (``sync="background"``), retention, sweeping unreferenced objects, deleting directories
taken out of the way, and setting up the next push run here, after the push has answered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from overlay.errors import StoreError
from overlay.storage import fs

__all__ = ["Task", "Worker"]

logger = logging.getLogger("overlay.store")

Task = Callable[[], None]

#: Seconds without work before the freed heap goes back to the system. Not after every push: the
#: next one would fault those pages in again (a full bundle's megabytes), and pushes come in bursts.
TRIM_AFTER = 2.0


class Worker:
    """One daemon thread running tasks in order; started at the first task, stopped by :meth:`stop`."""

    def __init__(self, label: str) -> None:
        self.label = label  # for log messages: the store's path
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def later(self, task: Task) -> None:
        """Run ``task`` on the worker thread, after the current push has answered. An ``OSError`` or
        ``StoreError`` it raises is logged as a warning."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="habanero-store-worker", daemon=True)
            self._thread.start()
        self._tasks.put(task)

    def _work(self) -> None:
        owed = False  # memory freed since the last trim
        while True:
            try:
                task = self._tasks.get(timeout=TRIM_AFTER if owed else None)
            except queue.Empty:  # quiet for a while: give the memory back now
                _give_memory_back()
                owed = False
                continue
            owed = True
            try:
                if task is None:  # stop()
                    return
                task()
            except (OSError, StoreError) as exc:
                logger.warning("store %s: background work failed (%s); it is retried later", self.label, exc)
            except Exception:  # never let the worker die silently
                logger.exception("store %s: background work failed", self.label)
            finally:
                self._tasks.task_done()

    def settle(self) -> None:
        """Wait until queued work is done (tests, shutdown). Never call it holding the store lock."""
        self._tasks.join()

    def stop(self) -> None:
        self.settle()
        if self._thread is not None and self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()

    def flush_later(self, files: list[str], retired: Iterable[str] = ()) -> None:
        """Make ``files`` durable (their data, then their directories), then drop ``retired``: the
        second names that kept replaced files, whose blocks are freed here rather than in a push."""
        if not files:
            return

        def flush() -> None:
            for path in files:
                fs.fsync_path(path)
            for directory in sorted({os.path.dirname(p) for p in files}):
                fs.fsync_path(directory)
            for path in retired:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

        self.later(flush)

    def remove_later(self, path: Path) -> None:
        """Take a directory out of the way now (a rename), delete it on the worker."""
        doomed = path.with_name(f"{fs.TMP_PREFIX}rm-{os.urandom(16).hex()}")
        os.replace(path, doomed)
        self.later(lambda: shutil.rmtree(doomed, ignore_errors=True))


def _give_memory_back() -> None:
    """Hand the heap the last pushes freed back to the system (glibc's ``malloc_trim``): the app
    keeps its memory for itself, whatever a push's planning and the worker's tasks allocated."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim
