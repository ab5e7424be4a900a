"""Fixtures for the packer's tests: ``habanero-pack --watch`` processes, stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from support.e2e import DevProject
from support.watch import WATCHING, WatchProcess


@pytest.fixture
def watchers() -> Iterator[Callable[..., WatchProcess]]:
    """``watch(project, url, *args)`` starts a watcher and waits until it watches."""
    started: list[WatchProcess] = []

    def watch(project: DevProject, url: str, *args: str) -> WatchProcess:
        watcher = WatchProcess(project, url, *args)
        started.append(watcher)
        watcher.wait_for(WATCHING)
        return watcher

    try:
        yield watch
    finally:
        for watcher in reversed(started):
            watcher.stop()
