"""The store's objects: every body of every stored version, once, by content.

``objects/<sha256[:2]>/<sha256>``, read-only. Stored delta bundles take the entries they do not
carry from here, and source trees hard-link to them. Objects of new pushes are written without
fsync under ``sync="background"`` and flushed by the worker right after the push has answered
(see ``overlay.store``); a power cut before that makes the store fall back to the newest version
whose bodies verify.

Unreferenced objects (of versions retention dropped) are swept by the worker, never on a push's
path and never while the app starts: until then they only take disk space.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable

from overlay.bundle import Bundle, manifest_bytes_of
from overlay.errors import StoreError, UnknownFormat
from overlay.format.manifest import is_sha256
from overlay.storage import fs

__all__ = ["ObjectStore"]

_SHA256_FIELD = re.compile(rb'"sha256":"([0-9a-f]{64})"')


class ObjectStore:
    """Bodies by sha256 under ``root``; writers hold the store's ``lock``."""

    def __init__(self, root: str, lock: fs.FileLock) -> None:
        self.root = root
        self._lock = lock
        #: Set when the store is not safe to write: what to raise instead of writing.
        self.refuse: Callable[[str], Exception] | None = None

    def get(self, sha256: str, size: int | None = None) -> bytes | None:
        """A body this store holds (for delta bundles), or None. Its hash is checked by the reader.

        With ``size``, no more than one byte past it is read: a planted huge file (or a link to
        ``/dev/zero``) costs nothing; links are not followed either way.
        """
        if not is_sha256(sha256):
            return None
        try:
            return fs.read_small(self.path(sha256), flags=os.O_NOFOLLOW, limit=None if size is None else size + 1)
        except OSError:
            return None

    def path(self, sha256: str) -> str:
        return os.path.join(self.root, sha256[:2], sha256)

    def write_missing(self, bundle: Bundle, known: Bundle | None, names: Iterable[str] | None = None, *,
                      sync: bool) -> list[str]:
        """Store the bodies of ``bundle`` this store does not hold yet; return the files written.

        ``known`` is a bundle whose objects are all stored (the active one): its hashes are skipped
        without a look at the disk, so a push writes only what it changed. ``names``, when given,
        are the only entries that can differ from ``known`` (the push's diff).
        """
        # Given the diff, the few entries it names are looked up on disk; otherwise every entry is
        # checked against known's bodies first (building that index costs a pass over them).
        held = known.by_hash if known is not None and names is None else {}
        written: list[str] = []
        entries = bundle.entries
        for entry in (entries.values() if names is None or known is None else
                      (entries[n] for n in names if n in entries)):
            sha256 = entry.sha256
            if sha256 in held:
                continue
            path = self.path(sha256)
            try:
                st = os.lstat(path)  # a link is replaced, never taken for the object
                if stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
                    continue
            except FileNotFoundError:
                pass
            self.put(path, bundle.read(entry.name), sync=sync)
            written.append(path)
        return written

    def put(self, path: str, body: bytes, *, sync: bool) -> None:
        """Write one object, read-only. Preallocated: objects are hashed where they are used (see
        ``fs.write_atomic``). Never into a directory that is a symbolic link (``store_unsafe``). With
        ``sync``, a shard directory made for it is made durable in ``objects/`` too: the caller fsyncs
        the shards, which keeps their entries, not their names."""
        shard = os.path.dirname(path)
        problem = fs.unsafe_entry(shard, directory=True)
        if problem is None:
            try:
                os.mkdir(shard, 0o700)
            except FileExistsError:
                pass
            else:
                if sync:
                    fs.fsync_dir(os.path.dirname(shard))
            problem = fs.unsafe_entry(shard, directory=True)
        if problem is not None or self.refuse is not None:
            refuse = self.refuse or _refusal
            raise refuse(problem or "it was found unsafe when it was opened")
        fs.write_atomic(path, body, mode=0o444, sync=sync, sync_dir=False, preallocate=True)

    def sweep(self, bundle_files: Callable[[], list[str]], keep: Iterable[str] = ()) -> None:
        """Delete objects no stored or staged bundle (``bundle_files()``) refers to, nor ``keep``.

        The manifests are read outside the store lock (milliseconds per bundle); under the lock,
        bundles that appeared meanwhile are read too, so an object a push has just staged (stage
        writes objects and its bundle under one hold of the lock) is never taken. Only the hashes
        of objects on disk are collected (the worker runs this in every app process: it must not
        leave its memory behind).
        """
        candidates = {(sub.name, entry.name) for sub in _scandir(self.root)
                      if sub.is_dir(follow_symlinks=False) and not sub.name.startswith(fs.TMP_PREFIX)
                      for entry in _scandir(sub.path)}
        on_disk = {name for _, name in candidates}
        referenced: set[str] = set(keep) & on_disk
        seen: set[str] = set()
        for path in bundle_files():
            seen.add(path)
            referenced |= _hashes_in(path, on_disk)
        with self._lock:
            for path in bundle_files():
                if path not in seen:
                    referenced |= _hashes_in(path, on_disk)
            for shard, name in candidates:
                if name not in referenced:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.root, shard, name))


def _refusal(problem: str) -> StoreError:
    return StoreError(f"cannot write an object of the store: {problem}; habanero never writes through a symbolic "
                      "link or into a file it did not create in its store: check who put it there and remove it",
                      code="store_unsafe")


def _hashes_in(path: str, among: set[str]) -> set[str]:
    """The hashes of ``among`` that a stored bundle's manifest names (unverified: only used to keep
    objects). Matched in the bytes: parsing 1,000 entries per bundle would cost far more."""
    try:
        with open(path, "rb") as fh:
            manifest = manifest_bytes_of(fh.read())
    except (OSError, UnknownFormat):
        return set()
    return {h for m in _SHA256_FIELD.finditer(manifest) if (h := m[1].decode()) in among}


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []
