"""A process's part in a deploy driven by another: this test plays the driving process on its socket."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time

import pytest
from support.cluster import APP, app_bundle

from overlay.bundle import open_bundle
from overlay.cluster import messages

DEADLINE = 10.0


def talk(ov, header: dict, payload: bytes = b"") -> tuple[socket.socket, dict]:
    sock = messages.connect(ov.node.entry.socket, DEADLINE)
    messages.send(sock, header, payload)
    answer, _ = messages.receive(sock, time.monotonic() + DEADLINE)
    return sock, answer


def step(sock: socket.socket, header: dict) -> dict:
    messages.send(sock, header)
    answer, _ = messages.receive(sock, time.monotonic() + DEADLINE)
    return answer


def prepare(ov, data: bytes, *, action: str = "push") -> tuple[socket.socket, dict]:
    bundle = open_bundle(data, ov.trusted, app_id=APP)
    ov.store.stage(bundle)  # the driving process stages before it asks the others
    return talk(ov, {"op": "prepare", "txn": "t", "action": action, "version": bundle.version,
                     "digest": bundle.digest, "coordinator": 0}, data)


def greet() -> str:
    return sys.modules[APP].greet()


def test_a_process_prepares_applies_and_commits_as_it_is_told(served, signing_key):
    sock, ready = prepare(served, app_bundle(signing_key, 2, "two"))
    assert ready["ok"] and ready["running"] == 1 and greet() == "one"  # prepared: nothing ran yet
    assert step(sock, {"op": "apply"})["ok"] and greet() == "two"
    done = step(sock, {"op": "commit"})
    assert done["ok"] and done["version"] == 2 and served.version == 2
    sock.close()


def test_a_process_told_to_revert_is_back_on_the_old_version(served, signing_key):
    sock, _ = prepare(served, app_bundle(signing_key, 2, "two"))
    assert step(sock, {"op": "apply"})["ok"] and greet() == "two"
    assert step(sock, {"op": "revert"})["version"] is None
    assert greet() == "one" and served.version == 1
    assert (served.tree_root / APP / "banner.txt").read_text() == "one\n"  # its own files too
    sock.close()


def test_when_the_driver_vanishes_after_committing_the_store_the_process_keeps_the_new_version(served, signing_key):
    data = app_bundle(signing_key, 2, "two")
    sock, _ = prepare(served, data)
    assert step(sock, {"op": "apply"})["ok"]
    served.store.commit(open_bundle(data, served.trusted, app_id=APP))  # the commit point, then silence
    sock.close()  # as a killed process's socket closes
    wait_until(lambda: served.node.member.busy.acquire(blocking=False))
    served.node.member.busy.release()
    assert greet() == "two" and served.version == 2


def test_when_the_driver_vanishes_before_committing_the_process_undoes_the_change(served, signing_key):
    sock, _ = prepare(served, app_bundle(signing_key, 2, "two"))
    assert step(sock, {"op": "apply"})["ok"]
    sock.close()
    wait_until(lambda: served.node.member.busy.acquire(blocking=False))
    served.node.member.busy.release()
    assert greet() == "one" and served.version == 1


def test_a_bundle_the_process_does_not_trust_is_refused_whoever_sends_it(served, other_key):
    # The channel between processes is not trusted: each verifies with its own trusted keys.
    data = app_bundle(other_key, 2, "forged")
    sock = messages.connect(served.node.entry.socket, DEADLINE)
    messages.send(sock, {"op": "prepare", "txn": "t", "action": "push", "version": 2, "digest": "0" * 64,
                         "coordinator": 0}, data)
    answer, _ = messages.receive(sock, time.monotonic() + DEADLINE)
    assert (answer["ok"], answer["code"]) == (False, "unknown_key") and greet() == "one"
    sock.close()


def test_a_process_busy_with_another_change_says_so(served, signing_key):
    sock, _ = prepare(served, app_bundle(signing_key, 2, "two"))
    other, answer = talk(served, {"op": "prepare", "txn": "u", "action": "push", "version": 3, "digest": "0" * 64,
                                  "coordinator": 0}, b"")
    assert (answer["ok"], answer["code"]) == (False, "deploy_in_progress")
    messages.send(sock, {"op": "abort"})
    sock.close()
    other.close()


def test_status_over_the_socket_names_the_version_and_the_last_outcome(served):
    sock, answer = talk(served, {"op": "status"})
    worker = answer["worker"]
    assert worker["version"] == 1 and worker["last_outcome"]["outcome"] == "ok"
    assert worker["tree"] == str(served.tree_root)
    sock.close()


def wait_until(check, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("the process did not finish its part in time")
        time.sleep(0.01)


def test_while_the_driver_holds_the_deploy_the_process_waits_and_then_settles_by_the_store(served, signing_key):
    """A driver whose connection stays open (a process it forked holds a copy) but whose deploy is
    over: the deploy lock, not the connection or a pid, says it is over."""
    data = app_bundle(signing_key, 2, "two")
    with served.store.deploying(5):  # the driving process's deploy, from first step to last
        sock, _ = prepare(served, data)
        assert step(sock, {"op": "apply"})["ok"]
        time.sleep(1.5)  # silence, but the deploy runs: nothing is decided
        assert greet() == "two" and not served.node.member.busy.acquire(blocking=False)
        served.store.commit(open_bundle(data, served.trusted, app_id=APP))
    wait_until(lambda: served.node.member.busy.acquire(blocking=False))  # settled, connection still open
    served.node.member.busy.release()
    assert greet() == "two" and served.version == 2
    sock.close()


def test_the_wait_for_the_drivers_word_works_on_a_descriptor_past_1023(served):
    """``select()`` cannot watch descriptors past 1023, which a busy worker's connections reach."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1500:
        pytest.skip(f"this machine allows {soft} open files; the test needs descriptor 1500")
    ours, theirs = socket.socketpair()
    high = socket.socket(fileno=os.dup2(ours.fileno(), 1500))
    ours.close()
    try:
        messages.send(theirs, {"op": "apply"})
        assert served.node.member._next(high)[0]["op"] == "apply"
    finally:
        high.close()
        theirs.close()


