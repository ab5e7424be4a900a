"""The store's worker thread: tasks in order, failures logged, memory given back once pushes pause."""

from __future__ import annotations

import time

import pytest

from overlay.storage import worker as _worker
from overlay.storage.worker import Worker


@pytest.fixture
def trims(monkeypatch) -> list[float]:
    """When the worker gave memory back (``malloc_trim``), as ``time.monotonic()`` values."""
    seen: list[float] = []
    monkeypatch.setattr(_worker, "_give_memory_back", lambda: seen.append(time.monotonic()))
    monkeypatch.setattr(_worker, "TRIM_AFTER", 0.3)
    return seen


def test_tasks_run_in_order_and_a_failing_one_does_not_stop_the_others(caplog):
    worker, ran = Worker("test"), []
    worker.later(lambda: ran.append(1))
    worker.later(lambda: (_ for _ in ()).throw(OSError("disk full")))
    worker.later(lambda: ran.append(2))
    worker.stop()
    assert ran == [1, 2] and "disk full" in caplog.text


def test_memory_goes_back_once_the_pushes_pause_not_after_each_one(trims):
    worker = Worker("test")
    started = time.monotonic()
    for _ in range(5):  # a burst: pushes a tenth of a second apart
        worker.later(lambda: None)
        time.sleep(0.1)
    assert trims == []  # none within the burst: the next push would fault those pages in again
    deadline = time.monotonic() + 5
    while not trims and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(trims) == 1 and trims[0] - started >= 0.3 + 0.4
    time.sleep(0.5)
    assert len(trims) == 1  # nothing freed since: nothing to give back
    worker.stop()


def test_a_stopped_worker_leaves_no_thread(trims):
    worker = Worker("test")
    worker.later(lambda: None)
    worker.stop()
    assert worker._thread is not None and not worker._thread.is_alive()
