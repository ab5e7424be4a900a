"""The slow guard: inside ``refusing_processes()``, starting a process fails with "mark it slow".

``tests/conftest.py`` runs every phase of a test not marked ``slow`` inside it, so that
``pytest -m "not slow"`` is the unit tests alone and a test that starts a process without the
marker is caught the first time it runs.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

# Every way this interpreter starts another process: subprocess (and asyncio, os.popen) through
# Popen and fork_exec, multiprocessing through fork or fork_exec, os.spawn* through fork.
STARTERS: list[tuple[object, str]] = [
    (subprocess.Popen, "__init__"), (_posixsubprocess, "fork_exec"),
    *[(os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system") if hasattr(os, name)],
]


@contextlib.contextmanager
def refusing_processes() -> Iterator[list[str]]:
    """Make every way of starting a process raise ``AssertionError`` until the block ends.

    Yields the list of attempts (``"subprocess.Popen(['git', ...])"``): an attempt made from another
    thread, or swallowed by the code under test, is there too, for the caller to fail on.
    """
    started: list[str] = []

    def refuse(what: str) -> Callable[..., None]:
        def starter(*args: object, **kwargs: object) -> None:
            command = (args[1] if len(args) > 1 else kwargs.get("args")) if what == "subprocess.Popen" else None
            started.append(f"{what}({command!r})" if command else what)
            raise AssertionError(f"this test starts a subprocess ({started[-1]}): mark it slow")

        return starter

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in STARTERS:
            what = "subprocess.Popen" if owner is subprocess.Popen else f"{owner.__name__}.{name}"  # type: ignore[attr-defined]
            patch.setattr(owner, name, refuse(what))
        yield started
