"""The push transaction against running code: threads in a loop, in-flight generators and
coroutines, imports racing the apply step, and a second deploy while one applies.

Split from ``test_upgrade.py`` (same fixtures, from ``conftest.py``); import state is restored
after every test and every thread is joined with a timeout.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
import time

import pytest
from support.upgrade import THREAD_TIMEOUT, in_thread, joined, m, start

from overlay import upgrade
from overlay.errors import ActivationFailed, DeployInProgress


# -------------------------------------------------------------------------- running code


def test_a_thread_looping_on_a_function_picks_up_the_new_code(deploy):
    start(deploy, "running")
    work = m.worker.work  # held by the loop, as a worker would
    seen: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            seen.append(work())
            time.sleep(0.0005)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + THREAD_TIMEOUT
        while not seen and time.monotonic() < deadline:
            time.sleep(0.001)
        deploy.push("running", "v2")
        while 2 not in seen and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        stop.set()
        thread.join(THREAD_TIMEOUT)
    assert seen[0] == 1 and 2 in seen
    assert 1 not in seen[seen.index(2):]  # once it ran the new code, never the old again


def test_an_in_flight_generator_and_coroutine_finish_on_the_code_they_started_with(deploy):
    start(deploy, "running")
    steps = m.worker.steps()
    assert next(steps) == "v1-a"
    loop = asyncio.new_event_loop()
    try:
        gate = loop.create_future()
        task = loop.create_task(m.worker.handle(gate))
        loop.run_until_complete(asyncio.sleep(0))  # parked on the gate

        deploy.push("running", "v2")
        gate.set_result(None)

        assert next(steps) == "v1-b" and loop.run_until_complete(task) == "v1"
        assert list(m.worker.steps()) == ["v2-a", "v2-b"]
        ready = loop.create_future()
        ready.set_result(None)
        assert loop.run_until_complete(m.worker.handle(ready)) == "v2"
    finally:
        loop.close()


def test_no_thread_imports_a_new_module_until_the_transaction_is_done(deploy, probe):
    start(deploy, "slow_apply")
    applying, release = probe.events["applying"], probe.events["release"]
    pusher = in_thread(lambda: deploy.push("slow_apply", "v2"))
    try:
        assert applying.wait(THREAD_TIMEOUT), "the apply step never started"

        def import_fresh() -> tuple[int, int | None, int | None]:
            fresh = importlib.import_module("upapp.fresh")
            return fresh.SEEN, deploy.ov.version, deploy.ov.store.active.version

        importer = in_thread(import_fresh)
        importer[0].join(0.3)
        assert importer[0].is_alive(), "a thread imported a module of a half-applied version"
        assert "upapp.fresh" not in sys.modules
    finally:
        release.set()
    report = joined(*pusher)
    # The import waited for the whole transaction: it ran the new module against the new core,
    # with the finder and the store both already at version 2.
    assert joined(*importer) == (2, 2, 2)
    assert report.version == 2 and probe.runs["upapp.fresh"] == 1
    assert sys.modules["upapp.fresh"].__spec__.loader.index is deploy.ov.finder.index


def test_threads_calling_into_live_modules_are_not_blocked_by_the_apply_step(deploy, probe):
    start(deploy, "slow_apply")
    version = m.core.version
    pusher = in_thread(lambda: deploy.push("slow_apply", "v2"))
    try:
        assert probe.events["applying"].wait(THREAD_TIMEOUT)
        # Requests keep being served while the push is paused in its migration hook, and they
        # already run the patched function: a push is visible before it commits (see upgrade.py).
        caller = in_thread(version)
        assert joined(*caller) == 2 and deploy.ov.store.active.version == 1
    finally:
        probe.events["release"].set()
    assert joined(*pusher).version == 2


def test_a_module_another_thread_is_still_importing_is_not_changed_under_it(deploy, probe, monkeypatch):
    monkeypatch.setattr(upgrade, "IMPORT_WAIT", 0.2)  # the import outlasts the wait: the push is refused
    deploy.push("import_in_flight", "v1")
    importer = in_thread(lambda: importlib.import_module("upapp.slow"))
    try:
        assert probe.events["importing"].wait(THREAD_TIMEOUT)
        with pytest.raises(ActivationFailed) as info:
            deploy.push("import_in_flight", "v2")
    finally:
        probe.events["finish_import"].set()
    slow = joined(*importer)
    assert "upapp.slow is being imported by another thread" in info.value.message
    assert deploy.ov.version == 1 and slow.answer() == "v1"  # consistent: the push did not land
    assert deploy.push("import_in_flight", "v2").version == 2 and slow.answer() == "v2"


def test_a_push_waits_for_another_threads_import_of_a_module_it_changes(deploy, probe):
    # A worker still starting up imports the app while a push arrives: the push waits for it.
    deploy.push("import_in_flight", "v1")
    importer = in_thread(lambda: importlib.import_module("upapp.slow"))
    assert probe.events["importing"].wait(THREAD_TIMEOUT)
    threading.Timer(0.3, probe.events["finish_import"].set).start()
    assert deploy.push("import_in_flight", "v2").version == 2
    slow = joined(*importer)
    assert slow.answer() == "v2"  # the import finished on v1, then the push changed it


def test_a_push_leaves_an_unchanged_module_another_thread_is_importing_marked_as_in_flight(deploy, probe):
    deploy.push("unchanged_in_flight", "v1")
    importlib.import_module("upapp.other")
    first = in_thread(lambda: importlib.import_module("upapp.slow"))
    try:
        assert probe.events["importing"].wait(THREAD_TIMEOUT)
        assert deploy.push("unchanged_in_flight", "v2").version == 2 and m.other.version() == 2
        # A second importer must still wait for the first one to finish the module's body; had the
        # push replaced its __spec__, it would be handed a half-run module without answer().
        second = in_thread(lambda: importlib.import_module("upapp.slow").answer())
        second[0].join(0.3)
        assert second[0].is_alive(), "a thread was handed a module that is still being imported"
    finally:
        probe.events["finish_import"].set()
    assert joined(*first).answer() == "v1" and joined(*second) == "v1"


def test_a_second_deploy_while_one_is_applying_is_refused_with_deploy_in_progress(deploy, probe):
    start(deploy, "slow_apply")
    third = deploy.bundle("function_body", "v1", number=3)
    pusher = in_thread(lambda: deploy.push("slow_apply", "v2"))
    try:
        assert probe.events["applying"].wait(THREAD_TIMEOUT)
        with pytest.raises(DeployInProgress) as pushed:
            deploy.ov.apply(third)
        with pytest.raises(DeployInProgress):
            deploy.ov.rollback()
    finally:
        probe.events["release"].set()
    assert joined(*pusher).version == 2
    assert pushed.value.code == "deploy_in_progress" and pushed.value.http_status == 409
    assert deploy.ov.apply(third).version == 3  # refused, not lost: it applies once the first is done
