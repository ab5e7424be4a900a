"""Signed control requests (rollback, status, history), verified with the deploy keys.

A push is authenticated by the bundle's own signature. Everything else that reaches the endpoint is
signed by the client over a domain-prefixed string of method, path, app id, timestamp, nonce and the
body's sha256, so a captured request cannot be retargeted (another path, app or body), is accepted
only within a few minutes of the server's clock, and only once: the app's store keeps the nonces
of the requests taken within that window on disk, for every process of the app and across restarts
(``overlay.storage.requests``). The domain prefix means no control signature can ever verify as a
bundle signature, or the other way round. A rollback also names the version it expects to be
active, so a replay to another app sharing nothing with this one's store changes nothing either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

from overlay.errors import ControlRejected, printable, unverified
from overlay.keys import SigningKey, TrustedKeys

__all__ = ["Nonces", "RequestVerifier", "sign_request"]

#: Where the control routes live, under the app's own URL or habanero's own server.
PREFIX = "/_habanero"
CONTROL_DOMAIN = b"habanero-control-v1\x00"
WINDOW_SECONDS = 300
H_KEY, H_TIME, H_NONCE, H_SIG = ("X-Habanero-Key", "X-Habanero-Timestamp", "X-Habanero-Nonce",
                                 "X-Habanero-Signature")
#: The app id the client signed for, in clear: the signature covers it already; this header only
#: lets a refusal say which two app ids differ.
H_APP = "X-Habanero-App"


def control_message(method: str, path: str, app_id: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    fields = [method.upper(), path, app_id, timestamp, nonce, hashlib.sha256(body).hexdigest()]
    return CONTROL_DOMAIN + "\n".join(fields).encode("utf-8")


def sign_request(key: SigningKey, method: str, path: str, app_id: str, body: bytes = b"",
                 *, now: float | None = None) -> dict[str, str]:
    """The headers that authenticate one control request."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = os.urandom(16).hex()
    signature = key.sign(control_message(method, path, app_id, timestamp, nonce, body))
    return {H_KEY: key.key_id, H_TIME: timestamp, H_NONCE: nonce, H_APP: app_id,
            H_SIG: base64.b64encode(signature).decode("ascii")}


class Nonces(Protocol):
    """Where the nonces of taken requests are kept: ``first_use`` records one (valid until
    ``expires``) and says whether it is new. The app's store keeps them on disk for every process
    (``overlay.storage.requests``); by default, this process's memory."""

    def first_use(self, nonce: str, expires: float, now: float) -> bool: ...


class RequestVerifier:
    """Checks control-request signatures, the clock window and nonce reuse (in ``nonces``)."""

    def __init__(self, trusted: TrustedKeys, app_id: str, *, window: int = WINDOW_SECONDS,
                 max_nonces: int = 100_000, nonces: Nonces | None = None) -> None:
        self.trusted, self.app_id, self.window = trusted, app_id, window
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._max_nonces = max_nonces
        self._lock = threading.Lock()
        self._store = nonces

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
               *, now: float | None = None) -> str:
        """Return the key id that signed the request, or raise ``ControlRejected``."""
        now = time.time() if now is None else now
        with unverified():  # until the signature holds, a refusal is of anyone's request
            key_id, stamp_value, nonce = self._signed_by(method, path, headers, body)
        if abs(now - stamp_value) > self.window:
            raise ControlRejected(
                f"request timestamp is {int(now - stamp_value)} s away from the server's clock (window "
                f"±{self.window} s); check both clocks and retry", code="stale_request")
        self._remember(nonce, stamp_value, now)
        return key_id

    def _signed_by(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[str, int, str]:
        """The key id, timestamp and nonce of a request whose signature holds."""
        missing = [h for h in (H_KEY, H_TIME, H_NONCE, H_SIG) if not headers.get(h)]
        if missing:
            raise ControlRejected(
                f"this request is not signed (missing {', '.join(missing)}); use habanero-pack, "
                "which signs control requests with your deploy key", code="unsigned_request")
        claimed = headers.get(H_APP)
        if claimed is not None and claimed != self.app_id:
            raise ControlRejected(
                f"the signer's app id {claimed[:128]!r} differs from the app's, {self.app_id!r}: this request "
                f"was signed for another app; pass --app-id {self.app_id} (or set HABANERO_APP_ID or app_id "
                "in [tool.habanero])", code="wrong_app", expected=self.app_id, got=claimed[:128])
        key_id, stamp, nonce = headers[H_KEY], headers[H_TIME], headers[H_NONCE]
        public = self.trusted.get(key_id)
        if public is None:
            raise ControlRejected(f"key {printable(key_id, 128)} is not trusted by this server; add its public key to "
                                  f"{self.trusted.source}", code="unknown_key")
        try:
            signature = base64.b64decode(headers[H_SIG], validate=True)
            stamp_value = int(stamp)
        except (binascii.Error, ValueError):
            raise ControlRejected("malformed request signature headers", code="bad_request_signature") from None
        if len(nonce) > 128:
            raise ControlRejected("request nonce is too long", code="bad_request_signature")
        message = control_message(method, path, self.app_id, stamp, nonce, body)
        if not public.verify(signature, message):
            raise ControlRejected(
                "request signature does not verify: it was altered, signed for another app or path, "
                "or by another key", code="bad_request_signature")
        return key_id, stamp_value, nonce

    def _remember(self, nonce: str, stamp: int, now: float) -> None:
        if self._store is not None:
            if not self._store.first_use(nonce, max(stamp, now) + self.window, now):
                raise ControlRejected("this request was already used (replayed nonce); sign a new one",
                                      code="replayed_request")
            return
        with self._lock:
            while self._nonces:
                oldest, expiry = next(iter(self._nonces.items()))
                if expiry >= now and len(self._nonces) < self._max_nonces:
                    break
                del self._nonces[oldest]
            if nonce in self._nonces:
                raise ControlRejected("this request was already used (replayed nonce); sign a new one",
                                      code="replayed_request")
            self._nonces[nonce] = max(stamp, now) + self.window
