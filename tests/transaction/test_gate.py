"""The request gate: a push waits for the requests in flight, holds new ones, and is bounded.

The gate alone first (threads and coroutines), then in a process with the overlay installed: a unit
of work marked with ``ov.running()`` that outlasts the drain deadline refuses the push, and nothing
changes; ``ov.apply()`` called from inside one does not wait for itself. Only the same request nested
(same thread, same task) passes a closed gate: a task or thread a request starts is a unit of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

import overlay
from overlay import DeployInProgress
from overlay.bundle import build_bundle
from overlay.transaction.gate import Gate


def in_thread(work, *args) -> threading.Thread:
    thread = threading.Thread(target=work, args=args, daemon=True)
    thread.start()
    return thread


def wait_until(condition: Callable[[], object], seconds: float = 5.0) -> bool:
    """Whether ``condition()`` came true within ``seconds`` (polled; a generous deadline, not a timing)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def test_a_drain_waits_for_the_request_in_flight_and_holds_a_new_one_until_released() -> None:
    gate = Gate()
    order: list[str] = []
    inside, finish, arrived = threading.Event(), threading.Event(), threading.Event()

    def old_request() -> None:
        with gate.request():
            inside.set()
            finish.wait(5)
            order.append("old request done")

    def new_request() -> None:
        arrived.set()
        with gate.request():
            order.append(f"new request ran, gate held: {gate.held}")

    in_thread(old_request)
    assert inside.wait(5)
    drainer = in_thread(lambda: (gate.hold(5), order.append("drained")))
    assert wait_until(lambda: gate.held)
    assert order == [] and drainer.is_alive()  # the drain waits for the request in flight
    finish.set()
    drainer.join(5)
    assert order == ["old request done", "drained"]
    newcomer = in_thread(new_request)
    assert arrived.wait(5)
    newcomer.join(0.1)  # time to get through, were the closed gate to let it
    assert newcomer.is_alive() and order == ["old request done", "drained"]  # held while the push applies
    gate.release()
    newcomer.join(5)
    assert order[-1] == "new request ran, gate held: False"


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
        finish = asyncio.Event()

        async def request() -> None:
            async with gate.request_async():
                await finish.wait()

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        drain = asyncio.create_task(gate.hold_async(30))  # a deadline no busy machine reaches
        for _ in range(5):
            await asyncio.sleep(0.001)
        assert gate.held and not drain.done()  # it waits for the request in flight
        finish.set()
        await asyncio.wait_for(drain, 30)
        assert task.done() and gate.running == 0
        gate.release()

        stuck = asyncio.create_task(request())  # never finishes: the refusal depends on no timing
        finish.clear()
        await asyncio.sleep(0)
        with pytest.raises(DeployInProgress, match="drain deadline of 0.1 s"):
            await gate.hold_async()
        assert not gate.held
        stuck.cancel()

    asyncio.run(scenario())


def test_a_task_started_by_a_request_is_a_unit_of_its_own_it_waits_at_a_closed_gate_and_is_counted() -> None:
    gate = Gate(deadline=5)

    async def scenario() -> list[tuple[str, bool, int]]:
        seen: list[tuple[str, bool, int]] = []
        go_on, entered = asyncio.Event(), asyncio.Event()

        async def background(name: str) -> None:  # fire and forget: it copies the request's context
            await go_on.wait()
            async with gate.request_async():
                seen.append((name, gate.held, gate.running))
                entered.set()

        async def request() -> None:
            async with gate.request_async():
                tasks.append(asyncio.create_task(background("while its request runs")))
                with gate.request():  # the request itself, nested (synchronously): a re-entry
                    assert gate.running == 1
                go_on.set()
                await entered.wait()  # counted beside its request, not inside it
        tasks: list[asyncio.Task[None]] = []
        await request()
        await asyncio.gather(*tasks)

        go_on.clear()
        entered.clear()
        async with gate.request_async():
            tasks.append(asyncio.create_task(background("after its request ended")))
        await gate.hold_async()  # nothing in flight: a push applies now
        go_on.set()
        for _ in range(20):  # the task runs up to the gate, and through it were it let in
            await asyncio.sleep(0)
        assert not entered.is_set()
        gate.release()
        await asyncio.wait_for(tasks[-1], 5)
        return seen

    assert asyncio.run(scenario()) == [("while its request runs", False, 2), ("after its request ended", False, 1)]
    assert gate.running == 0 and gate.finished == 4


def test_a_thread_started_by_a_request_with_its_context_is_a_unit_of_its_own() -> None:
    # The thread gets a copy of the request's context, as with asyncio.to_thread or Python 3.14's
    # inherited thread contexts.
    gate = Gate(deadline=5)
    seen: list[tuple[bool, int]] = []
    go_on, arrived, entered = threading.Event(), threading.Event(), threading.Event()

    def background() -> None:
        go_on.wait(5)
        arrived.set()
        with gate.request():
            seen.append((gate.held, gate.running))
            entered.set()

    with gate.request():
        worker = threading.Thread(target=contextvars.copy_context().run, args=(background,), daemon=True)
        worker.start()
    gate.hold()  # the request is over: a push applies now
    go_on.set()
    assert arrived.wait(5)
    entered.wait(0.2)  # time to get through, were the closed gate to let it
    assert not entered.is_set()
    gate.release()
    worker.join(5)
    assert seen == [(False, 1)] and gate.running == 0


def test_a_request_ended_on_another_thread_leaves_nothing_behind_in_its_own_thread() -> None:
    # A WSGI server may call the body's close() on another thread than the request's: the next
    # request on that pool thread is a new request, not a re-entry of the one that ended.
    gate = Gate(deadline=5)
    with ThreadPoolExecutor(1) as pool:
        entry = pool.submit(gate.enter).result()
        assert entry is not None
        gate.leave(entry=entry)  # on this thread
        assert gate.running == 0

        def next_request() -> tuple[bool, int]:
            with gate.request():
                return gate.held, gate.running

        gate.hold()
        waiting = pool.submit(next_request)
        time.sleep(0.1)  # time to get through, were the closed gate to let it
        assert not waiting.done()
        gate.release()
        assert waiting.result(5) == (False, 1)


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


def test_a_wsgi_body_closed_on_another_thread_leaves_its_request_thread_a_new_request_next(deploy):
    # Some servers (and WSGI-in-ASGI bridges) call the body's close() on another thread than the one
    # that called the app: the next request on the app's pool thread must count, and wait at a
    # closed gate, like any other.
    ov = deploy.ov

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        yield b"ok"

    wrapped = ov.wsgi(app)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80"}
    with ThreadPoolExecutor(1) as pool:
        body = pool.submit(wrapped, environ, lambda status, headers, exc_info=None: None).result(5)
        assert list(body) == [b"ok"] and ov.gate.running == 1
        body.close()  # on this thread
        assert ov.gate.running == 0

        def job() -> tuple[bool, int]:
            with ov.running():
                return ov.gate.held, ov.gate.running

        ov.gate.hold()
        waiting = pool.submit(job)
        time.sleep(0.1)  # time to get through, were the closed gate to let it
        assert not waiting.done()
        ov.gate.release()
        assert waiting.result(5) == (False, 1)
