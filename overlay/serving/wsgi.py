"""``ov.wsgi(app)``: the control routes on a WSGI app's own port (Flask, Django, anything WSGI).

Requests under ``/_habanero/`` are answered here; every other request goes to the app, unchanged.
Whichever worker process the server hands a push to drives it across every worker (see
``overlay.deploy``). A worker forked after ``install()`` (gunicorn ``--preload``, a fork pool) first
catches up with the store's active version: its first request waits for that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from overlay.errors import HabaneroError
from overlay.serving.routes import Answer, ControlPlane, incomplete, too_large, too_slow

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
        self.__wrapped__ = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not self._joined.is_set():
            self._ready()
        path = environ.get("PATH_INFO", "")
        if not self.plane.owns(path):
            return self.app(environ, start_response)
        answer = self._control(environ, path)
        body = answer.encoded()
        start_response(f"{answer.status} {_REASONS.get(answer.status, 'Error')}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

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
