"""The control plane: push, rollback, status and history over aiohttp, under ``/_habanero/``.

Two ways to run it, same routes, same checks:

* **mounted** (``install(app=app)``): a sub-application at ``/_habanero`` inside the app's own
  aiohttp application. The apply step runs on the app's event loop, inside the push request's
  handler: other requests' coroutines are paused at an ``await`` while it runs (a few ms), so each
  of them runs either wholly on old code or resumes on new code for its next step.
* **standalone** (``install(listen="127.0.0.1:8765")``): a small aiohttp server on a daemon thread
  with its own event loop, for apps that are not aiohttp. The apply step runs on that thread while
  holding the import lock; the app's own threads keep running and pick up the new code on their
  next call of a patched function.

The push body is read as a stream with its own byte cap and deadline (``client_max_size`` does not
cover streamed bodies). Up to ``MAX_UPLOADS`` bodies are read at once, outside any lock, so a slow
sender is cut off at its deadline and delays nobody else; then one deploy at a time holds the deploy
lock, and a push or rollback that finds it taken gets ``409 deploy_in_progress`` (a push behind
another one usually finds its version stale: ``409 stale_version``). Errors are JSON
``{"code", "message"}`` with fitting statuses, never an HTML traceback page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
import time
from typing import Any

from aiohttp import web

from overlay.control import PREFIX, RequestVerifier
from overlay.errors import ConfigError, ControlRejected, HabaneroError, TooLarge, UploadFailed

log = logging.getLogger(__name__)

MAX_UPLOADS = 4  # bodies read at once; each is capped at Limits.max_bundle_bytes
_OVERLAY = web.AppKey("overlay", object)
_SETTINGS = web.AppKey("settings", dict)
_VERIFIER = web.AppKey("verifier", RequestVerifier)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except HabaneroError as exc:
        return _json(exc.to_dict(), exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"code": "http_error", "message": exc.reason}, exc.status)
    except Exception:
        log.exception("habanero control request failed")
        return _json({"code": "internal_error", "message": "internal error in the habanero endpoint; "
                      "see the app's log"}, 500)


def _settings(request: web.Request) -> dict[str, Any]:
    return request.app[_SETTINGS]


def _authenticate(request: web.Request, body: bytes) -> str:
    return request.app[_VERIFIER].verify(request.method, request.path, request.headers, body)


async def _read_body(request: web.Request, cap: int, deadline: float) -> bytes:
    if request.content_length is not None and request.content_length > cap:
        raise TooLarge(f"request body of {request.content_length} bytes is over the {cap} byte limit",
                       code="bundle_too_large")
    buf = bytearray()
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) > cap:
                    raise TooLarge(f"request body is over the {cap} byte limit; the upload was cut off",
                                   code="bundle_too_large")
    except TimeoutError:
        raise UploadFailed(f"the upload did not finish within {deadline:g} s; check the network and "
                            "push again", code="upload_timeout") from None
    if request.content_length is not None and len(buf) != request.content_length:
        raise UploadFailed(f"the upload ended after {len(buf)} of {request.content_length} bytes; push "
                            "again", code="upload_incomplete")
    return bytes(buf)


async def push(request: web.Request) -> web.Response:
    ov, settings = request.app[_OVERLAY], _settings(request)
    # Uploads are read concurrently (each capped and with a deadline) and only then serialised by
    # the deploy lock: a stalled sender delays nobody else's push, and at most MAX_UPLOADS bodies
    # are held in memory at once.
    if settings["uploads"] >= MAX_UPLOADS:
        raise UploadFailed(f"{MAX_UPLOADS} uploads are already in progress; push again in a moment",
                            code="too_many_uploads")
    settings["uploads"] += 1
    try:
        data = await _read_body(request, ov.limits.max_bundle_bytes, settings["upload_timeout"])
    finally:
        settings["uploads"] -= 1
    started = time.perf_counter()
    report = ov.apply(data)  # DeployInProgress if another deploy holds the lock
    server_ms = round((time.perf_counter() - started) * 1000, 3)
    return _json({"ok": True, "report": report.to_dict(), "server_ms": server_ms,
                  "active": _active(ov)})


async def rollback(request: web.Request) -> web.Response:
    ov, settings = request.app[_OVERLAY], _settings(request)
    body = await _read_body(request, 64 << 10, settings["upload_timeout"])
    _authenticate(request, body)
    try:
        args = json.loads(body or b"{}")
        to, expect = args.get("to"), args.get("expect")
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (to, expect)):
            raise ValueError
    except (ValueError, AttributeError):
        raise ControlRejected('rollback body must be JSON {"to": version or null, "expect": version}',
                              code="bad_request") from None
    report = ov.rollback(to, expect=expect)
    return _json({"ok": True, "report": report.to_dict(), "active": _active(ov)})


async def status(request: web.Request) -> web.Response:
    ov = request.app[_OVERLAY]
    if not _settings(request)["public_status"]:
        _authenticate(request, b"")
    return _json(ov.status())


async def history(request: web.Request) -> web.Response:
    ov = request.app[_OVERLAY]
    _authenticate(request, b"")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        limit = 50
    return _json({"history": ov.history(limit)})


def _active(ov: Any) -> dict[str, Any] | None:
    """What imports serve now (the finder's bundle), as ``status`` reports it."""
    bundle = ov.active
    return {"version": bundle.version, "digest": bundle.digest} if bundle else None


def control_app(ov: Any, *, public_status: bool = False, upload_timeout: float = 30.0) -> web.Application:
    """The ``/_habanero`` sub-application for an installed overlay."""
    sub = web.Application(middlewares=[_errors_as_json], client_max_size=ov.limits.max_bundle_bytes)
    sub[_OVERLAY] = ov
    sub[_SETTINGS] = {"public_status": public_status, "upload_timeout": upload_timeout, "uploads": 0}
    sub[_VERIFIER] = RequestVerifier(ov.trusted, ov.app_id)
    sub.router.add_post("/push", push)
    sub.router.add_post("/rollback", rollback)
    sub.router.add_get("/status", status)
    sub.router.add_get("/history", history)
    return sub


def mount(app: web.Application, ov: Any, **options: Any) -> None:
    """Mount the control plane into the app's own aiohttp application at ``/_habanero``."""
    app.add_subapp(PREFIX, control_app(ov, **options))


def ssl_context(cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """A server TLS context from a certificate and key path, or None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key (HABANERO_TLS_CERT / HABANERO_TLS_KEY)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.fspath(cert), os.fspath(key))
    return context


class StandaloneServer:
    """The control plane on its own small server, on a daemon thread with its own event loop."""

    def __init__(self, ov: Any, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                 **options: Any) -> None:
        self._ov, self._host, self._port, self._tls, self._options = ov, host, port, tls, options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

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
            loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
            loop.close()

        self._thread = threading.Thread(target=run, name="habanero-control", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise ConfigError(f"cannot listen on {self._host}:{self._port}: {failure[0]}",
                              code="listen_failed")
        assert self.address is not None
        return self.address

    async def _serve(self) -> None:
        root = web.Application()
        mount(root, self._ov, **self._options)
        self._runner = web.AppRunner(root, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._tls)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        host, port = sockets[0].getsockname()[:2]
        self.address = (host, port)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

