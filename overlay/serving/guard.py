"""What an unauthenticated request may cost the app: a few hundred bytes, no slot, no disk.

Anyone who can reach the endpoint can send it requests, so before a body is read:

* **the claim is checked** (:func:`precheck`). A push names the keys it is signed by and its app
  in headers (``X-Habanero-Key: id[,id...]``, ``X-Habanero-App``; a control request names its
  signing key the same way): unless one of them is trusted here and the app id is this app's, the
  request is refused from its headers alone, before its body is read or an upload slot taken. The
  claim proves nothing: the signature over the whole body is still what lets a push in. A flood
  that copies a trusted key id into its headers still costs the app a full upload each and
  competes for the slots until its signature fails; :class:`UploadSlots` caps how many of them one
  peer address may hold at once.
* **a refusal of unverified bytes is counted, not recorded** (:class:`Refusals`): no history
  record, no fsync, no change to what ``status`` reports as the last failure; the log says how many
  there were, at most once a minute, and ``status`` says ``refused_unverified``.

Whatever such a request carries (key ids, app ids, peer addresses) reaches a message or the log
only through :func:`overlay.errors.printable`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping

from overlay.control import H_APP, H_KEY
from overlay.errors import (
    BadSignature,
    ControlRejected,
    HabaneroError,
    UntrustedKey,
    UploadFailed,
    WrongApp,
    printable,
    unverified,
)
from overlay.keys import TrustedKeys

__all__ = ["MAX_UPLOADS", "UPLOADS_PER_PEER", "Refusals", "UploadSlots", "claimed_keys", "precheck"]

log = logging.getLogger("overlay.http")

MAX_UPLOADS = 4  # bodies read at once; each is capped at Limits.max_bundle_bytes
UPLOADS_PER_PEER = MAX_UPLOADS - 1  # from one peer address: one never takes every slot
_MAX_CLAIMS = 8  # as many as a signature block holds
LOG_EVERY = 60.0  # seconds between two log lines about unverified refusals


def claimed_keys(headers: Mapping[str, str]) -> list[str]:
    """The key ids a request says it is signed by (``X-Habanero-Key``, comma-separated)."""
    return [kid.strip() for kid in headers.get(H_KEY, "").split(",")[:_MAX_CLAIMS] if kid.strip()]


def precheck(push: bool, headers: Mapping[str, str], trusted: TrustedKeys, app_id: str) -> None:
    """Refuse a request, from its headers alone, unless it claims a trusted key and this app."""
    with unverified():
        claimed = claimed_keys(headers)
        if not claimed:
            if push:
                raise BadSignature("this push names no signing key: a push sends the ids of the keys that "
                                   "signed it in X-Habanero-Key (habanero-pack does; upgrade an older one)",
                                   code="unsigned")
            raise ControlRejected("this request is not signed (missing X-Habanero-Key); use habanero-pack, "
                                  "which signs control requests with your deploy key", code="unsigned_request")
        if not any(kid in trusted for kid in claimed):
            shown = printable(", ".join(claimed), 300)
            if push:
                raise UntrustedKey(f"key {shown} is not trusted by this server; add its public key line (the "
                                   f"signing key's .pub file) to {trusted.source}, then restart the app",
                                   key_ids=[printable(kid, 128) for kid in claimed])
            raise ControlRejected(f"key {shown} is not trusted by this server; add its public key to "
                                  f"{trusted.source}", code="unknown_key")
        claimed_app = headers.get(H_APP)
        if claimed_app is not None and claimed_app != app_id:
            shown = printable(claimed_app, 128)
            message = (f"the signer's app id {shown!r} differs from the app's, {app_id!r}: push to the right "
                       f"app, or build with app id {app_id!r} (--app-id, HABANERO_APP_ID or app_id in "
                       "[tool.habanero])")
            if push:
                raise WrongApp(message, expected=app_id, got=shown)
            raise ControlRejected(message, code="wrong_app", expected=app_id, got=shown)


class UploadSlots:
    """At most ``total`` bodies read at once, ``per_peer`` of them from one peer address."""

    def __init__(self, total: int = MAX_UPLOADS, per_peer: int = UPLOADS_PER_PEER) -> None:
        self.total, self.per_peer = total, per_peer
        self._peers: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, peer: str) -> Iterator[None]:
        """One place to read a body in; ``too_many_uploads`` when none is free for this peer."""
        with self._lock:
            if sum(self._peers.values()) >= self.total:
                raise _busy(f"{self.total} uploads are already in progress; push again in a moment")
            if self._peers[peer] >= self.per_peer:
                raise _busy(f"{self.per_peer} uploads from {printable(peer, 64)} are already in progress; "
                            "push again in a moment")
            self._peers[peer] += 1
        try:
            yield
        finally:
            with self._lock:
                self._peers[peer] -= 1
                if self._peers[peer] <= 0:
                    del self._peers[peer]


def _busy(message: str) -> UploadFailed:
    exc = UploadFailed(message, code="too_many_uploads")
    exc.unverified = True
    return exc


class Refusals:
    """Refusals of unverified requests: counted, and logged at most once every ``LOG_EVERY`` seconds.

    What it holds is bounded whatever the flood: a count per error code (a fixed set) and the last
    peer's address."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self.total = 0
        self._window: Counter[str] = Counter()
        self._last_peer = ""
        self._logged_at: float | None = None
        self._lock = threading.Lock()

    def add(self, exc: HabaneroError, peer: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            self._window[exc.code] += 1
            self._last_peer = peer
            if self._logged_at is not None and now - self._logged_at < self.every:
                return
            window, self._window = self._window, Counter()
            self._logged_at = now
            last = self._last_peer
        count = sum(window.values())
        codes = ", ".join(f"{code} {n}" for code, n in window.most_common())
        log.warning("habanero: %d unverified request%s refused in the last minute (%s; the last from %s)",
                    count, "" if count == 1 else "s", codes, printable(last or "an unknown peer", 64))
