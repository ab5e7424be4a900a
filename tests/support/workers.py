"""Helpers for the end-to-end tests of apps under real multi-worker servers (gunicorn, uvicorn)."""

from __future__ import annotations

import re
import time
from typing import Any

from support.e2e import TIMEOUT, AppProcess, DevProject, get_json, status_of

GUNICORN_READY = re.compile(r"Listening at: (?P<url>http://[\d.]+:\d+)")
UVICORN_READY = re.compile(r"Uvicorn running on (?P<url>http://[\d.]+:\d+)")


def wait_for_workers(project: DevProject, app: AppProcess, count: int, *, timeout: float = TIMEOUT,
                     exclude: set[int] = frozenset()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """The app's workers once ``count`` of them take part in deploys (none of ``exclude``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            workers = [w for w in status_of(project, app.url)["workers"] if w["pid"] not in exclude]
        except (AssertionError, OSError):
            workers = []
        if len(workers) == count:
            return workers
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(workers)} workers of {count} after {timeout:g} s:\n{app.output}")
        time.sleep(0.1)


def from_every_worker(url: str, pids: set[int], path: str = "/", *, tries: int = 2000) -> dict[int, dict[str, Any]]:
    """One answer from each process in ``pids``, asking until each has answered."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        answer = get_json(url, path)
        seen.setdefault(answer["pid"], answer)
        if pids <= set(seen):
            return {pid: seen[pid] for pid in pids}
    raise AssertionError(f"only {sorted(seen)} of {sorted(pids)} answered in {tries} requests")
