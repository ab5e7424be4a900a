"""A small client for an app's ``/_habanero/`` endpoint: HTTP/1.1 on a bare socket.

The CLI's whole run (interpreter start included) is on the save-to-live path, so this imports
neither aiohttp nor ``http.client`` (which pulls in the ``email`` package to parse a few headers:
~20 ms, more than a push's transfer), and ``ssl`` only for ``https://``. It keeps one keep-alive
connection: for a one-off push's status and push, and for every push of a watch session. Every
failure becomes one ``RemoteError`` whose message says what to check.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from overlay.bundle import claimed_key_ids
from overlay.control import H_APP, H_KEY, PREFIX, sign_request
from overlay.errors import RemoteError
from overlay.keys import SigningKey

if TYPE_CHECKING:
    import ssl

MAX_RESPONSE_BYTES = 16 << 20  # status and history are a few KB; anything bigger is not habanero


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    base: str  # path prefix before /_habanero (usually "")

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"{url!r} is not an http:// or https:// URL of the app", code="bad_url")
        base = parts.path.rstrip("/")
        if base.endswith(PREFIX):
            base = base[: -len(PREFIX)]
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise RemoteError(f"{url!r} has an invalid port", code="bad_url") from None
        return cls(parts.scheme, parts.hostname, port, base)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base}"


class Remote:
    """One app's control endpoint. Control requests are signed with ``key``."""

    def __init__(self, url: str, *, app_id: str, key: SigningKey | None = None, ca_file: str | None = None,
                 timeout: float = 30.0) -> None:
        self.endpoint = Endpoint.parse(url)
        self.app_id, self.key, self.ca_file, self.timeout = app_id, key, ca_file, timeout
        self.store: str | None = None  # the app's store directory, once a status has said it
        self._conn: _Connection | None = None

    def _connection(self) -> _Connection:
        if self._conn is None:
            tls = self._tls_context() if self.endpoint.scheme == "https" else None
            self._conn = _Connection(self.endpoint, self.timeout, tls)
        return self._conn

    def _tls_context(self) -> ssl.SSLContext:
        import ssl

        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:  # a missing file, or one that holds no certificate
            raise RemoteError(f"cannot use {self.ca_file} as the CA file: "
                              f"{getattr(exc, 'strerror', None) or exc}; pass a PEM certificate with --ca-file",
                              code="bad_ca_file") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, route: str, body: bytes = b"", *, signed: bool = True,
                content_type: str = "application/json", extra: dict[str, str] | None = None) -> dict[str, Any]:
        path = f"{self.endpoint.base}{PREFIX}/{route}"
        headers = {"Content-Type": content_type, "Accept": "application/json", **(extra or {})}
        if signed and self.key is not None:
            # The server mounts the routes at /_habanero, whatever the base path in front of it.
            headers.update(sign_request(self.key, method, f"{PREFIX}/{route.partition('?')[0]}",
                                        self.app_id, body))
        for attempt in (1, 2):
            reused = self._conn is not None
            try:
                status, raw, keep = self._connection().exchange(method, path, headers, body)
                break
            except _NotHttp:
                self.close()
                raise RemoteError(f"{self.endpoint} answered, but not in HTTP: it is not a habanero endpoint; "
                                  "check the URL and its port", code="not_habanero") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if not reused or attempt == 2:  # only a stale keep-alive connection earns a retry
                    raise self._unreachable(exc) from None
            except OSError as exc:
                self.close()
                tls = sys.modules.get("ssl")
                if tls is not None and isinstance(exc, tls.SSLError):
                    hint = ("the server does not speak TLS: use an http:// URL"
                            if exc.reason == "WRONG_VERSION_NUMBER" else "pass the server's CA with --ca-file")
                    raise RemoteError(f"TLS with {self.endpoint} failed: {exc.reason or exc}; {hint}",
                                      code="tls_error") from None
                raise self._unreachable(exc) from None
        if not keep:
            self.close()
        return self._decode(status, raw)

    def _decode(self, status: int, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict) or (status >= 400 and "code" not in body):
            raise self._not_habanero(f"HTTP {status}", status)
        if status >= 400:
            raise RemoteError(body.get("message", f"HTTP {status}"), code=body["code"], status=status,
                              remote_traceback=body.get("remote_traceback", ""), body=body)
        return body

    def _not_habanero(self, answer: str, status: int) -> RemoteError:
        return RemoteError(f"{self.endpoint} answered {answer} but is not a habanero endpoint; check the URL "
                           "(the app's base URL; habanero adds /_habanero/...)", code="not_habanero", status=status)

    def _unreachable(self, exc: BaseException) -> RemoteError:
        if isinstance(exc, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(exc, TimeoutError):
            reason = "timed out"
        elif isinstance(exc, ConnectionResetError) and self.endpoint.scheme == "http":
            reason = f"{exc}; if the app serves TLS, use an https:// URL"
        else:
            reason = str(exc) or type(exc).__name__
        return RemoteError(f"cannot reach {self.endpoint}: {reason}; is the app running with "
                           "overlay.install(listen=...) or app=..., and is the URL right?", code="unreachable")

    def status(self) -> dict[str, Any]:
        status = self.request("GET", "status")
        self.store = status.get("store") if isinstance(status.get("store"), str) else self.store
        return status

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.request("GET", f"history?limit={int(limit)}")["history"]
        return entries

    def push(self, data: bytes) -> dict[str, Any]:
        # The bundle's own signatures authenticate it; the headers name its keys and app up front,
        # so that a server refuses an unknown key before reading the body.
        claims = {H_KEY: ",".join(claimed_key_ids(data)), H_APP: self.app_id}
        return self.request("POST", "push", data, signed=False, content_type="application/octet-stream",
                            extra={k: v for k, v in claims.items() if v})

    def rollback(self, to: int | None = None, expect: int | None = None) -> dict[str, Any]:
        body = json.dumps({"to": to, "expect": expect}).encode()
        return self.request("POST", "rollback", body)


class _NotHttp(Exception):
    """The peer answered, but not with HTTP/1.x."""


class _Connection:
    """One keep-alive HTTP/1.1 connection: just what the four routes need, nothing parsed twice."""

    def __init__(self, endpoint: Endpoint, timeout: float, tls: ssl.SSLContext | None) -> None:
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host  # an IPv6 literal
        self.host = f"{host}:{endpoint.port}"
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=endpoint.host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = sock.makefile("rb")

    def exchange(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, bool]:
        """Send one request; return the status, the body, and whether the connection stays open."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}",
                *(f"{name}: {value}" for name, value in headers.items())]
        try:
            self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # A server may refuse from the headers alone and close before the body is in: its
            # answer may still be there to read.
            try:
                answer = self._head()
            except OSError:
                raise exc from None
            return self._rest(*answer)
        return self._rest(*self._head())

    def _rest(self, status: int, version: bytes, fields: dict[str, str]) -> tuple[int, bytes, bool]:
        """The body of the answer whose status line and headers were read, and whether to keep it."""
        while True:
            if not 100 <= status < 200:
                break
        if "chunked" in fields.get("transfer-encoding", "").lower():
            data, known = self._chunked(), True
        elif "content-length" in fields:
            try:
                length = int(fields["content-length"])
            except ValueError:
                raise _NotHttp from None
            data, known = self._exactly(length), True
        else:
            data, known = self._exactly(None), False  # until the server closes
        keep = known and version == b"HTTP/1.1" and fields.get("connection", "").lower() != "close"
        return status, data, keep

    def _head(self) -> tuple[int, bytes, dict[str, str]]:
        line = self.reader.readline(65537)
        if not line:
            raise ConnectionResetError("the server closed the connection")  # a stale keep-alive, usually
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _NotHttp
        fields: dict[str, str] = {}
        for _ in range(100):
            line = self.reader.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                return int(parts[1]), parts[0], fields
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        raise _NotHttp

    def _exactly(self, length: int | None) -> bytes:
        if length is not None and not 0 <= length <= MAX_RESPONSE_BYTES:
            raise _NotHttp
        data = self.reader.read(MAX_RESPONSE_BYTES + 1 if length is None else length)
        if length is None and len(data) > MAX_RESPONSE_BYTES:
            raise _NotHttp
        if length is not None and len(data) < length:
            raise ConnectionResetError("the server closed the connection mid-answer")
        return data

    def _chunked(self) -> bytes:
        data = bytearray()
        while True:
            size_line = self.reader.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _NotHttp from None
            if size == 0:
                while self.reader.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(data)
            if len(data) + size > MAX_RESPONSE_BYTES:
                raise _NotHttp
            data += self._exactly(size)
            self.reader.readline(3)  # the CRLF after each chunk

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# A file in one version's tree in an older app's store: <store>/trees/<version>-<digest>/<relative path>.
# Its own name says what it is, wherever the store is.
_TREE_PATH = re.compile(r'[^\s"\'(]*/(?:trees/\d+-[0-9a-f]{64}|[0-9a-f]{16}/w\d+/tree)/')


def map_traceback(text: str, project_root: str | None, store: str | None = None) -> str:
    """Point the source-tree paths in a server message or traceback at the developer's own files.

    Each process of the app has its tree at ``<runtime>/<store key>/w<slot>/tree/<relative
    path>`` (see ``overlay.cluster.registry``), recognisable by its name: a traceback from another
    worker is mapped as well as one from the worker that answered. Older apps had one tree,
    ``<store>/tree/`` (``tree`` alone could be any directory, ``sklearn/tree/``: mapped only when
    ``store``, from the app's status, is known), or per-version trees ``<store>/trees/<version>-<digest>/``.
    """
    if not project_root:
        return text  # no project to map onto (an operator's command outside any checkout)
    root = project_root.rstrip("/") + "/"
    if store:
        text = text.replace(store.rstrip("/") + "/tree/", root)
    return _TREE_PATH.sub(lambda _: root, text)
