"""The store's history: ``history.jsonl``, one JSON object per push, rollback, revert, probation
verdict, failure or reset of the highest version; append-only.

Appends are serialised by the store's writers' lock (a torn last line, which a crash may leave, is
skipped by readers, see ``fs.append_record``); reads take no lock and parse only what was appended
since the last read (``fs.RecordLog``), so a status page stays cheap however long the history grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from overlay.storage import fs

__all__ = ["ACTIONS", "History"]

#: The actions that make a version active (revert: probation's rollback to the last permanent version).
ACTIONS = ("push", "rollback", "revert")


class History:
    """``history.jsonl`` at ``path``; writers hold the store's lock."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._log = fs.RecordLog(Path(path))  # read incrementally

    def append(self, action: str, version: int | None, digest: str | None, key_ids: Sequence[str],
               outcome: str, code: str | None, reason: str, *, sync: bool = True) -> None:
        """Append one entry, stamped with the time now (UTC, milliseconds)."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fs.append_record(self.path, {
            "time": now, "action": action, "version": version, "digest": digest,
            "key_ids": list(key_ids), "outcome": outcome, "code": code, "reason": reason}, sync=sync)

    def read(self, limit: int | None = None) -> list[dict[str, Any]]:
        """History entries, oldest first (only the last ``limit``); a torn line is skipped."""
        entries = self._log.read()
        return entries if limit is None else entries[-limit:] if limit > 0 else []