def test_a_member_that_runs_out_of_descriptors_for_a_moment_accepts_again(served, tmp_path):
    member = served.node.member
    real = member._server
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)
    failures = iter([OSError(errno.EMFILE, "Too many open files")])

    class Flaky:  # accept() fails once, as a process out of descriptors sees it, then works
        def accept(self):
            for exc in failures:
                raise exc
            return listener.accept()

    flaky = Flaky()
    member._server = flaky
    try:
        threading.Thread(target=member._accept, args=(flaky,), daemon=True).start()
        sock = messages.connect(tmp_path / "s", DEADLINE)
        messages.send(sock, {"op": "status"})
        answer, _ = messages.receive(sock, time.monotonic() + DEADLINE)
        assert answer["ok"] and answer["worker"]["version"] == 1
        sock.close()
    finally:
        member._server = real  # the loop above ends at its next accept, which closing makes fail
        listener.close()


def test_what_a_process_could_not_make_live_goes_back_with_its_commit(served, signing_key):
    from overlay.cluster import member

    # The hook registry the member's transaction runs (tests reload modules between them).
    hooks = member.Change.apply.__globals__["hooks"]
    hooks.register("pid-table", after=lambda push: push.not_live(f"table of process {os.getpid()}", "restart it"))
    try:
        sock, _ = prepare(served, app_bundle(signing_key, 2, "two"))
        assert step(sock, {"op": "apply"})["ok"]
        done = step(sock, {"op": "commit"})
        sock.close()
    finally:
        hooks.unregister("pid-table")

    assert done["version"] == 2
    assert done["not_live"] == [{"source": "pid-table", "what": f"table of process {os.getpid()}",
                                 "fix": "restart it"}]


def test_the_push_report_lists_each_processs_notice_once():
    from types import SimpleNamespace

    from overlay.deploy import _gather_not_live

    mine = {"source": "flask", "what": "app made anew", "fix": "restart"}
    theirs = {"source": "django", "what": "settings.DEBUG changed", "fix": "restart"}
    report = SimpleNamespace(not_live=[dict(mine)])
    peers = [SimpleNamespace(ok=True, answer={"not_live": [mine, theirs]}),
             SimpleNamespace(ok=True, answer={"not_live": [theirs, {"what": 1}]}),
             SimpleNamespace(ok=False, answer={"not_live": [{"source": "x", "what": "y", "fix": "z"}]})]

    _gather_not_live(report, SimpleNamespace(peers=peers))

    assert report.not_live == [mine, theirs]


def test_a_coordinator_that_vanishes_between_prepare_and_apply_leaves_the_gate_open(served, signing_key):
    sock, ready = prepare(served, app_bundle(signing_key, 2, "two"))
    assert ready["ok"] and served.gate.held  # drained for the prepare: new requests wait
    sock.close()  # the coordinator is killed before it says apply or abort

    wait_until(lambda: not served.gate.held)
    assert greet() == "one" and served.version == 1
