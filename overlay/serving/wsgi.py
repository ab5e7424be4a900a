"""``ov.wsgi(app)``: the control routes on a WSGI app's own port (Flask, Django, anything WSGI), and
the request gate in front of the app.

Requests under ``/_habanero/`` are answered here; every other request goes to the app through the
request gate (``overlay.transaction.gate``): a push waits for the requests in flight and holds new
ones while it applies, so that no request sees two versions. A request counts as in flight until
its response body is consumed (``close()``), or until it starts streaming (a response without
``Content-Length``, or server-sent events): a long-lived response is not waited for. Whichever
worker process the server hands a push to drives it across every worker (see ``overlay.deploy``),
on the request's own thread. A worker forked after ``install()`` (gunicorn ``--preload``, a fork
pool) first catches up with the store's active version: its first request waits for that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from overlay.errors import HabaneroError
from overlay.serving.routes import Answer, ControlPlane, incomplete, too_large, too_slow
from overlay.transaction.gate import Gate, Pass

__all__ = ["WSGIApp", "WSGIWrapper"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class WSGIWrapper:
    """The app, with the control routes in front of it. Until ``joined`` is set (at once, except in
    a child forked after ``install()``), a request waits in ``ready`` for this process to take part
    in deploys; after that, every request pays one flag test."""

    def __init__(self, app: WSGIApp, plane: ControlPlane, joined: threading.Event, ready: Callable[[], None]) -> None:
        self.app, self.plane, self._joined, self._ready = app, plane, joined, ready
        self.gate = plane.gate
        self.__wrapped__ = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not self._joined.is_set():
            self._ready()
        path = environ.get("PATH_INFO", "")
        if not self.plane.owns(path):
            return self._gated(environ, start_response)
        self.plane.note_address(environ.get("SERVER_NAME"), environ.get("SERVER_PORT"))
        answer = self._control(environ, path)
        body = answer.encoded()
        start_response(f"{answer.status} {_REASONS.get(answer.status, 'Error')}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def _gated(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        gate = self.gate
        entry = gate.enter()
        if entry is None:
            return self.app(environ, start_response)
        ticket = _Ticket(gate, entry)

        def watched(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            ticket.failed = status[:1] == "5"
            if _streams(headers):
                ticket.let_go()
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        try:
            body = self.app(environ, watched)
        except BaseException:
            ticket.failed = True
            ticket.done()
            raise
        if isinstance(body, list | tuple):  # computed already: nothing of the app's runs any more
            ticket.done()
            return body
        return _Body(body, ticket)

    def _control(self, environ: dict[str, Any], path: str) -> Answer:
        headers = {key[5:].replace("_", "-").title(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        query = dict(part.partition("=")[::2] for part in environ.get("QUERY_STRING", "").split("&") if part)
        method = environ.get("REQUEST_METHOD", "GET")
        peer = str(environ.get("REMOTE_ADDR", ""))
        try:
            with self.plane.admit(method, path, headers, peer):
                body = _read(environ, self.plane.cap(path), self.plane.upload_timeout) if method == "POST" else b""
        except HabaneroError as exc:  # a refusal of the upload, answered as JSON like every other
            return self.plane.refuse(exc, peer)
        return self.plane.handle(method, path, query, headers, body, peer=peer)


class _Ticket:
    """One request's place in the gate, left once: when its body is done, or when it streams. It
    carries the request's pass: the server may call ``close()`` on another thread than the request's."""

    __slots__ = ("entry", "failed", "gate", "inside")

    def __init__(self, gate: Gate, entry: Pass) -> None:
        self.gate, self.entry, self.inside, self.failed = gate, entry, True, False

    def let_go(self) -> None:
        if self.inside:
            self.inside = False
            self.gate.let_go(self.entry)

    def done(self) -> None:
        if self.inside:
            self.inside = False
            self.gate.leave(failed=self.failed, entry=self.entry)


class _Body:
    """The app's response body, iterated by the server; the request leaves the gate at ``close()``."""

    def __init__(self, body: Iterable[bytes], ticket: _Ticket) -> None:
        self._body, self._ticket = body, ticket

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except BaseException:
            self._ticket.failed = True
            raise

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._ticket.done()


def _streams(headers: list[tuple[str, str]]) -> bool:
    """Whether a response's headers say it streams: no length, or server-sent events."""
    length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length":
            length = True
        elif lowered == "content-type" and value.startswith("text/event-stream"):
            return True
    return not length


def _read(environ: dict[str, Any], cap: int, deadline: float) -> bytes:
    """The request body, within ``cap`` bytes and ``deadline`` seconds from its first read (checked
    between reads: the server's own socket or worker timeout must bound one read that hangs, as it
    bounds the headers; e.g. gunicorn's ``--timeout``)."""
    declared_text = environ.get("CONTENT_LENGTH") or ""
    declared = int(declared_text) if declared_text.isdigit() else None
    if declared is not None and declared > cap:
        raise too_large(cap, declared)
    stream = environ.get("wsgi.input")
    if stream is None or declared == 0:
        return b""
    if declared is None and not environ.get("wsgi.input_terminated"):
        return b""  # no length and no end marker: WSGI allows no read
    started = time.monotonic()
    chunks, got = [], 0
    while declared is None or got < declared:
        chunk = stream.read(min(1 << 16, (declared - got) if declared is not None else 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        if got > cap:
            raise too_large(cap)
        if time.monotonic() - started > deadline:
            raise too_slow(deadline)
    if declared is not None and got != declared:
        raise incomplete(got, declared)
    return b"".join(chunks)
