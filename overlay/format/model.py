"""What an opened bundle is in memory, and what a delta is built against.

:class:`Bundle` is only ever made by ``overlay.bundle.open_bundle``, after every check held: its
manifest was signed by a trusted key, its entries' bodies have their sizes and hashes.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any

from overlay.errors import StoreError
from overlay.format.manifest import ENTRY_JSON, Entry, EntryTable
from overlay.format.proof import Spans, spans_of

__all__ = ["Bodies", "BodyReader", "Bundle", "ContentLookup", "ParentManifest"]

ContentLookup = Callable[[str], "bytes | None"]  # sha256 -> an entry body the server already holds
#: An entry -> its body, read back from where the store keeps it and checked against the entry's
#: size and sha256 (None: it is nowhere to be found intact).
BodyReader = Callable[[Entry], "bytes | None"]
_SHA256 = itemgetter(3)  # of an Entry


class _Unknown(enum.Enum):
    SPANS = enum.auto()


#: Spans not worked out yet (None is an answer: "not canonical"). An enum member, so that the type
#: checker can tell it from a real answer after an ``is`` test.
UNKNOWN_SPANS = _Unknown.SPANS


class Bodies(Mapping[str, bytes]):
    """A bundle's entry bodies by name: in memory while the bundle is being deployed, read back
    from the store once it is committed.

    Every process of an app holds its active bundle for as long as it runs, and most of its
    bodies are never read again: modules compile once (and the code cache serves restarts), data
    files are read from the source tree. Keeping them all would cost each worker the app's whole
    source in memory. After :meth:`spill` a body is read when asked for, by a reader that checks
    it against its entry's hash. Bodies still :meth:`held` are shared with the next version, whose
    push then reads nothing it did not change.
    """

    __slots__ = ("_entries", "_held", "_reader")

    def __init__(self, entries: Mapping[str, Entry], held: dict[str, bytes], reader: BodyReader | None = None) -> None:
        self._entries = entries
        self._held = held
        self._reader = reader

    def held(self, name: str) -> bytes | None:
        """The body of ``name`` if it is in memory (it never reads)."""
        return self._held.get(name)

    def held_copy(self) -> dict[str, bytes]:
        """The bodies in memory, as a new dict (the next version's, to share)."""
        return dict(self._held)

    @property
    def reader(self) -> BodyReader | None:
        return self._reader

    def __getitem__(self, name: str) -> bytes:
        body = self._held.get(name)
        if body is not None:
            return body
        entry = self._entries[name]  # KeyError: not an entry of this bundle
        body = self._reader(entry) if self._reader is not None else None
        if body is None:
            raise StoreError(f"the body of {name!r} (sha256 {entry.sha256[:12]}) is no longer in the store "
                             "or its bundle file; push the app again to restore it", code="store_error")
        return body

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def spill(self, reader: BodyReader) -> None:
        """Let go of the bodies in memory: from now on ``reader`` fetches each one when asked."""
        self._reader = reader
        self._held = {}


class Bundle:
    """A verified, decompressed bundle. ``digest`` (sha256 of the manifest) names it.

    ``manifest`` holds the manifest's top-level fields; its entry table is ``entries``, and each
    entry's body is in ``bodies`` (a :class:`Bodies`): one bytes object per entry while the bundle
    is being deployed, so a push shares the bodies it did not change with the bundle it was opened
    against instead of copying a whole snapshot; once committed (:meth:`release`) they are read back
    from the store when asked for, and ``raw``, the file's bytes, is let go too. Opened
    against a ``base`` it may also carry ``changed_from``: ``(base digest, names added, names
    changed)`` when nothing was removed, what ``overlay.transaction.diff`` would otherwise find by a
    pass over every entry.
    """

    def __init__(self, manifest: dict[str, Any], manifest_bytes: bytes, raw: bytes, key_ids: tuple[str, ...],
                 entries: dict[str, Entry], bodies: Mapping[str, bytes], *, digest: str | None = None,
                 table: EntryTable | None = None, spans: Spans | _Unknown | None = UNKNOWN_SPANS,
                 changed_from: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None,
                 reader: BodyReader | None = None) -> None:
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self._raw: bytes | None = raw
        self.size = len(raw)
        self.key_ids = key_ids
        self.entries = entries
        if isinstance(bodies, Bodies):  # another bundle's: the same bodies, keyed by these entries
            self.bodies = Bodies(entries, bodies._held, reader or bodies.reader)
        else:
            self.bodies = Bodies(entries, bodies if isinstance(bodies, dict) else dict(bodies), reader)
        self.digest = digest if digest is not None else hashlib.sha256(manifest_bytes).hexdigest()
        self.changed_from = changed_from
        self._table = table
        self._spans = spans

    @property
    def raw(self) -> bytes:
        """The bundle file's bytes (a delta's unpacked form), until :meth:`release`."""
        if self._raw is None:
            raise RuntimeError(f"{self!r} was committed and released; read it from the store")
        return self._raw

    def release(self, reader: BodyReader) -> None:
        """The store holds this bundle now: free its file's bytes and its bodies (see :class:`Bodies`)."""
        self._raw = None
        self.bodies.spill(reader)

    @property
    def format(self) -> int:
        return int(self.manifest["format"])

    @property
    def table(self) -> EntryTable:
        """The entries as columns, which the next push is checked against."""
        if self._table is None:
            self._table = EntryTable.of(list(self.entries.values()))
        return self._table

    @property
    def spans(self) -> Spans | None:
        """Where each entry's JSON is in the manifest, for proving the next push (see
        ``overlay.format.proof``); None when the manifest is not the canonical text of its values."""
        if self._spans is UNKNOWN_SPANS:
            self._spans = None
            if self.format != 1:
                table = self.table
                texts = list(map(ENTRY_JSON, table.kinds, table.names, table.hashes, table.sizes))
                self._spans = spans_of(self.manifest_bytes, self.manifest, texts)
        return self._spans

    @spans.setter
    def spans(self, value: Spans | None) -> None:
        self._spans = value

    @cached_property
    def hashes(self) -> dict[str, str]:
        """Each entry's sha256 by name; computed once, as the active bundle meets every push."""
        return dict(zip(self.entries, map(_SHA256, self.entries.values())))

    @cached_property
    def by_hash(self) -> dict[str, Entry]:
        """The first entry holding each body, by sha256: where a delta's unchanged bodies come from.

        Every body here was hashed when the bundle was opened, so a body found here is known good.
        """
        entries = list(self.entries.values())[::-1]  # reversed: of equal hashes, the first stays
        return dict(zip(map(_SHA256, entries), entries))

    @property
    def app_id(self) -> str:
        return str(self.manifest["app_id"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def parent(self) -> str | None:
        parent = self.manifest["parent"]
        return None if parent is None else str(parent)

    def read(self, name: str) -> bytes:
        return self.bodies[name]

    def summary(self) -> dict[str, Any]:
        """What status pages and the CLI show about a bundle."""
        m = self.manifest
        return {
            "app_id": m["app_id"],
            "version": m["version"],
            "digest": self.digest,
            "parent": m["parent"],
            "created": m["created"],
            "builder": m["builder"],
            "entries": len(self.entries),
            "size": self.size,
            "uncompressed_size": m["payload"]["uncompressed_size"],
            "key_ids": list(self.key_ids),
        }

    def __repr__(self) -> str:
        return f"<Bundle {self.app_id} v{self.version} {self.digest[:12]}: {len(self.entries)} entries>"


@dataclass(frozen=True)
class ParentManifest:
    """What a delta is built against: the server's active bundle, known by its manifest."""

    digest: str
    manifest_bytes: bytes
    hashes: frozenset[str]

    @classmethod
    def from_manifest(cls, manifest_bytes: bytes) -> ParentManifest:
        """From a manifest this side built or verified earlier (trusted input)."""
        entries = json.loads(manifest_bytes)["entries"]
        return cls(hashlib.sha256(manifest_bytes).hexdigest(), bytes(manifest_bytes),
                   frozenset(e["sha256"] for e in entries))
