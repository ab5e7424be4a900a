"""The control routes on aiohttp: mounted into an aiohttp app, or on habanero's own small server.

* **mounted** (``install(app=app)``): a sub-application at ``/_habanero`` inside the app's own
  aiohttp application, and a middleware that puts every other request through the request gate
  (``overlay.transaction.gate``). A push is vetted on a thread, the gate drained by awaiting (the
  requests in flight finish; new ones wait), then applied on the app's event loop, inside the push
  request's handler, where the app's module code runs: no request sees two versions. A response
  that streams (a ``StreamResponse`` the handler prepares itself, a websocket) is let go of once it
  starts: a push does not wait for it.
* **standalone** (``install(listen="127.0.0.1:8765")``): a small aiohttp server on a daemon thread
  with its own event loop, for apps that are not web apps. A push runs on a plain thread of that
  server's (no event loop running there, as for the app's own module code: Django's database at
  import time works), holding the import lock; units of work the app marks with ``ov.running()``
  are drained first, the app's other threads keep running and pick up the new code on their next
  call of a patched function. The port is opened with ``SO_REUSEPORT``, so every process of
  the app may listen on the same address: the kernel spreads connections over them, and whichever
  gets a push drives it. A port held by anything else is refused at start-up.

The body is read as a stream with its own byte cap and deadline (``client_max_size`` does not cover
streamed bodies). On the standalone server every connection is bounded too: how many at once, how
long a request may take from its first byte to its last header, how long one may sit idle (see
``overlay.serving.connections``), and the upload's deadline runs from the request's first byte.
Mounted in the app's own server, those are the app server's settings; the upload's deadline runs
from the moment the headers are in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

from overlay.control import PREFIX
from overlay.errors import ConfigError, HabaneroError
from overlay.serving.connections import DEFAULT_CONTROL_LIMITS, Connections, ControlLimits
from overlay.serving.routes import Answer, ControlPlane, answer_on_loop, incomplete, too_large, too_slow

__all__ = ["StandaloneServer", "listening_socket", "mount"]


_PLANE = web.AppKey("plane", ControlPlane)
#: The standalone server's one thread for control requests: a plain thread (no event loop runs
#: there, as none runs where the app's module code ran), one request at a time, as on the loop.
_RUNNER = web.AppKey("runner", concurrent.futures.ThreadPoolExecutor)
_IN_GATE = "habanero.in_gate"  # on a request: it counts as in flight in the request gate
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CONNECTIONS = web.AppKey("connections", Connections)
_LISTEN_BACKLOG = 128  # connections the kernel queues for us
_ACCEPT_BATCH = 8  # accepted in one go (see StandaloneServer._serve)


def _json(answer: Answer) -> web.Response:
    return web.Response(body=answer.encoded(), status=answer.status, content_type="application/json")


async def _read_body(request: web.Request, cap: int, deadline: float, timeout: float) -> bytes:
    """The body, within ``cap`` bytes and by the loop time ``deadline`` (``timeout`` seconds after
    the request's first byte, for the message)."""
    if request.content_length is not None and request.content_length > cap:
        raise too_large(cap, request.content_length)
    buf = bytearray()
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in request.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) > cap:
                    raise too_large(cap)
    except TimeoutError:
        raise too_slow(timeout) from None
    if request.content_length is not None and len(buf) != request.content_length:
        raise incomplete(len(buf), request.content_length)
    return bytes(buf)


async def _route(request: web.Request) -> web.StreamResponse:
    plane = request.app[_PLANE]
    path = f"{PREFIX}/{request.match_info['tail']}"
    peer = request.remote or ""
    connections = request.config_dict.get(_CONNECTIONS)
    with connections.request(request.transport) if connections is not None else contextlib.nullcontext() as first:
        # On habanero's own server the upload's deadline runs from the request's first byte;
        # mounted in the app's, from here (the headers are the app's server's business).
        started = first if first is not None else asyncio.get_running_loop().time()
        try:
            body = b""
            with plane.admit(request.method, path, request.headers, peer):
                if request.method == "POST":
                    body = await _read_body(request, plane.cap(path), started + plane.upload_timeout,
                                            plane.upload_timeout)
        except HabaneroError as exc:
            response = _json(plane.refuse(exc, peer))
            response.force_close()  # the body, unread or cut off, is not the next request
            return response
        if connections is not None:  # habanero's own server: off its loop, on a plain thread
            answer = functools.partial(plane.handle, request.method, path, request.query, request.headers, body,
                                       peer=peer)
            return _json(await asyncio.get_running_loop().run_in_executor(request.config_dict[_RUNNER], answer))
        sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if sockname:
            plane.note_address(sockname[0], sockname[1])
        return _json(await answer_on_loop(plane, request.method, path, request.query, request.headers, body, peer))


