"""The control plane: push, rollback, status and history under ``/_habanero/``, on any server.

The routes themselves (``overlay.serving.routes``) take a method, a path, headers and a body and
answer JSON; each way of serving them only moves bytes:

* ``install(app=aiohttp_app)``: mounted into the app's own aiohttp application (:func:`mount`);
* ``ov.wsgi(app)`` and ``ov.asgi(app)``: in front of a WSGI or ASGI app, on its own port
  (:func:`wsgi`, :func:`asgi`): Flask, Django, FastAPI, Starlette, under any server;
* ``install(listen="127.0.0.1:8765")``: on habanero's own small aiohttp server, on a thread, for
  apps that are not web apps (:func:`standalone`); every process of the app may listen on the same
  address.

aiohttp is imported only by the first and the last: a WSGI app never loads it.

Who reaches these routes is untrusted until a signature by a locally trusted key holds: an
anonymous peer is refused from a push's headers (``X-Habanero-Key``, ``X-Habanero-App``) before its
body is read or an upload slot taken, its refusal is counted rather than recorded, and the
standalone server bounds connections, header time and idle time (``ControlLimits``). A captured
request or bundle cannot be replayed, even after a restart; a proxy in the middle can delay or drop,
never forge. The whole model, adversary by adversary: ``docs/threat-model.md``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from overlay.control import PREFIX
from overlay.serving.connections import DEFAULT_CONTROL_LIMITS, ControlLimits
from overlay.serving.routes import MAX_UPLOADS, ControlPlane, Served
from overlay.serving.wsgi import WSGIApp, WSGIWrapper

if TYPE_CHECKING:
    from overlay.serving.aiohttp import StandaloneServer
    from overlay.serving.asgi import ASGIApp, ASGIWrapper

__all__ = ["DEFAULT_CONTROL_LIMITS", "MAX_UPLOADS", "PREFIX", "ControlLimits", "ControlPlane", "Served", "asgi",
           "mount", "standalone", "wsgi"]


def mount(app: Any, plane: ControlPlane) -> None:
    """Mount the routes into an ``aiohttp.web.Application`` at ``/_habanero``."""
    from overlay.serving import aiohttp

    aiohttp.mount(app, plane)


def wsgi(app: WSGIApp, plane: ControlPlane, joined: threading.Event, ready: Callable[[], None]) -> WSGIWrapper:
    """A WSGI app answering the routes itself and passing every other request to ``app``; until
    ``joined`` is set (a forked worker catching up), a request first waits in ``ready``."""
    return WSGIWrapper(app, plane, joined, ready)


def asgi(app: ASGIApp, plane: ControlPlane, joined: threading.Event, ready: Callable[[], None]) -> ASGIWrapper:
    """An ASGI app answering the routes itself and passing everything else to ``app`` (``joined``
    and ``ready`` as for :func:`wsgi`)."""
    from overlay.serving.asgi import ASGIWrapper

    return ASGIWrapper(app, plane, joined, ready)


def standalone(plane: ControlPlane, host: str, port: int, *, ours: Callable[[], bool],
               tls_cert: str | None = None, tls_key: str | None = None,
               limits: ControlLimits = DEFAULT_CONTROL_LIMITS) -> StandaloneServer:
    """The routes on their own server at ``host:port``, started, its connections bounded by
    ``limits`` (see ``overlay.serving.aiohttp`` and ``overlay.serving.connections``)."""
    from overlay.serving import aiohttp

    tls = aiohttp.ssl_context(tls_cert, tls_key)
    sock: socket.socket = aiohttp.listening_socket(host, port, ours=ours)
    server = aiohttp.StandaloneServer(plane, sock, tls=tls, limits=limits)
    server.start()
    return server
