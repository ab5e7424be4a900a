"""Watch mode's bundle writer: a push re-hashes and re-encodes only the entries that changed.

A one-line save in a 1,000-module project changes one entry, yet ``overlay.bundle.build_bundle``
hashes every body and builds, checks and encodes 1,000 entry dicts (5-8 ms), and
``overlay.bundle.pack`` digests the base's 160 KB manifest into a zstd dictionary (0.5 ms) each
time. :class:`WarmBuilder` keeps, per entry, its sha256 and its canonical JSON, a payload
compressor, and a manifest compressor for the base of the next push, prepared while the watch waits
for a save.

It writes the bundle ``build_bundle`` writes, byte for byte (``tests/test_packer.py`` holds it to
that), and a packed form that the server unpacks into that bundle. What it does not rebuild it
does not re-check either: the whole manifest goes through ``check_new_manifest`` when names or kinds
change (and on the first build); in between, names and order hold by construction and only sizes
can change, which are checked against the limits on every build.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from itertools import compress
from operator import attrgetter, not_
from typing import Any, NamedTuple

import zstandard

from overlay.bundle import (
    DEFAULT_LIMITS,
    FORMAT,
    Limits,
    ParentManifest,
    check_new_manifest,
    entry_json,
    manifest_compressor,
    pack,
    sign_bundle,
    write_manifest,
)
from overlay.errors import TooLarge
from overlay.keys import SigningKey

from .build import BuiltBundle, source_line, sources_digest

__all__ = ["WarmBuilder"]

Entries = Mapping[str, tuple[str, bytes]]  # {name: (kind, content)}, sorted by name
PACK_LEVEL = 3  # the manifest against its base: overlay.bundle.pack's default
_SIZE, _SHA256, _TEXT = (attrgetter(f) for f in ("size", "sha256", "text"))


class _Row(NamedTuple):
    """One entry as the last build wrote it."""

    kind: str
    content: bytes
    size: int
    sha256: str
    text: str  # its canonical JSON in the manifest
    line: str  # its line in the sources digest


def _row(name: str, kind: str, content: bytes) -> _Row:
    sha = hashlib.sha256(content).hexdigest()
    return _Row(kind, content, len(content), sha, entry_json(kind, name, sha, len(content)),
                source_line(kind, name, sha))


class WarmBuilder:
    """Builds bundle after bundle of one project for one signer, redoing only what changed.

    Example::

        warm = WarmBuilder(config.app_id, key, level=1)
        built, wire = warm.make(snapshot.files(), builder, version=8, parent=base.digest, base=base)
    """

    def __init__(self, app_id: str, signer: SigningKey, *, level: int, limits: Limits = DEFAULT_LIMITS) -> None:
        self.app_id, self.signer, self.limits = app_id, signer, limits
        self._payload = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._rows: dict[str, _Row] = {}
        self._files: dict[str, tuple[str, bytes]] | None = None  # what _rows were made from
        self._sources: str | None = None
        self._unchecked = True  # names or kinds changed since check_new_manifest last passed them
        self._packer: tuple[str, zstandard.ZstdCompressor] | None = None  # for this base digest

    def sources(self, files: Entries) -> str:
        """A digest of the entry table (kind, name, sha256 of each), for the builder's ``sources``."""
        self._update(files)
        if self._sources is None:
            self._sources = sources_digest(r.line for r in self._rows.values())
        return self._sources

    def make(self, files: Entries, builder: Mapping[str, Any] | None, *, version: int, parent: str | None,
             base: ParentManifest | None = None, created: str | None = None) -> tuple[BuiltBundle, bytes]:
        """The signed bundle, and what goes on the wire: packed against ``base`` when given."""
        built = self.build(files, builder, version=version, parent=parent, base=base, created=created)
        return built, (self.pack(built, base) if base is not None else built.data)

    def build(self, files: Entries, builder: Mapping[str, Any] | None, *, version: int, parent: str | None,
              base: ParentManifest | None = None, created: str | None = None) -> BuiltBundle:
        """What ``packer.build.build`` makes of ``files``; a delta carrying what ``base`` lacks."""
        start = time.perf_counter()
        self._update(files)
        names, rows, limits = list(self._rows), list(self._rows.values()), self.limits
        total = sum(map(_SIZE, rows))
        if len(rows) > limits.max_entries:
            raise TooLarge(f"bundle has {len(rows)} entries, over the {limits.max_entries} limit",
                           code="too_many_entries")
        if total > limits.max_total_bytes:
            raise TooLarge(f"bundle unpacks to {total} bytes, over the {limits.max_total_bytes} byte limit",
                           code="decompressed_too_large")
        carried: Iterable[int] = range(len(rows))
        if base is not None:  # the entries whose bodies base lacks
            carried = list(compress(carried, map(not_, map(base.hashes.__contains__, map(_SHA256, rows)))))
        frame = self._payload.compress(b"".join([rows[i].content for i in carried]))
        payload: dict[str, Any] = {"codec": "zstd", "size": len(frame), "uncompressed_size": total,
                                   "sha256": hashlib.sha256(frame).hexdigest()}
        if base is not None:
            parent = base.digest
            payload.update(codec="zstd-delta", included=[names[i] for i in carried])
        manifest = {"format": FORMAT, "app_id": self.app_id, "version": version, "parent": parent,
                    "created": created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "builder": dict(builder or {}), "payload": payload}
        if self._unchecked:  # never write what a server would refuse
            entries = [{"name": n, "kind": r.kind, "size": r.size, "sha256": r.sha256} for n, r in zip(names, rows)]
            check_new_manifest({**manifest, "entries": entries}, limits)
            self._unchecked = False
        manifest_bytes = write_manifest(manifest, map(_TEXT, rows))
        digest = hashlib.sha256(manifest_bytes).digest()  # signed, and the bundle's name
        data = sign_bundle(manifest_bytes, frame, [self.signer], limits, digest)
        ms = round((time.perf_counter() - start) * 1000, 2)
        return BuiltBundle(data=data, manifest_bytes=manifest_bytes, digest=digest.hex(),
                           version=version, entries=len(rows), size=len(data), uncompressed_size=total,
                           key_id=self.signer.key_id,
                           timings={"collect": 0.0, "metadata": 0.0, "bundle": ms, "total": ms},
                           sources=(builder or {}).get("sources"))

    def pack(self, built: BuiltBundle, base: ParentManifest) -> bytes:
        """The transport form of ``built`` for a server running ``base`` (see ``overlay.bundle.pack``)."""
        return pack(built.data, base, [self.signer], compressor=self._compressor(base))

    def prepare(self, base: ParentManifest) -> None:
        """Digest ``base``'s manifest into the dictionary the next push is packed with, ahead of time."""
        self._compressor(base)

    def _compressor(self, base: ParentManifest) -> zstandard.ZstdCompressor:
        if self._packer is None or self._packer[0] != base.digest:
            self._packer = (base.digest, manifest_compressor(base, level=PACK_LEVEL))
        return self._packer[1]

    def _update(self, files: Entries) -> None:
        """Bring the rows up to ``files``: new rows for new or changed entries, the rest kept."""
        previous, old = self._files, self._rows
        if previous is not None and previous.keys() == files.keys():
            # Same names: an entry that is the same tuple as last time is unchanged (SourceSnapshot
            # keeps the tuples of what a refresh did not change), so only the others are compared.
            rows = dict(old)
            suspects = [name for name, entry in files.items() if previous[name] is not entry]
        else:
            rows = {name: old.get(name) for name in sorted(files)}  # type: ignore[misc]  # filled below
            suspects = list(rows)
            self._unchecked = True  # names came or went
        limit = self.limits.max_entry_bytes
        for name in suspects:
            kind, content = files[name]
            row = rows[name]
            if row is not None and row.kind == kind and (row.content is content or row.content == content):
                continue
            if len(content) > limit:
                raise TooLarge(f"entry {name!r} is {len(content)} bytes, over the {limit} byte limit",
                               code="entry_too_large", name=name)
            self._unchecked = self._unchecked or row is None or row.kind != kind
            rows[name] = _row(name, kind, bytes(content))
            self._sources = None
        if rows.keys() != old.keys():
            self._sources = None
        self._rows, self._files = rows, dict(files)
