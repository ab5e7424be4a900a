"""``ov.asgi(app)``: the control routes on an ASGI app's own port (FastAPI, Starlette, anything ASGI).

HTTP requests under ``/_habanero/`` are answered here; everything else (other requests, websockets,
lifespan events) goes to the app, unchanged. The route runs on the server's event loop, as the
aiohttp mount does: while this process applies a push, its other requests' coroutines wait at
their next ``await``. A worker forked after ``install()`` first catches up with the store's active
version; its first request waits for that (off the event loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from overlay.errors import HabaneroError
from overlay.serving.routes import Answer, ControlPlane, incomplete, too_large, too_slow

__all__ = ["ASGIApp", "ASGIWrapper"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ASGIWrapper:
    """The app, with the control routes in front of it (see the module docstring)."""

    def __init__(self, app: ASGIApp, plane: ControlPlane, joined: threading.Event, ready: Callable[[], None]) -> None:
        self.app, self.plane, self._joined, self._ready = app, plane, joined, ready
        self.__wrapped__ = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._joined.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self._ready)
        if scope.get("type") != "http" or not self.plane.owns(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        answer = await self._control(scope, receive)
        body = answer.encoded()
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

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
        return self.plane.handle(method, path, query, headers, body, peer=peer)


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
