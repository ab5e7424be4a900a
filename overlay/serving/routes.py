"""The control routes under ``/_habanero/``, whatever server carries them.

    POST /_habanero/push       a bundle (signed: the bundle's own signature authenticates it)
    POST /_habanero/rollback   {"to": version or null, "expect": version}   (a signed request)
    GET  /_habanero/status     what every process of the app runs           (signed, unless public)
    GET  /_habanero/history    the store's deploy history                   (a signed request)

:class:`ControlPlane` answers them from a method, a path, headers and a body, with a status and a
JSON object: the WSGI, ASGI and aiohttp adapters (``overlay.serving``) only move bytes. Before a
body is read, :meth:`ControlPlane.admit` checks what the headers claim (a trusted key, this app: see
``overlay.serving.guard``) and takes one of ``MAX_UPLOADS`` upload slots; the adapters then read
the body within :meth:`ControlPlane.cap` bytes and ``upload_timeout`` seconds. Errors are JSON
``{"code", "message"}`` with fitting statuses, never a traceback page; a refusal of unverified bytes
is counted (``refused_unverified`` in ``status``), never recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from overlay.bundle import Bundle, Limits
from overlay.control import PREFIX, Nonces, RequestVerifier
from overlay.errors import ConfigError, ControlRejected, HabaneroError, TooLarge, UploadFailed, printable
from overlay.keys import TrustedKeys
from overlay.serving.guard import MAX_UPLOADS, Refusals, UploadSlots, precheck
from overlay.transaction.gate import Gate
from overlay.upgrade import UpgradeReport

__all__ = ["MAX_UPLOADS", "Answer", "ControlPlane", "Served", "answer_on_loop", "incomplete", "too_large",
           "too_slow"]

log = logging.getLogger("overlay.http")

_CONTROL_BODY = 64 << 10  # a rollback's JSON


class Served(Protocol):
    """What the routes need of the installed overlay (``overlay.Overlay`` is one)."""

    app_id: str
    limits: Limits

    @property
    def trusted(self) -> TrustedKeys | None: ...
    @property
    def active(self) -> Bundle | None: ...
    def apply(self, bundle: bytes) -> UpgradeReport: ...
    def verify(self, bundle: bytes) -> None: ...
    def rollback(self, to: int | None = None, *, expect: int | None = None) -> UpgradeReport: ...
    def status(self) -> dict[str, Any]: ...
    def history(self, limit: int | None = None) -> list[dict[str, Any]]: ...
    @property
    def gate(self) -> Gate | None: ...
    def note_loop(self, loop: Any) -> None: ...


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]

    @classmethod
    def of(cls, exc: HabaneroError) -> Answer:
        """A refusal, with its own HTTP status and its JSON form."""
        return cls(exc.http_status, exc.to_dict())

    def encoded(self) -> bytes:
        return json.dumps(self.body, default=str).encode()


class ControlPlane:
    """The routes of one installed overlay (see the module docstring)."""

    def __init__(self, served: Served, *, public_status: bool = False, upload_timeout: float = 30.0,
                 nonces: Nonces | None = None) -> None:
        gate = served.gate
        if served.trusted is None or gate is None:
            raise ConfigError("a disabled overlay serves no control routes", code="disabled")
        self.served = served
        #: The request gate of the app's requests (``overlay.transaction.gate``).
        self.gate: Gate = gate
        self.public_status = public_status
        self.upload_timeout = upload_timeout
        self.verifier = RequestVerifier(served.trusted, served.app_id, nonces=nonces)
        self.uploads = UploadSlots()
        self.refusals = Refusals()
        #: Where the app's own server answered a control request (host, port): a ``health`` URL
        #: path is asked there (see ``overlay.runtime.probation``).
        self.address: tuple[str, int] | None = None

    @staticmethod
    def deploys(method: str, path: str) -> bool:
        """Whether a request is a push or a rollback: what drains the request gate."""
        return method.upper() == "POST" and path in (f"{PREFIX}/push", f"{PREFIX}/rollback")

    def vet(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        """Check a push's signature or a rollback's before an event loop drains its requests for it
        (see ``overlay.serving.asgi``): nobody unverified makes the app hold its requests. Then
        answer it with ``handle(..., vetted=True)``: a rollback's one-time nonce is spent here."""
        if path == f"{PREFIX}/push":
            self.served.verify(body)
        else:
            self._authenticate("POST", path, headers, body)

    def note_address(self, host: object, port: object) -> None:
        """The app's own server answered on ``host:port`` (any address: ``0.0.0.0`` is asked on loopback)."""
        if isinstance(host, str) and isinstance(port, int | str) and str(port).isdigit():
            self.address = ("127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host, int(port))

    @staticmethod
    def owns(path: str) -> bool:
        """Whether a request path is one of ours (anything else goes to the app)."""
        return path == PREFIX or path.startswith(PREFIX + "/")

    def cap(self, path: str) -> int:
        """The most bytes a request body to ``path`` may have."""
        return self.served.limits.max_bundle_bytes if path == f"{PREFIX}/push" else _CONTROL_BODY

    @contextlib.contextmanager
    def admit(self, method: str, path: str, headers: Mapping[str, str], peer: str) -> Iterator[None]:
        """Before a body is read: refuse what the headers claim (see ``overlay.serving.guard``), then
        hold an upload slot (``too_many_uploads`` when none is free) while the block reads it."""
        if method.upper() != "POST":
            yield  # no body is read
            return
        trusted = self.served.trusted
        assert trusted is not None  # a disabled overlay has no plane
        precheck(path == f"{PREFIX}/push", headers, trusted, self.served.app_id)
        with self.uploads.slot(peer):
            yield

    def refuse(self, exc: HabaneroError, peer: str = "") -> Answer:
        """The answer to a refusal; one of unverified bytes is counted, never recorded."""
        if exc.unverified:
            self.refusals.add(exc, peer)
        return Answer.of(exc)

    def handle(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
               body: bytes, *, peer: str = "", vetted: bool = False) -> Answer:
        """Answer one request (its body read already, within :meth:`cap`; ``vetted``: by :meth:`vet`)."""
        try:
            if vetted and path == f"{PREFIX}/rollback":
                return self._rollback(path, query, headers, body, authenticated=True)
            return self._route(method, path, query, headers, body)
        except HabaneroError as exc:
            return self.refuse(exc, peer)
        except Exception:
            # Escaped: the exception's text may carry bytes from the request.
            log.error("habanero control request failed:\n%s",
                      "\n".join(printable(line, 1000) for line in traceback.format_exc().splitlines()))
            return Answer(500, {"code": "internal_error",
                                "message": "internal error in the habanero endpoint; see the app's log"})

    def _route(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
               body: bytes) -> Answer:
        route = {("POST", f"{PREFIX}/push"): self._push, ("POST", f"{PREFIX}/rollback"): self._rollback,
                 ("GET", f"{PREFIX}/status"): self._status, ("GET", f"{PREFIX}/history"): self._history}
        handler = route.get((method.upper(), path))
        if handler is None:
            known = any(p == path for _, p in route)
            return Answer(405 if known else 404, {"code": "http_error", "message": "Method Not Allowed" if known
                                                  else "Not Found"})
        return handler(path, query, headers, body)

    def _authenticate(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        return self.verifier.verify(method, path, headers, body)

    def _push(self, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes) -> Answer:
        started = time.perf_counter()
        report = self.served.apply(body)  # the bundle's own signature authenticates it
        server_ms = round((time.perf_counter() - started) * 1000, 3)
        return Answer(200, {"ok": True, "report": report.to_dict(), "server_ms": server_ms, "active": self._active()})

    def _rollback(self, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes, *,
                  authenticated: bool = False) -> Answer:
        if not authenticated:
            self._authenticate("POST", path, headers, body)
        try:
            args = json.loads(body or b"{}")
            to, expect = args.get("to"), args.get("expect")
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (to, expect)):
                raise ValueError
        except (ValueError, AttributeError):
            raise ControlRejected('rollback body must be JSON {"to": version or null, "expect": version}',
                                  code="bad_request") from None
        if expect is None:
            # Each process keeps its own record of the nonces it saw: without "expect", one signed
            # request replayed to each worker behind the port would roll the app back once each.
            raise ControlRejected('a rollback must name the version it expects to replace: {"to": version or '
                                  'null, "expect": the active version} (habanero-pack rollback sends it)',
                                  code="bad_request")
        report = self.served.rollback(to, expect=expect)
        return Answer(200, {"ok": True, "report": report.to_dict(), "active": self._active()})

    def _status(self, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes) -> Answer:
        if not self.public_status:
            self._authenticate("GET", path, headers, b"")
        return Answer(200, self.served.status())

    def _history(self, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes) -> Answer:
        self._authenticate("GET", path, headers, b"")
        try:
            limit = int(query.get("limit", "50"))
        except ValueError:
            limit = 50
        return Answer(200, {"history": self.served.history(limit)})

    def _active(self) -> dict[str, Any] | None:
        """What imports serve now (the finder's bundle), as ``status`` reports it."""
        bundle = self.served.active
        return {"version": bundle.version, "digest": bundle.digest} if bundle else None



async def answer_on_loop(plane: ControlPlane, method: str, path: str, query: Mapping[str, str],
                         headers: Mapping[str, str], body: bytes, peer: str) -> Answer:
    """Answer a control request on the event loop the app's requests run on (ASGI, aiohttp ``app=``).

    A push or rollback is vetted first on a thread (its signature; nothing unverified holds the
    app's requests), then the request gate is drained by awaiting (the requests in flight need this
    loop to finish), then the deploy runs here, on the app's loop, where its module code belongs.
    """
    loop = asyncio.get_running_loop()
    plane.served.note_loop(loop)
    if not plane.deploys(method, path):
        return plane.handle(method, path, query, headers, body, peer=peer)
    gate = plane.gate
    try:
        await loop.run_in_executor(None, plane.vet, method, path, headers, body)
        await gate.hold_async()
    except HabaneroError as exc:
        return plane.refuse(exc, peer)
    try:
        return plane.handle(method, path, query, headers, body, peer=peer, vetted=True)
    finally:
        gate.release()


# Refusals of a body not read yet: nothing vouches for it (see overlay.serving.guard).


def too_large(cap: int, declared: int | None = None) -> TooLarge:
    if declared is not None:
        exc = TooLarge(f"request body of {declared} bytes is over the {cap} byte limit", code="bundle_too_large")
    else:
        exc = TooLarge(f"request body is over the {cap} byte limit; the upload was cut off", code="bundle_too_large")
    exc.unverified = True
    return exc


def too_slow(deadline: float) -> UploadFailed:
    exc = UploadFailed(f"the upload did not finish within {deadline:g} s of its first byte; check the network "
                       "and push again", code="upload_timeout")
    exc.unverified = True
    return exc


def incomplete(got: int, declared: int) -> UploadFailed:
    exc = UploadFailed(f"the upload ended after {got} of {declared} bytes; push again", code="upload_incomplete")
    exc.unverified = True
    return exc
