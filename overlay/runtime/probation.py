"""Probation: a pushed version is on trial until it proves healthy, and reverts by itself if not.

Erlang/OTP keeps a new release on probation until it is made permanent, and a restart during
probation boots the last permanent release. habanero does the same with ``install(health=...,
probation=SECONDS)``:

* after a push, the new version is **on probation** for ``SECONDS``; the store's state file names
  the last permanent version meanwhile, so **a restart during probation boots that one** (see
  ``Store.boot_permanent``);
* the process that took the push **watches** it: every ``interval`` it asks ``health`` (a callable
  returning a truthy value, or a URL path of the app's own, asked on the app's own port and
  healthy on a 2xx), and it compares the failure rate of the requests through the request gate
  (an exception, or a 5xx answer) with the previous version's;
* when the window passes with every check passing and the rate not above the previous version's
  (three failures at least, and one percentage point more), the version becomes **permanent**;
  otherwise habanero **reverts** to the last permanent version at once, with the same transaction
  as a rollback, in every process (``action="revert"``). ``history`` and ``status`` say
  ``reverted`` and why.

A push or rollback during a probation ends its watch: a rollback's target is permanent (an
operator chose it), a push starts a new probation judged against the same last permanent version.
The failure rate is that of the requests the watching process serves (its share of the app's).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from overlay import deploy
from overlay.errors import ConfigError, HabaneroError
from overlay.store import Store
from overlay.transaction.gate import Gate
from overlay.upgrade import UpgradeReport, on_app_loop

__all__ = ["Health", "Probation", "resolve_health"]

log = logging.getLogger("overlay.probation")

Health = Callable[[], object] | str
#: A new version fails on requests with at least this many failures, at a rate this much above the
#: previous version's.
MIN_FAILED, RATE_MARGIN = 3, 0.01
#: Seconds a health check over HTTP may take.
HEALTH_TIMEOUT = 5.0


def resolve_health(health: Health | None) -> Health | None:
    """A callable, or a URL path starting with ``/``; anything else is a clear configuration error."""
    if health is None or callable(health):
        return health
    if isinstance(health, str) and health.startswith("/") and not health.startswith("//"):
        return health
    raise ConfigError(f"health={health!r}: pass a callable (healthy unless it raises or returns a false value) "
                      "or a URL path of the app's own, such as '/healthz'", code="bad_config")


class Watched(Protocol):
    """What probation needs of the installed overlay (``overlay.Overlay`` is one)."""

    node: deploy.Node | None

    @property
    def gate(self) -> Gate | None: ...
    @property
    def store(self) -> Store | None: ...
    @property
    def app_address(self) -> tuple[str, int] | None: ...


class Probation:
    """Watches the version this process pushed (see the module docstring)."""

    def __init__(self, overlay: Watched, health: Health | None, seconds: float) -> None:
        self.overlay, self.health, self.seconds = overlay, health, seconds
        self.interval = min(1.0, max(seconds / 10, 0.05))
        self._stop: threading.Event | None = None
        self._lock = threading.Lock()
        self._mark = (0, 0)  # the gate's (finished, failed) when the current version started
        #: The last verdict this process reached: {"version", "state", "reason"}.
        self.last: dict[str, Any] | None = None

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def started(self, report: UpgradeReport) -> None:
        """A push this process drove is committed: watch it."""
        if not self.enabled or report.action != "push":
            self.ended()
            return
        gate = self.overlay.gate
        counts = (gate.finished, gate.failed) if gate is not None else (0, 0)
        baseline = (counts[0] - self._mark[0], counts[1] - self._mark[1])
        self._mark = counts
        stop = threading.Event()
        with self._lock:
            if self._stop is not None:
                self._stop.set()
            self._stop = stop
        self.last = {"version": report.version, "state": "probation", "reason": ""}
        threading.Thread(target=self._watch, args=(report.version, report.digest, baseline, stop),
                         name="habanero-probation", daemon=True).start()

    def ended(self) -> None:
        """A rollback (or a push not on probation) ends the watch of the version before it."""
        gate = self.overlay.gate
        if gate is not None:
            self._mark = (gate.finished, gate.failed)
        with self._lock:
            if self._stop is not None:
                self._stop.set()
                self._stop = None

    def stop(self) -> None:
        self.ended()

    # ------------------------------------------------------------------------------ the watch

    def _watch(self, version: int, digest: str, baseline: tuple[int, int], stop: threading.Event) -> None:
        end = time.monotonic() + self.seconds
        try:
            # The first check one interval in: the push's own answer (and its deployer's read-back)
            # comes first, and the new version gets its first requests.
            stop.wait(self.interval)
            while True:
                last_round = time.monotonic() >= end
                problem = self._problem(baseline)
                if stop.is_set():
                    return
                if problem is not None:
                    self._revert(version, digest, problem, stop)
                    return
                if last_round:
                    break
                stop.wait(min(self.interval, max(end - time.monotonic(), 0.0)))
            self._make_permanent(version, digest, stop)
        except Exception:  # a watch must never take the app down; the version stays on probation
            log.exception("habanero: the probation of v%d failed; it stays on probation until the next deploy",
                          version)

    def _problem(self, baseline: tuple[int, int]) -> str | None:
        """Why the running version is not healthy, or None."""
        problem = self._health()
        if problem is not None:
            return problem
        gate = self.overlay.gate
        if gate is None:
            return None
        finished, failed = gate.finished - self._mark[0], gate.failed - self._mark[1]
        before = baseline[1] / baseline[0] if baseline[0] else 0.0
        if failed >= MIN_FAILED and failed / finished > before + RATE_MARGIN:
            return (f"{failed} of {finished} requests failed ({failed / finished:.0%}), above the previous "
                    f"version's {before:.0%}")
        return None

    def _health(self) -> str | None:
        health = self.health
        if health is None:
            return None
        if callable(health):
            try:
                if not health():
                    return f"the health check {_name(health)} returned a false value"
            except Exception as exc:
                return f"the health check {_name(health)} raised {type(exc).__name__}: {exc}"
            return None
        address = self.overlay.app_address
        if address is None:
            return (f"the health check {health} has no address to ask: no request reached the app's own "
                    "server yet (push through ov.wsgi(), ov.asgi() or app=)")
        host, port = address
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{health}"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT) as answer:
                code = answer.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        except OSError as exc:
            return f"the health check {health} could not be asked ({exc})"
        return None if 200 <= code < 300 else f"the health check {health} answered HTTP {code}"

    # ------------------------------------------------------------------------------ verdicts

    def _make_permanent(self, version: int, digest: str, stop: threading.Event) -> None:
        store = self.overlay.store
        if stop.is_set() or store is None:
            return
        if store.make_permanent(digest, f"healthy for {self.seconds:g} s"):
            self.last = {"version": version, "state": "permanent", "reason": f"healthy for {self.seconds:g} s"}
            log.info("habanero: v%d passed its probation: permanent", version)

    def _revert(self, version: int, digest: str, problem: str, stop: threading.Event) -> None:
        node, store = self.overlay.node, self.overlay.store
        if node is None or store is None:
            return
        probation, permanent = store.on_probation()
        pointer, _ = store.pointer()
        if not probation or pointer is None or pointer["digest"] != digest:
            return  # another deploy came first
        reason = f"v{version} failed its probation: {problem}"
        if permanent is None:
            reason += "; there is no permanent version to go back to (the code on disk cannot be applied live)"
            log.error("habanero: %s", reason)
            self.last = {"version": version, "state": "failed", "reason": reason}
            store.record_verdict(version, digest, "failed", reason)
            return
        reason += f"; reverted to v{permanent['version']}, the last permanent version"
        log.error("habanero: %s", reason)
        try:
            _revert_everywhere(self.overlay, node, permanent["version"], version)
        except HabaneroError as exc:
            reason = f"v{version} failed its probation ({problem}) but could not be reverted: {exc.message}"
            log.error("habanero: %s", reason)
            self.last = {"version": version, "state": "failed", "reason": reason}
            store.record_verdict(version, digest, "failed", reason)
            return
        self.last = {"version": version, "state": "reverted", "reason": reason}
        store.record_verdict(version, digest, "reverted", reason)
        self.ended()


def _revert_everywhere(overlay: Watched, node: deploy.Node, to: int, expect: int) -> UpgradeReport:
    """The rollback-like transaction of a revert, where a push through this process's server would
    run: on the app's event loop (its requests drained by awaiting) when it has one."""
    gate, loop = node.host.gate, node.host.loop

    def revert() -> UpgradeReport:
        return deploy.rollback(node, to, expect=expect, action="revert")

    if loop is None or loop.is_closed() or not loop.is_running():
        return revert()
    import asyncio

    async def drained_then_revert() -> UpgradeReport:
        await gate.hold_async()
        try:
            return on_app_loop(loop, revert)
        finally:
            gate.release()

    return asyncio.run_coroutine_threadsafe(drained_then_revert(), loop).result()


def _name(health: Callable[[], object]) -> str:
    return getattr(health, "__qualname__", None) or repr(health)
