"""The store's state file: which version is active and the highest version ever accepted.

``state.json`` is the single source of truth and the commit point of every push and rollback::

    {"format": 1, "app_id": "shop", "active": {"version": 7, "digest": "<sha256>"} | null, "highest": 9}

While the active version is on probation (``install(probation=...)``), the file also names the last
permanent version, the one a restart boots (null: the code on disk), and says format 2, so that an
older habanero refuses it loudly instead of booting the probationary version::

    {"format": 2, ..., "permanent": {"version": 6, "digest": "<sha256>"} | null}

A file without ``permanent`` (every file an older habanero wrote) has its active version permanent.

It is replaced atomically (``fs.write_atomic``) and read in full on every check of a push, since
another process sharing the store may have committed meanwhile. Nothing in it is trusted blindly:
a file that is not exactly the shape written here reads as damaged, never as a state.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypedDict

from overlay.bundle import Bundle
from overlay.errors import StoreError
from overlay.format.manifest import is_sha256
from overlay.storage import fs

__all__ = ["STATE_FORMAT", "Pointer", "State", "StateFile", "pointer_to"]

STATE_FORMAT = 2
#: What a state without a probationary version is written as: any habanero reads it.
_PLAIN_FORMAT = 1
#: Far more than a state file holds: a planted huge file is not read whole.
MAX_STATE_BYTES = 1 << 16


class Pointer(TypedDict):
    """An active version, as in state.json."""

    version: int
    digest: str


class State(TypedDict, total=False):
    format: int
    app_id: str
    active: Pointer | None
    highest: int
    #: Only while the active version is on probation: the last permanent one (None: the code on disk).
    permanent: Pointer | None


def pointer_to(bundle: Bundle | None) -> Pointer | None:
    return None if bundle is None else {"version": bundle.version, "digest": bundle.digest}


class StateFile:
    """``state.json`` of one app's store."""

    def __init__(self, path: str, app_id: str) -> None:
        self.path = path
        self.app_id = app_id
        self._cache: tuple[bytes, State] | None = None  # the last bytes read, parsed

    def read(self) -> tuple[State | None, str]:
        """The state, or None and what is wrong with it (``"missing"``, ``"empty"``, ...).

        Bytes equal to the last read are not parsed and checked again. Raises ``StoreError`` for a
        state of another app or written by a newer habanero: serving from it would be wrong.
        """
        try:
            raw = fs.read_small(self.path, flags=os.O_NOFOLLOW | os.O_NONBLOCK, limit=MAX_STATE_BYTES, regular=True)
        except FileNotFoundError:
            return None, "missing"
        except OSError as exc:
            return None, f"unreadable ({exc.strerror})"
        cached = self._cache
        if cached is not None and cached[0] == raw:
            return _copy(cached[1]), ""
        state, why = fs.parse_json(raw)
        if why or not _valid(state):
            return None, why or "corrupt (not the shape of a state file)"
        if state["format"] > STATE_FORMAT:
            raise StoreError(f"{self.path} has format {state['format']}, written by a newer habanero; "
                             "upgrade habanero here or use another store directory", code="store_format")
        if state["app_id"] != self.app_id:
            raise StoreError(f"{self.path} belongs to app {state['app_id']!r}, not {self.app_id!r}; give "
                             "each app its own store directory", code="store_app_mismatch")
        self._cache = (raw, _copy(state))
        return state, ""

    def write(self, pointer: Pointer | None, highest: int, *, sync: bool = True,
              retire: list[str] | None = None, probation: tuple[Pointer | None] | None = None) -> None:
        """Replace the state (see ``fs.write_atomic`` for ``sync`` and ``retire``); ``probation``
        holds the last permanent version while ``pointer`` is on probation (None: it is permanent)."""
        state: dict[str, Any] = {"format": _PLAIN_FORMAT, "app_id": self.app_id, "active": pointer,
                                 "highest": highest}
        if probation is not None:
            state["format"], state["permanent"] = STATE_FORMAT, probation[0]
        data = json.dumps(state, indent=2, sort_keys=True).encode("ascii") + b"\n"
        fs.write_atomic(self.path, data, sync=sync, sync_dir=sync, retire=retire)

    def __repr__(self) -> str:
        return f"<StateFile {os.fspath(self.path)}>"


def _copy(state: State) -> State:
    copy: State = {"format": state["format"], "app_id": state["app_id"], "active": state["active"],
                   "highest": state["highest"]}
    if "permanent" in state:
        copy["permanent"] = state["permanent"]
    return copy


def _positive(value: Any) -> bool:
    return type(value) is int and value >= 1


def _valid(state: Any) -> bool:
    """The exact shape :meth:`StateFile.write` writes: a bit flip or a bad hand edit must not slip through."""
    if not isinstance(state, dict) or set(state) - {"permanent"} != {"format", "app_id", "active", "highest"}:
        return False
    return (_positive(state["format"]) and isinstance(state["app_id"], str)
            and ((state["highest"] == 0 and type(state["highest"]) is int) or _positive(state["highest"]))
            and _pointer(state["active"]) and _pointer(state.get("permanent")))


def _pointer(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and set(value) == {"version", "digest"}
                             and _positive(value["version"]) and isinstance(value["digest"], str)
                             and is_sha256(value["digest"]))
