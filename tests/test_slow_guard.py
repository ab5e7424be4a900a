"""The slow guard itself: a test not marked slow cannot start a process, however it tries.

``make test-fast`` runs ``-m "not slow"`` and is only as fast as this guard is thorough; these
tests run inside the guard of ``tests/conftest.py`` as well, so nothing here really starts.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
from support.processes import STARTERS, refusing_processes


def _nothing() -> None:
    pass


def test_subprocess_is_refused_naming_the_command_and_the_fix():
    with refusing_processes() as started, pytest.raises(AssertionError, match="mark it slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert started == [f"subprocess.Popen({[sys.executable, '-c', 'pass']!r})"]


@pytest.mark.parametrize("start", [
    lambda: os.system("true"),
    lambda: os.popen("true").read(),
    lambda: multiprocessing.get_context("fork").Process(target=_nothing).start(),
    lambda: multiprocessing.get_context("spawn").Process(target=_nothing).start(),
    lambda: asyncio.run(asyncio.create_subprocess_exec("true")),
], ids=["os.system", "os.popen", "multiprocessing fork", "multiprocessing spawn", "asyncio"])
def test_every_other_way_of_starting_a_process_is_refused_too(start):
    with refusing_processes() as started, pytest.raises(AssertionError, match="mark it slow"):
        start()
    assert started


def test_an_attempt_from_another_thread_or_behind_an_except_is_still_recorded():
    def swallowed() -> None:
        try:
            subprocess.run(["true"])
        except BaseException:
            pass

    with refusing_processes() as started:
        thread = threading.Thread(target=swallowed)
        thread.start()
        thread.join(10)
    assert started == ["subprocess.Popen(['true'])"]


def test_everything_is_put_back_when_the_block_ends():
    before = [getattr(owner, name) for owner, name in STARTERS]
    with refusing_processes():
        assert all(getattr(owner, name) is not was for (owner, name), was in zip(STARTERS, before))
    assert all(getattr(owner, name) is was for (owner, name), was in zip(STARTERS, before))
