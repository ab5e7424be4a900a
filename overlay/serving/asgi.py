"""``ov.asgi(app)``: the control routes on an ASGI app's own port (FastAPI, Starlette, anything ASGI),
and the request gate in front of the app.

HTTP requests under ``/_habanero/`` are answered here; everything else goes to the app. Each HTTP
request passes the request gate (``overlay.transaction.gate``): a push waits for the requests in
flight and holds new ones while it applies, so that no request sees two versions. A websocket, a
lifespan event and a response that streams (no ``Content-Length``, or server-sent events) are not
waited for: a streaming response is let go of once it starts. A push is vetted on a thread, the
gate drained by awaiting, then applied on the server's event loop, where the app's module code
runs (see ``overlay.serving.routes.answer_on_loop``). A worker forked after ``install()`` first
catches up with the store's active version; its first request waits for that (off the event loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from overlay.errors import HabaneroError
from overlay.serving.routes import Answer, ControlPlane, answer_on_loop, incomplete, too_large, too_slow

__all__ = ["ASGIApp", "ASGIWrapper"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ASGIWrapper:
    """The app, with the control routes in front of it (see the module docstring)."""

    def __init__(self, app: ASGIApp, plane: ControlPlane, joined: threading.Event, ready: Callable[[], None]) -> None:
        self.app, self.plane, self._joined, self._ready = app, plane, joined, ready
        self.gate = plane.gate
        self._loop_noted = False
        self.__wrapped__ = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._joined.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self._ready)
        if scope.get("type") != "http":
            await self.app(scope, receive, send)  # websockets and lifespan events are not waited for
            return
        if not self.plane.owns(scope.get("path", "")):
            await self._gated(scope, receive, send)
            return
        server = scope.get("server")
        if server:
            self.plane.note_address(server[0], server[1])
        answer = await self._control(scope, receive)
        body = answer.encoded()
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _gated(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's request, through the gate: counted in flight until its response is complete,
        or until it starts streaming."""
        if not self._loop_noted:  # a push this process takes part in runs its module code on this loop
            self._loop_noted = True
            self.plane.served.note_loop(asyncio.get_running_loop())
        gate = self.gate
        if not await gate.enter_async():
            await self.app(scope, receive, send)
            return
        ticket = [True, False]  # in flight, failed

        async def watched(message: MutableMapping[str, Any]) -> None:
            if message.get("type") == "http.response.start" and ticket[0]:
                ticket[1] = int(message.get("status", 200)) >= 500
                if _streams(message.get("headers") or ()):
                    ticket[0] = False
                    gate.let_go()
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except BaseException:
            ticket[1] = True
            raise
        finally:
            if ticket[0]:
                ticket[0] = False
                gate.leave(failed=ticket[1])

    async def _control(self, scope: Scope, receive: Receive) -> Answer:
        path = scope["path"]
        headers = {name.decode("latin-1").title(): value.decode("latin-1")
                   for name, value in scope.get("headers", [])}
        raw_query = scope.get("query_string", b"").decode("latin-1")
        query = dict(part.partition("=")[::2] for part in raw_query.split("&") if part)
        method = scope.get("method", "GET")
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        try:
            with self.plane.admit(method, path, headers, peer):
                body = await _read(receive, headers, self.plane.cap(path), self.plane.upload_timeout) \
                    if method == "POST" else b""
        except HabaneroError as exc:
            return self.plane.refuse(exc, peer)
        return await answer_on_loop(self.plane, method, path, query, headers, body, peer)


def _streams(headers: Any) -> bool:
    """Whether a response's headers say it streams: no length, or server-sent events."""
    length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            length = True
        elif lowered == b"content-type" and value.startswith(b"text/event-stream"):
            return True
    return not length


async def _read(receive: Receive, headers: dict[str, str], cap: int, deadline: float) -> bytes:
    declared_text = headers.get("Content-Length", "")
    declared = int(declared_text) if declared_text.isdigit() else None
    if declared is not None and declared > cap:
        raise too_large(cap, declared)
    chunks, got = [], 0
    try:
        async with asyncio.timeout(deadline):
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                chunks.append(chunk)
                got += len(chunk)
                if got > cap:
                    raise too_large(cap)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise too_slow(deadline) from None
    if declared is not None and got != declared:
        raise incomplete(got, declared)
    return b"".join(chunks)
