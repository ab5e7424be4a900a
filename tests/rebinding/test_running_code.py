"""Code already running finishes on its old code; the next call runs the new code."""

from __future__ import annotations

import asyncio
import threading
import time


def test_thread_looping_on_a_function_picks_up_the_new_code_on_its_next_call(live):
    m = live("def work():\n    return 1\n")
    work = m.ns["work"]  # held by the thread, as a worker loop would
    seen: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            seen.append(work())
            time.sleep(0.001)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        while not seen:
            time.sleep(0.001)
        m.push("def work():\n    return 2\n")
        deadline = time.monotonic() + 5
        while 2 not in seen and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        stop.set()
        thread.join(5)

    assert seen[0] == 1 and 2 in seen
    assert 1 not in seen[seen.index(2):]  # once switched, it never runs the old code again


def test_generator_in_flight_finishes_on_its_old_code(live):
    m = live("def steps():\n    yield 'v1-a'\n    yield 'v1-b'\n")
    running = m.module.steps()
    assert next(running) == "v1-a"

    m.push("def steps():\n    yield 'v2-a'\n    yield 'v2-b'\n")

    assert next(running) == "v1-b"
    assert list(m.module.steps()) == ["v2-a", "v2-b"]


def test_coroutine_in_flight_finishes_on_its_old_code(live):
    m = live("async def handle(gate):\n    await gate\n    return 'v1'\n")
    loop = asyncio.new_event_loop()
    try:
        gate = loop.create_future()
        task = loop.create_task(m.module.handle(gate))
        loop.run_until_complete(asyncio.sleep(0))  # the handler is now parked on the gate

        m.push("async def handle(gate):\n    await gate\n    return 'v2'\n")
        gate.set_result(None)

        assert loop.run_until_complete(task) == "v1"
        fresh = loop.create_future()
        fresh.set_result(None)
        assert loop.run_until_complete(m.module.handle(fresh)) == "v2"
    finally:
        loop.close()
