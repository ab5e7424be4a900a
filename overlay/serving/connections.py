"""The standalone control server's connections: how many, and for how long.

The standalone server (``install(listen=...)``) runs inside the app's process, so every socket it
holds is a file descriptor the app's own server cannot have. Anyone who can reach the port can open
connections, so each one is bounded:

* **at most** ``max_connections`` **at once.** A connection beyond that closes the oldest one that
  is not in the middle of a request (idle, or still sending its request line and headers), so a
  flood of idle connections costs the app a fixed number of descriptors and never locks out a
  deployer, whose request starts at once; when every connection is busy the new one is closed;
* **a request has** ``request_timeout`` **seconds from its first byte to its last header**, or the
  connection is closed (a request line or headers trickled byte by byte, "slowloris"). Its body has
  what is left of ``upload_timeout`` from that same first byte (see ``overlay.serving.aiohttp``);
* **a connection idle for** ``idle_timeout`` **seconds is closed**: a new one that sends nothing,
  or a keep-alive one between requests.

Each connection is a small protocol in front of aiohttp's own (:class:`_Guard`): it sees every byte
arrive, counts the connection and closes it; what happens inside a request is aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_CONTROL_LIMITS", "ControlLimits", "Connections"]


@dataclass(frozen=True)
class ControlLimits:
    """What one connection to the standalone control server may hold (see the module docstring).

    Example::

        overlay.install(..., listen="127.0.0.1:8765", control_limits=ControlLimits(max_connections=16))
    """

    max_connections: int = 64
    request_timeout: float = 10.0
    idle_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.request_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError(f"{self} must have max_connections >= 1 and positive timeouts")


DEFAULT_CONTROL_LIMITS = ControlLimits()


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol behind it, its timers in front of it."""

    def __init__(self, owner: Connections, inner: asyncio.Protocol) -> None:
        self.owner, self.inner = owner, inner
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request's headers are in: aiohttp's handler runs it
        self.first_byte: float | None = None  # of the request being received
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream server's transports
        if not self.owner.admit(self):
            transport.abort()  # type: ignore[attr-defined]
            self.transport = None
            return
        self.inner.connection_made(transport)
        self._arm(self.owner.limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.first_byte is None and not self.busy:  # the first byte of a request: its clock starts
            self.first_byte = self.owner.loop.time()
            self._arm(self.owner.limits.request_timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.transport is not None:
            self.owner.forget(self)
            self.inner.connection_lost(exc)
            self.transport = None

    # -- the request's side
    def started(self) -> float:
        """The handler took the request: its headers are in. Returns when its first byte came."""
        self.busy = True
        self._disarm()
        return self.first_byte if self.first_byte is not None else self.owner.loop.time()

    def finished(self) -> None:
        self.busy, self.first_byte = False, None
        if self.transport is not None:
            self._arm(self.owner.limits.idle_timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.owner.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if not self.busy:  # idle too long, or its headers too slow
            self.close()


class Connections:
    """Every connection of one standalone server, bounded (see the module docstring)."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limits: ControlLimits,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.factory, self.limits, self.loop = factory, limits, loop
        self._open: OrderedDict[_Guard, None] = OrderedDict()  # oldest first
        self._by_transport: dict[Any, _Guard] = {}
        self.evicted = 0

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for ``loop.create_server``."""
        return _Guard(self, self.factory())

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, guard: _Guard) -> bool:
        if len(self._open) >= self.limits.max_connections:
            oldest = next((g for g in self._open if not g.busy), None)
            if oldest is None:
                return False  # every connection is in a request: this one waits for none of them
            self.evicted += 1
            self.forget(oldest)
            oldest.close()
        self._open[guard] = None
        self._by_transport[guard.transport] = guard
        return True

    def forget(self, guard: _Guard) -> None:
        self._open.pop(guard, None)
        self._by_transport.pop(guard.transport, None)

    @contextlib.contextmanager
    def request(self, transport: Any) -> Iterator[float | None]:
        """Around one request's handling: the connection is busy (neither idle nor evictable).
        Yields the loop time of the request's first byte (None for a transport not ours)."""
        guard = self._by_transport.get(transport)
        if guard is None:
            yield None
            return
        try:
            yield guard.started()
        finally:
            guard.finished()

    def close_all(self) -> None:
        for guard in list(self._open):
            guard.close()
