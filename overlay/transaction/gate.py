"""The request gate: every request runs wholly on one version of the app's code.

A push patches live functions one by one. A request that runs while it lands could call the old
version of a function with the new version of its callee (a new argument added to both) and fail.
So each request passes a gate (the WSGI, ASGI and aiohttp adapters put it in front of the app; code
that is not a request marks its units of work with ``ov.running()``), and before a push applies,
this process **drains** it:

1. the gate closes: a request that arrives now waits at the gate (a thread blocks, a coroutine
   awaits), for the length of the apply;
2. the push waits for the requests in flight to finish, up to the drain deadline; a request that
   outlasts it is never cut off: the push is refused (``drain_timeout``, naming the deadline and how
   many requests were still running) and the gate opens again, nothing changed;
3. the push applies and commits (or is undone), then the gate opens and the waiting requests go on
   the new (or the old) version.

Two things never wait. **The deploy's own request**: the control routes are not behind the gate,
and a drain started from inside a gated request (``ov.apply()`` called by a view) does not count
that request. **A request re-entering the gate** (a gated request calling into another gated app,
or opening ``ov.running()``): it holds the gate already, so it passes even while the gate is
closed; waiting would wait for itself.

A re-entry is the same request nested: on the same thread, or in the same asyncio task, while its
pass is still open. A task or thread *started* by a request (``asyncio.create_task``, a thread
given a copy of the request's context, ``asyncio.to_thread``) copies the request's context but not
its place in the gate: when it opens ``ov.running()`` it is a unit of work of its own, waits while
the gate is closed and is counted while it runs (it may outlive its request, and run across a
push). A request's pass is closed by whichever thread ends the request (a WSGI body's ``close()``
may run on another thread than the request did), so what stays behind in a pool thread's context
is a closed pass, which never lets anyone through.

Long-lived requests (websockets, streaming responses, server-sent events) are let go of by the
adapters once they start streaming: a push does not wait for them, their frames keep the code they
started with, and what they call after the push runs the new version.

The gate also counts the requests that finished and failed (an exception, or a 5xx status): the
probation of a new version compares its failure rate with the previous version's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from asyncio.events import _get_running_loop
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from threading import get_ident

from overlay.errors import DeployInProgress

__all__ = ["DRAIN_TIMEOUT", "Gate", "Pass"]

log = logging.getLogger("overlay.gate")

#: Seconds a push waits for the requests in flight before it is refused (``drain_timeout``).
DRAIN_TIMEOUT = 5.0
#: Seconds a request waits at a closed gate before it goes on regardless (a deploy that never ends
#: must not take the app down with it; every deploy step has its own, shorter, timeout).
HOLD_LIMIT = 120.0


class Pass:
    """One request's (or unit of work's) place in the gate: who entered it (a thread, or the asyncio
    task running on it) and how deeply it re-entered. Open while ``depth`` > 0."""

    __slots__ = ("depth", "owner")  # set by the gate (no __init__: a request pays the least for its pass)
    depth: int
    owner: object


#: The pass of the request the current context runs in. A context is copied into the tasks (and
#: ``to_thread`` threads) a request starts, so the pass also names its ``owner``: only the owner
#: re-enters with it.
_inside: ContextVar[Pass | None] = ContextVar("habanero_gate_pass", default=None)

#: The task running on an event loop, or None. ``asyncio.current_task`` is C from Python 3.12; in
#: 3.11 it is Python (as costly as the rest of a pass) around this dict, which the C tasks keep.
_task_on: Callable[[asyncio.AbstractEventLoop], object]
if sys.version_info >= (3, 12):
    _task_on = asyncio.current_task
else:
    _task_on = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]  # not in the stubs


class Gate:
    """Requests in, requests out, and a drain between them (see the module docstring)."""

    def __init__(self, *, deadline: float = DRAIN_TIMEOUT, enabled: bool = True) -> None:
        self.deadline = deadline
        self.enabled = enabled
        self._cond = threading.Condition(threading.Lock())
        self._running = 0
        self._holds = 0
        self._sleepers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        #: Requests that went through the gate, and those of them that failed (for probation).
        self.finished = 0
        self.failed = 0

    # ------------------------------------------------------------------------------ requests

    def enter(self) -> Pass | None:
        """Pass the gate (a thread): waits while a push holds it. Returns the request's :class:`Pass`,
        which :meth:`leave` must close, or None when the gate is off."""
        if not self.enabled:
            return None
        loop = _get_running_loop()  # who runs here: the task on this thread's event loop, else the thread
        owner = get_ident() if loop is None else (_task_on(loop) or get_ident())
        inside = _inside.get()
        if inside is not None and inside.depth and inside.owner == owner:
            inside.depth += 1  # re-entering: this request holds the gate already
            return inside
        with self._cond:
            if self._holds:
                limit = time.monotonic() + HOLD_LIMIT
                while self._holds and (left := limit - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._holds:
                    log.error("habanero: a request waited %g s at the gate for a deploy; it goes on", HOLD_LIMIT)
            self._running += 1
        entry = Pass()
        entry.owner, entry.depth = owner, 1
        _inside.set(entry)
        return entry

    async def enter_async(self) -> Pass | None:
        """Pass the gate (a coroutine): awaits, never blocks the event loop, while a push holds it."""
        if not self.enabled:
            return None
        owner = _task_on(asyncio.get_running_loop()) or get_ident()
        inside = _inside.get()
        if inside is not None and inside.depth and inside.owner == owner:
            inside.depth += 1
            return inside
        limit = time.monotonic() + HOLD_LIMIT
        while True:
            with self._cond:
                if not self._holds or time.monotonic() > limit:
                    self._running += 1
                    break
                loop = asyncio.get_running_loop()
                woken: asyncio.Future[None] = loop.create_future()
                self._sleepers.append((loop, woken))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken, max(limit - time.monotonic(), 0.01))
        entry = Pass()
        entry.owner, entry.depth = owner, 1
        _inside.set(entry)
        return entry

    def leave(self, *, failed: bool = False, entry: Pass | None = None) -> None:
        """The request (or unit of work) that :meth:`enter` let in is done. ``entry`` is the pass
        :meth:`enter` returned; without it, the pass of the current context (give it when the
        request may end on another thread or task than it started on)."""
        if entry is None:
            entry = _inside.get()
        if entry is not None:
            if entry.depth > 1:
                entry.depth -= 1
                return
            entry.depth = 0  # closed, wherever copies of the context it is in still live
            entry.owner = None  # a task's pass lives in the task's own context: no cycle to collect
        with self._cond:
            self._running -= 1
            self.finished += 1
            if failed:
                self.failed += 1
            if self._holds:
                self._cond.notify_all()  # a drain waits for this

    def let_go(self, entry: Pass | None = None) -> None:
        """A request became long-lived (a websocket, a stream): it stops counting as in flight.

        Its own later :meth:`leave` must not come (the adapters call one or the other)."""
        self.leave(entry=entry)

    @property
    def running(self) -> int:
        """Requests in flight now."""
        return self._running

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """``with gate.request():`` around a unit of work of a thread (``ov.running()``)."""
        entry = self.enter()
        failed = True
        try:
            yield
            failed = False
        finally:
            if entry is not None:
                self.leave(failed=failed, entry=entry)

    @contextlib.asynccontextmanager
    async def request_async(self) -> AsyncIterator[None]:
        """``async with gate.request_async():`` around a unit of work of a coroutine."""
        entry = await self.enter_async()
        failed = True
        try:
            yield
            failed = False
        finally:
            if entry is not None:
                self.leave(failed=failed, entry=entry)

    # -------------------------------------------------------------------------------- drains

    def hold(self, deadline: float | None = None) -> None:
        """Close the gate and wait until no request is in flight but the caller's own; within
        ``deadline`` seconds (the gate's own by default), else refuse (``drain_timeout``) and open
        the gate again. Blocks the calling thread: never call it on the event loop the requests
        run on (:meth:`hold_async` is for that). Each hold ends with one :meth:`release`."""
        deadline = self.deadline if deadline is None else deadline
        own = _own()  # a drain started by a request never waits for itself
        with self._cond:
            self._holds += 1
            if not self.enabled:
                return
            end = time.monotonic() + deadline
            while self._running > own:
                left = end - time.monotonic()
                if left <= 0:
                    still = self._running - own
                    self._release_locked()
                    raise _timeout(deadline, still)
                self._cond.wait(left)

    async def hold_async(self, deadline: float | None = None) -> None:
        """:meth:`hold` for a coroutine on the requests' own event loop: waits by awaiting."""
        deadline = self.deadline if deadline is None else deadline
        own = _own()
        with self._cond:
            self._holds += 1
            if not self.enabled:
                return
        end = time.monotonic() + deadline
        pause = 0.0005
        while True:
            with self._cond:
                if self._running <= own:
                    return
                if time.monotonic() >= end:
                    still = self._running - own
                    self._release_locked()
                    raise _timeout(deadline, still)
            await asyncio.sleep(pause)  # the requests in flight run meanwhile
            pause = min(pause * 2, 0.01)

    def release(self) -> None:
        """End one hold: when none is left, the waiting requests go on."""
        with self._cond:
            self._release_locked()

    def _release_locked(self) -> None:
        self._holds -= 1
        if self._holds:
            return
        self._cond.notify_all()
        sleepers, self._sleepers = self._sleepers, []
        for loop, woken in sleepers:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there any more
                loop.call_soon_threadsafe(_wake, woken)

    @property
    def held(self) -> bool:
        return self._holds > 0


def _own() -> int:
    """1 when the caller runs inside an open request's context (the request itself, or a thread it
    waits for: ``await asyncio.to_thread(ov.apply, data)``): a drain does not wait for that request."""
    inside = _inside.get()
    return 1 if inside is not None and inside.depth else 0


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _timeout(deadline: float, still: int) -> DeployInProgress:
    return DeployInProgress(
        f"{still} request{' was' if still == 1 else 's were'} still running after the drain deadline of "
        f"{deadline:g} s; nothing changed and the running version still serves. Push again when the app is "
        "quieter, or give requests longer (install(drain_timeout=...) or HABANERO_DRAIN_TIMEOUT)",
        code="drain_timeout", running=still, deadline=deadline)
