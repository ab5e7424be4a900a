"""The signed control requests the app has taken, on disk: a captured one cannot be replayed.

A control request (rollback, status, history) is signed over a timestamp and a nonce and accepted
within ``WINDOW_SECONDS`` of the server's clock, once (see ``overlay.control``). "Once" must hold for
every process of the app and across restarts, so the nonces live in the store, in
``<store>/requests.jsonl``: one ``{"nonce", "expires"}`` line per request taken, read and appended
under the store's lock. Only nonces within their window matter: when expired lines outnumber the
live ones, the file is rewritten with the live ones alone (a temp file renamed into place), so it
holds about as many lines as requests were signed in the last window.

The file is appended without fsync under ``sync="background"`` (the store's worker flushes it after
the answer), like a push: a restart keeps it; a power cut within milliseconds of a request may not.
A store that is not safe to write (see ``Store.check_writable``) keeps the nonces in memory instead,
and says so.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from overlay.errors import StoreError
from overlay.storage import fs

__all__ = ["COMPACT_AT", "SeenRequests"]

logger = logging.getLogger("overlay.store")

#: Expired lines tolerated before the file is rewritten (and never fewer than the live ones).
COMPACT_AT = 256


class SeenRequests:
    """The nonces of control requests taken by any process of the store, until they expire.

    ``writable`` raises when the store must not be written; ``lock`` is the store's writers' lock;
    ``flush`` makes files durable later (``sync=False``).
    """

    def __init__(self, path: Path, lock: fs.FileLock, flush: Callable[[list[str]], None], *, sync: bool,
                 writable: Callable[[], None]) -> None:
        self.path = path
        self._lock = lock
        self._flush = flush  # the store worker's flush_later (a forked child gets a worker of its own)
        self._sync = sync
        self._writable = writable
        self._log = fs.RecordLog(path)
        self._memory: dict[str, float] = {}  # only when the store cannot be written

    def first_use(self, nonce: str, expires: float, now: float) -> bool:
        """Record ``nonce`` (valid until ``expires``); False if any process took it already."""
        with self._lock:
            try:
                self._writable()
            except StoreError as exc:
                fs.warn_unsafe(self.path, OSError(0, f"{exc.message}; control requests are remembered in this "
                                                     "process only, until it restarts"))
                return self._in_memory(nonce, expires, now)
            seen: dict[str, float] = {}
            for record in self._log.read():
                if isinstance(record.get("nonce"), str) and isinstance(record.get("expires"), (int, float)):
                    seen[record["nonce"]] = record["expires"]
            if seen.get(nonce, now - 1) >= now:
                return False
            live = {n: e for n, e in seen.items() if e >= now}
            with fs.os_errors_as_store_errors(self.path.parent, "record a control request"):
                if len(seen) - len(live) > max(COMPACT_AT, len(live)):
                    live[nonce] = expires
                    data = b"".join(json.dumps({"expires": e, "nonce": n}, sort_keys=True).encode() + b"\n"
                                    for n, e in live.items())
                    fs.write_atomic(self.path, data, sync=self._sync, sync_dir=self._sync)
                else:
                    fs.append_record(self.path, {"nonce": nonce, "expires": expires}, sync=self._sync)
            if not self._sync:
                self._flush([os.fspath(self.path)])
            return True

    def _in_memory(self, nonce: str, expires: float, now: float) -> bool:
        self._memory = {n: e for n, e in self._memory.items() if e >= now}
        if nonce in self._memory:
            return False
        self._memory[nonce] = expires
        return True