def control_app(plane: ControlPlane) -> web.Application:
    """The ``/_habanero`` sub-application."""
    sub = web.Application(client_max_size=plane.served.limits.max_bundle_bytes)
    sub[_PLANE] = plane
    sub.router.add_route("*", "/{tail:.*}", _route)
    return sub


def mount(app: web.Application, plane: ControlPlane) -> None:
    """Mount the control routes into the app's own aiohttp application at ``/_habanero``, and put
    its other requests through the request gate."""
    app.add_subapp(PREFIX, control_app(plane))
    gate = plane.gate
    noted: list[bool] = []

    @web.middleware
    async def habanero_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if plane.owns(request.path):
            return await handler(request)
        if not noted:  # a push this process takes part in runs its module code on this loop
            noted.append(True)
            plane.served.note_loop(asyncio.get_running_loop())
        if not await gate.enter_async():
            return await handler(request)
        request[_IN_GATE] = True
        failed = True
        try:
            response = await handler(request)
            failed = response.status >= 500
            return response
        except web.HTTPException as exc:
            failed = exc.status >= 500
            raise
        finally:
            if request.get(_IN_GATE):
                request[_IN_GATE] = False
                gate.leave(failed=failed)

    async def let_streams_go(request: web.Request, response: web.StreamResponse) -> None:
        # A plain Response is prepared after its handler returned; one prepared while the handler
        # runs streams (a StreamResponse, a websocket): it is not waited for.
        if request.get(_IN_GATE) and not isinstance(response, web.Response):
            request[_IN_GATE] = False
            gate.let_go()

    app.middlewares.append(habanero_gate)
    app.on_response_prepare.append(let_streams_go)


def listening_socket(host: str, port: int, *, ours: Callable[[], bool]) -> socket.socket:
    """A TCP socket listening at ``host:port``, shared (``SO_REUSEPORT``) with the app's other
    processes; ``ours()`` says whether a live process of this store listens there already."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    taken = False
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # without SO_REUSEPORT: is it free?
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                taken = True
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port}: another program holds the port; choose "
                                  "another address with listen= or HABANERO_LISTEN", code="listen_failed") from None
            raise
        if taken and not ours():
            raise ConfigError(f"cannot listen on {host}:{port}: the port is shared by a process that is not "
                              "this app's (another app's habanero?); give each app its own address",
                              code="listen_failed")
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server TLS context from a certificate and key path, or None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key (HABANERO_TLS_CERT / HABANERO_TLS_KEY)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class StandaloneServer:
    """The control routes on their own small server, on a daemon thread with its own event loop;
    its connections bounded by ``limits`` (see ``overlay.serving.connections``)."""

    def __init__(self, plane: ControlPlane, sock: socket.socket, *, tls: ssl.SSLContext | None = None,
                 limits: ControlLimits = DEFAULT_CONTROL_LIMITS) -> None:
        self._plane, self._sock, self._tls, self.limits = plane, sock, tls, limits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._runs: concurrent.futures.ThreadPoolExecutor | None = None
        self.connections: Connections | None = None
        host, port = sock.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)

    def start(self) -> tuple[str, int]:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="habanero-control", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise ConfigError(f"cannot serve on {self.address[0]}:{self.address[1]}: {failure[0]}",
                              code="listen_failed")
        return self.address

    async def _serve(self) -> None:
        limits = self.limits
        root = web.Application()
        mount(root, self._plane)
        # aiohttp's own keep-alive close is a backstop: Connections closes an idle connection first.
        # A refused body is drained for at most a second, so that the client reads the answer.
        runner = self._runner = web.AppRunner(root, access_log=None, handle_signals=False, lingering_time=1.0,
                                              keepalive_timeout=limits.idle_timeout + limits.request_timeout)
        loop = asyncio.get_running_loop()

        def aiohttp_protocol() -> asyncio.Protocol:  # aiohttp's own, once the runner is set up
            assert runner.server is not None
            return runner.server()

        self.connections = root[_CONNECTIONS] = Connections(aiohttp_protocol, limits, loop)
        root[_RUNNER] = self._runs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="habanero-deploy")
        await runner.setup()
        # asyncio accepts up to ``backlog`` sockets in one go before any protocol sees them: a small
        # batch keeps the descriptors open at once near max_connections under a flood of connects.
        self._server = await loop.create_server(self.connections.protocol, sock=self._sock, ssl=self._tls,
                                                backlog=_ACCEPT_BATCH,
                                                ssl_handshake_timeout=limits.request_timeout if self._tls else None)
        self._sock.listen(_LISTEN_BACKLOG)  # create_server re-listened with the batch size

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.connections is not None:
            self.connections.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._runs is not None:
            self._runs.shutdown(wait=False)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        with contextlib.suppress(OSError):
            self._sock.close()
