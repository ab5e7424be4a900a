"""Retention: which bundles a store keeps, and the sweep of the objects only dropped ones used.

A store keeps its last ``keep`` bundles, the active one and the one before it (a rollback target),
whichever process made them active; the rest go after a commit, on the store's worker, once the push
has answered. A staged bundle that can no longer be committed goes too. Objects are shared between
versions, so they are not deleted with a bundle: once enough versions have gone (``sweep_every``),
the worker sweeps every object no stored or staged bundle, nor the active one, refers to. The sweep
reads the manifests outside the lock and deletes under it (``ObjectStore.sweep``), so a push staged
meanwhile keeps its objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from overlay.bundle import Bundle
from overlay.storage import fs
from overlay.storage.bundles import BundleFiles, short
from overlay.storage.state import Pointer, pointer_to
from overlay.storage.worker import Task

__all__ = ["Retention"]

logger = logging.getLogger("overlay.store")


class Retention:
    """Drops the bundles a store no longer keeps from ``files`` and sweeps their objects.

    ``lock`` is the store's writers' lock; ``writable`` raises when the store must not be written;
    ``active`` is the bundle this process serves now; ``later`` runs a task on the store's worker.
    """

    def __init__(self, files: BundleFiles, lock: fs.FileLock, *, sweep_every: int,
                 active: Callable[[], Bundle | None], writable: Callable[[], None],
                 later: Callable[[Task], None]) -> None:
        self.files, self._lock, self.sweep_every = files, lock, sweep_every
        self._active, self._writable, self._later = active, writable, later
        self._dropped_since_sweep = 0

    def prune(self, *, keep: int, on_disk: Pointer | None, highest: int) -> None:
        """Keep the last ``keep`` bundles, and for this process's active version and ``on_disk``
        (the state file's, when another process committed it) each one and the one before it; drop
        the rest, and the staged bundles at or below ``highest`` but ``on_disk``'s."""
        with self._lock, fs.os_errors_as_store_errors(self.files.root, "prune old versions"):
            self._writable()
            stored = self.files.stored()
            kept = set(stored[-keep:]) if keep else set()
            for p in filter(None, (pointer_to(self._active()), on_disk)):
                kept.add((p["version"], p["digest"]))  # ours, and the one on disk if another's
                kept.update([s for s in stored if s[0] < p["version"]][-1:])
            for version, digest in [s for s in stored if s not in kept]:
                logger.info("retention: removing v%d (%s)", version, short(digest))
                self._remove(version, digest)
            self.files.drop_stale_staged(highest, on_disk)  # stale: can never be committed as a push

    def drop_above(self, highest: int, *, keep: Pointer | None, reason: str) -> None:
        """Drop the stored bundles above ``highest`` (never to be pushed again), but ``keep``."""
        for version, digest in self.files.stored():
            if version > highest and keep != {"version": version, "digest": digest}:
                logger.warning("removed bundle v%d (%s): %s", version, short(digest), reason)
                self._remove(version, digest)

    def sweep(self) -> None:
        """Delete the objects that no stored or staged bundle, nor the active one, refers to."""
        active = self._active()
        self._writable()
        self.files.objects.sweep(self.files.paths, keep=active.by_hash if active is not None else ())

    def _remove(self, version: int, digest: str) -> None:
        self.files.remove(version, digest)
        self._dropped(1)

    def _dropped(self, count: int) -> None:
        """``count`` versions were dropped: sweep their objects once enough have gone."""
        self._dropped_since_sweep += count
        if self._dropped_since_sweep >= self.sweep_every:
            self._dropped_since_sweep = 0
            self._later(self.sweep)
