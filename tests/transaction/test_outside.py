"""A failed push puts back what its code changed outside the app (``overlay.transaction.outside``).

The new version of the snippet reaches out of its package (environment, ``sys.path``,
``sys.meta_path``, another module's attribute, a first import of a standard-library module, a
thread), then raises: after the undo everything is as before, and what cannot be put back (the
thread) is named in the failure.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading

import pytest
from support.upgrade import m, start

from overlay.errors import ActivationFailed


def test_a_failed_push_leaves_the_interpreter_and_the_environment_as_they_were(deploy, monkeypatch):
    monkeypatch.setenv("HABANERO_KEPT", "yes")
    start(deploy, "outside")
    assert "tabnanny" not in sys.modules, "the test needs a module nothing imported yet"
    before = (list(sys.path), list(sys.meta_path), dict(os.environ), json.dumps, set(sys.modules))

    with pytest.raises(ActivationFailed) as failed:
        deploy.push("outside", "v2")
    m.probe.events["stop"].set()  # lets the thread the failed version started end

    assert os.environ.get("HABANERO_LEAKED") is None and os.environ["HABANERO_KEPT"] == "yes"
    assert dict(os.environ) == before[2]
    assert sys.path == before[0] and sys.meta_path == before[1]
    assert json.dumps is before[3]
    assert "tabnanny" not in sys.modules and set(sys.modules) == before[4]
    assert sys.modules["upapp"].answer() == 1
    message = str(failed.value)
    assert "the undo could not put back everything: thread 'leaked-worker' it started is still running" in message



def test_the_undo_leaves_alone_what_other_threads_did_meanwhile(deploy, monkeypatch):
    start(deploy, "outside_others")
    monkeypatch.delenv("SET_BY_ANOTHER_THREAD", raising=False)
    real_stdout, captured = sys.stdout, io.StringIO()
    sys.stdout = captured  # another thread's redirect_stdout block, entered before the push
    started: list[threading.Thread] = []

    def other_request() -> None:
        m.probe.events["applying"].wait(10)
        os.environ["SET_BY_ANOTHER_THREAD"] = "1"
        sys.stdout = real_stdout  # ... and left while the push applies
        worker = threading.Thread(target=m.probe.events["stop"].wait, args=(10,), name="request-17", daemon=True)
        worker.start()
        started.append(worker)
        m.probe.events["other thread done"].set()

    other = threading.Thread(target=other_request)
    other.start()
    try:
        with pytest.raises(ActivationFailed) as failed:
            deploy.push("outside_others", "v2")
    finally:
        other.join(10)
        m.probe.events["stop"].set()
        stdout_after = sys.stdout
        sys.stdout = real_stdout

    assert os.environ.get("SET_BY_ANOTHER_THREAD") == "1"
    assert stdout_after is real_stdout
    assert "request-17" not in str(failed.value) and "could not put back" not in str(failed.value)
    assert sys.modules["upapp"].answer() == 1
