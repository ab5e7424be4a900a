"""The request gate: a push waits for the requests in flight, holds new ones, and is bounded.

The gate alone first (threads and coroutines), then in a process with the overlay installed: a unit
of work marked with ``ov.running()`` that outlasts the drain deadline refuses the push, and nothing
changes; ``ov.apply()`` called from inside one does not wait for itself.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

import overlay
from overlay import DeployInProgress
from overlay.bundle import build_bundle
from overlay.transaction.gate import Gate


def in_thread(work, *args) -> threading.Thread:
    thread = threading.Thread(target=work, args=args, daemon=True)
    thread.start()
    return thread


def test_a_drain_waits_for_the_request_in_flight_and_holds_a_new_one_until_released() -> None:
    gate = Gate()
    order: list[str] = []
    inside, finish = threading.Event(), threading.Event()

    def old_request() -> None:
        with gate.request():
            inside.set()
            finish.wait(5)
            order.append("old request done")

    def new_request() -> None:
        with gate.request():
            order.append("new request ran")

    in_thread(old_request)
    inside.wait(5)
    drainer = in_thread(lambda: (gate.hold(5), order.append("drained")))
    time.sleep(0.05)
    assert order == [] and gate.held  # the drain waits for the request in flight
    finish.set()
    drainer.join(5)
    assert order == ["old request done", "drained"]
    newcomer = in_thread(new_request)
    time.sleep(0.05)
    assert order == ["old request done", "drained"]  # held while the push applies
    gate.release()
    newcomer.join(5)
    assert order[-1] == "new request ran"


def test_a_request_that_outlasts_the_deadline_refuses_the_drain_naming_it_and_is_never_cut_off() -> None:
    gate = Gate(deadline=0.1)
    inside, finish = threading.Event(), threading.Event()
    finished: list[bool] = []

    def long_request() -> None:
        with gate.request():
            inside.set()
            finish.wait(5)
            finished.append(True)

    worker = in_thread(long_request)
    inside.wait(5)
    with pytest.raises(DeployInProgress) as refused:
        gate.hold()
    assert refused.value.code == "drain_timeout"
    assert "1 request was still running after the drain deadline of 0.1 s" in refused.value.message
    assert refused.value.to_dict()["running"] == 1
    assert not gate.held  # open again: a new request passes at once
    with gate.request():
        pass
    finish.set()
    worker.join(5)
    assert finished == [True]


def test_a_request_reentering_the_gate_and_a_drain_from_inside_a_request_never_wait_for_themselves() -> None:
    gate = Gate(deadline=0.2)
    with gate.request():
        gate.hold()  # the caller's own request is not waited for
        with gate.request():  # re-entering while held passes: waiting would wait for itself
            assert gate.running == 1
        gate.release()
    assert gate.running == 0 and gate.finished == 1


def test_a_coroutine_waits_at_a_closed_gate_without_blocking_its_event_loop() -> None:
    gate = Gate()

    async def scenario() -> list[str]:
        seen: list[str] = []
        gate.hold()

        async def request() -> None:
            async with gate.request_async():
                seen.append("request")

        async def ticker() -> None:
            seen.append("loop still runs")

        task = asyncio.create_task(request())
        await asyncio.sleep(0.02)
        await ticker()
        assert seen == ["loop still runs"]
        threading.Timer(0.02, gate.release).start()  # released from another thread, as a deploy does
        await asyncio.wait_for(task, 5)
        return seen

    assert asyncio.run(scenario()) == ["loop still runs", "request"]


def test_hold_async_drains_coroutines_in_flight_and_times_out_with_the_same_refusal() -> None:
    gate = Gate(deadline=0.1)

    async def scenario() -> None:
        async def short() -> None:
            async with gate.request_async():
                await asyncio.sleep(0.02)

        task = asyncio.create_task(short())
        await asyncio.sleep(0)
        await gate.hold_async()
        assert task.done()
        gate.release()

        async def long() -> None:
            async with gate.request_async():
                await asyncio.sleep(1)

        stuck = asyncio.create_task(long())
        await asyncio.sleep(0)
        with pytest.raises(DeployInProgress, match="drain deadline of 0.1 s"):
            await gate.hold_async()
        stuck.cancel()

    asyncio.run(scenario())


def test_failures_through_the_gate_are_counted() -> None:
    gate = Gate()
    with pytest.raises(ValueError), gate.request():
        raise ValueError("boom")
    with gate.request():
        pass
    assert (gate.finished, gate.failed) == (2, 1)


# ------------------------------------------------------------------------------ in a process


def version(ov, n: int, signing_key) -> bytes:
    files = {"upapp": ("package", f"VERSION = {n}\n".encode())}
    return build_bundle(files, app_id="upapp", version=n, signers=[signing_key])


def test_a_unit_of_work_outlasting_the_drain_deadline_refuses_the_push_and_nothing_changes(deploy, signing_key):
    ov = deploy.ov
    ov.apply(version(ov, 1, signing_key))
    import upapp

    ov.gate.deadline = 0.2
    inside, finish = threading.Event(), threading.Event()

    def job() -> None:
        with ov.running():
            inside.set()
            finish.wait(5)

    worker = in_thread(job)
    inside.wait(5)
    history = len(ov.history())
    with pytest.raises(DeployInProgress) as refused:
        ov.apply(version(ov, 2, signing_key))
    finish.set()
    worker.join(5)
    assert refused.value.code == "drain_timeout" and "0.2 s" in refused.value.message
    assert upapp.VERSION == 1 and ov.version == 1 and ov.store.pointer()[0]["version"] == 1
    assert [v for v, _ in ov.store.stored()] == [1]  # the staged bundle was dropped
    assert ov.history()[-1]["code"] == "drain_timeout" and len(ov.history()) == history + 1
    assert not ov.gate.held
    ov.apply(version(ov, 2, signing_key))  # the next push, once the work is done, goes through
    assert sys.modules["upapp"].VERSION == 2


def test_a_push_made_from_inside_a_unit_of_work_does_not_wait_for_it(deploy, signing_key):
    ov = deploy.ov
    ov.gate.deadline = 0.5  # waiting for itself would end in drain_timeout
    with ov.running():
        report = ov.apply(version(ov, 1, signing_key))
    import upapp

    assert report.version == 1 and upapp.VERSION == 1 and not ov.gate.held


def test_a_push_through_the_standalone_server_runs_module_code_on_a_plain_thread_without_an_event_loop(
        import_state, tmp_path, trusted_keys_file, signing_key, monkeypatch):
    # Django refuses database access at import time on a thread with a running event loop
    # (SynchronousOnlyOperation): module code must run where the app's own did, on a plain thread.
    from support.e2e import push_bytes

    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)
    ov = overlay.install(packages=["upapp"], trusted_keys=trusted_keys_file, store=tmp_path / "store",
                         listen="127.0.0.1:0")
    try:
        def source(n: int) -> bytes:
            return (b"import asyncio, threading\n"
                    b"try:\n    asyncio.get_running_loop()\nexcept RuntimeError:\n"
                    b"    THREAD, RAN = threading.current_thread().name, %d\n"
                    b"else:\n    raise RuntimeError('module code ran on a thread with a running event loop')\n" % n)

        host, port = ov.address
        for n in (1, 2):
            reply = push_bytes(f"http://{host}:{port}", build_bundle({"upapp": ("package", source(n))}, app_id="upapp",
                                                                     version=n, signers=[signing_key]))
            assert reply.status == 200, reply.body
            import upapp
        assert upapp.RAN == 2 and upapp.THREAD.startswith("habanero-deploy")
    finally:
        ov.uninstall()


def test_a_failure_after_the_drain_opens_the_gate_again_and_drops_the_staged_bundle(deploy, monkeypatch):
    import errno

    from support.upgrade import start

    start(deploy, "follow_imports")

    def out_of_descriptors() -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(deploy.ov.node, "others", out_of_descriptors)
    with pytest.raises(OSError):
        deploy.push("follow_imports", "v2")

    assert not deploy.ov.gate.held
    assert deploy.ov.version == 1 and deploy.staged() == []
