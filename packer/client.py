"""A small client for an app's ``/_habanero/`` endpoint, on the standard library's ``http.client``.

The CLI's whole run (interpreter start included) is on the save-to-live path, so this avoids
importing aiohttp and keeps one keep-alive connection for the status / push / status-again dance.
Every failure becomes one ``RemoteError`` whose message says what to check.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from overlay.control import sign_request
from overlay.errors import HabaneroError
from overlay.keys import SigningKey

PREFIX = "/_habanero"


class RemoteError(HabaneroError):
    """The server refused, failed, or could not be reached. ``status`` is the HTTP status or 0."""

    def __init__(self, message: str, *, code: str, status: int = 0, remote_traceback: str = "",
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.remote_traceback = remote_traceback
        self.body = body or {}


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
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            ep = self.endpoint
            if ep.scheme == "https":
                context = ssl.create_default_context(cafile=self.ca_file)
                self._conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=self.timeout, context=context)
            else:
                self._conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, route: str, body: bytes = b"", *, signed: bool = True,
                content_type: str = "application/json") -> dict[str, Any]:
        path = f"{self.endpoint.base}{PREFIX}/{route}"
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if signed and self.key is not None:
            # The server mounts the routes at /_habanero, whatever the base path in front of it.
            headers.update(sign_request(self.key, method, f"{PREFIX}/{route.partition('?')[0]}",
                                        self.app_id, body))
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(method, path, body=body or None, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if not reused or attempt == 2:  # only a stale keep-alive connection earns a retry
                    raise self._unreachable(exc) from None
            except ssl.SSLError as exc:
                self.close()
                raise RemoteError(f"TLS with {self.endpoint} failed: {exc.reason or exc}; pass the server's "
                                  "CA with --ca-file", code="tls_error") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise self._unreachable(exc) from None
        return self._decode(response.status, raw)

    def _unreachable(self, exc: BaseException) -> RemoteError:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else (
            "timed out" if isinstance(exc, (socket.timeout, TimeoutError)) else str(exc) or type(exc).__name__)
        return RemoteError(f"cannot reach {self.endpoint}: {reason}; is the app running with "
                           "overlay.install(listen=...) or app=..., and is the URL right?", code="unreachable")

    def _decode(self, status: int, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict) or (status >= 400 and "code" not in body):
            raise RemoteError(f"{self.endpoint} answered HTTP {status} but is not a habanero endpoint; "
                              "check the URL (the app's base URL; habanero adds /_habanero/...)",
                              code="not_habanero", status=status)
        if status >= 400:
            raise RemoteError(body.get("message", f"HTTP {status}"), code=body["code"], status=status,
                              remote_traceback=body.get("remote_traceback", ""), body=body)
        return body

    def status(self) -> dict[str, Any]:
        return self.request("GET", "status")

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.request("GET", f"history?limit={int(limit)}")["history"]

    def push(self, data: bytes) -> dict[str, Any]:
        return self.request("POST", "push", data, signed=False, content_type="application/octet-stream")

    def rollback(self, to: int | None = None, expect: int | None = None) -> dict[str, Any]:
        body = json.dumps({"to": to, "expect": expect}).encode()
        return self.request("POST", "rollback", body)


# A file in one version's tree in the app's store: <store>/trees/<version>-<digest>/<relative path>
_TREE_PATH = re.compile(r'[^\s"\'(]*/trees/\d+-[0-9a-f]{64}/')


def map_traceback(text: str, project_root: str) -> str:
    """Point the bundle-tree paths in a server message or traceback at the developer's own files."""
    root = project_root.rstrip("/")
    return _TREE_PATH.sub(lambda _: f"{root}/", text)
