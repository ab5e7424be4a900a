"""The store's per-version source trees: building, sharing, checking and deleting them.

A tree lays one version out as real read-only files (``trees/<version>-<digest>/<entry path>``),
so ``__file__``, ``Path(__file__).parent / "templates"``, tracebacks and ``importlib.resources``
see exactly that version. Bodies live once in ``objects/`` and are hard-linked in; directories a new
version shares with the active one are symlinks into its tree, and a tree stays while another links
into it. Trees are derived data: not fsynced, checked against the bundle when the store opens, and
deleted after a push has answered, by a worker thread.

``TreesMixin`` is part of :class:`overlay.store.Store`; it uses the store's paths, lock and state.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from pathlib import Path

from . import _fsutil
from ._manifest import is_sha256
from .bundle import Bundle
from .errors import StoreError

logger = logging.getLogger("overlay.store")


def _stem(version: int, digest: str) -> str:
    return f"{version:010d}-{digest}"


class TreesMixin:
    """Tree methods of ``Store`` (see the module docstring)."""

    _trees: Path
    _objects: Path
    _bundles: Path
    _staged: Path
    active: Bundle | None
    path: Path

    def _init_trees(self) -> None:
        self._doomed: list[Path] = []  # trees taken away by retention, deleted in the background
        self._cleaner: threading.Thread | None = None
        self._cleanup: queue.Queue[list[Path] | None] = queue.Queue()
        self._dir_digests: dict[str, dict[str, str]] = {}  # of the active tree, for sharing
        self._tree_links: dict[str, frozenset[str]] = {}  # tree name -> trees it links into

    def _stop_cleaner(self) -> None:
        self.settle()
        if self._cleaner is not None and self._cleaner.is_alive():
            self._cleanup.put(None)
            self._cleaner.join()

    def _linked_trees(self, kept: set[tuple[int, str]]) -> set[str]:
        """Trees that kept trees share directories with (symlinks): they stay while linked."""
        linked: set[str] = set()
        for version, digest in kept:
            name = _stem(version, digest)
            links = self._tree_links.get(name)  # a tree never changes: read its links once
            if links is None:
                root = self._trees / name
                if not root.is_dir():
                    continue
                links = self._tree_links[name] = frozenset(_fsutil.tree_links(root))
            linked |= links
        return linked

    def _drop_tree(self, tree: Path) -> None:
        """Take a tree away now (a rename); delete its thousand links after the push has answered."""
        self._doomed.append(_fsutil.unlink_tree_name(tree))

    def _clean_up_later(self) -> None:
        """Hand dropped trees to the clean-up worker: retention must not cost a push the ~10 ms of
        unlinking a 1,000-file tree. The worker deletes them, then sweeps objects no tree links to
        (under the store lock, so no object vanishes while a tree is being linked). Callers may hold
        the store lock: nothing here waits for the worker. ``settle()`` does.
        """
        doomed, self._doomed = self._doomed, []
        if not doomed:
            return
        if self._cleaner is None or not self._cleaner.is_alive():
            self._cleaner = threading.Thread(target=self._clean_up, name="habanero-store-cleanup",
                                             daemon=True)
            self._cleaner.start()
        self._cleanup.put(doomed)

    def _clean_up(self) -> None:
        while True:
            doomed = self._cleanup.get()
            if doomed is None:  # close()
                self._cleanup.task_done()
                return
            try:
                for path in doomed:
                    _fsutil.rmtree_quietly(path)
                with self._lock:
                    _fsutil.sweep_objects(self._objects)
            except (OSError, StoreError):
                logger.warning("could not sweep unused objects in %s; the next prune retries", self.path)
            finally:
                self._cleanup.task_done()

    def settle(self) -> None:
        """Wait until background clean-up is done (tests, shutdown). Never call it holding the lock."""
        self._cleanup.join()


    def object(self, sha256: str) -> bytes | None:
        """An entry body this store holds (for delta bundles), or None. Its hash is checked by the reader."""
        if not is_sha256(sha256):
            return None
        try:
            return (self._objects / sha256[:2] / sha256).read_bytes()
        except OSError:
            return None

    def tree_path(self, bundle: Bundle) -> Path:
        """Where ``tree(bundle)`` lays the version out; computing it writes nothing."""
        return self._trees / _stem(bundle.version, bundle.digest)

    def discard(self, bundle: Bundle) -> None:
        """Forget a staged bundle whose push failed: its staged file and its tree, if not committed.

        A failed push leaves no trace but its history entry. Objects shared with other versions
        stay; unreferenced ones go at the next prune.
        """
        name = f"{_stem(bundle.version, bundle.digest)}.hbn"
        if (self._bundles / name).exists():
            return  # a stored version (a rollback target): never discarded
        with self._lock, self._io(f"discard v{bundle.version}"):
            (self._staged / name).unlink(missing_ok=True)
            root = self.tree_path(bundle)
            if root.is_dir():
                _fsutil.remove_tree(root)

    def _check_active_tree(self) -> None:
        """Rebuild the active version's tree if a crash left it short or damaged (it is not fsynced)."""
        bundle = self.active
        root = self.tree_path(bundle) if bundle is not None else None
        if root is None or not root.is_dir():
            return
        for entry in bundle.entries.values():
            try:
                with open(os.path.join(root, entry.path), "rb") as fh:
                    intact = fh.read() == bundle.read(entry.name)
            except OSError:
                intact = False
            if not intact:
                logger.warning("the source tree of v%s is damaged (%s); rebuilding it", bundle.version,
                               entry.path)
                with self._lock:
                    _fsutil.remove_tree(root)
                self.tree(bundle)
                return

    def tree(self, bundle: Bundle) -> Path:
        """A read-only source tree of ``bundle`` (``tree/<entry.path>``), built once, then reused.

        Bodies live once in ``objects/`` and are hard-linked in, so a push that changes one file of
        1,000 writes one object and makes 1,000 links. Built in a temp dir and renamed into place.
        """
        root = self.tree_path(bundle)
        if root.is_dir():
            return root
        with self._lock, self._io(f"build the source tree of v{bundle.version}"):
            if not root.is_dir():  # another process may have built it while we waited
                rows = [(e.path, e.sha256, e.size, functools.partial(bundle.read, e.name))
                        for e in bundle.entries.values()]
                share = self._shareable(bundle)
                mine = self._digests_of(bundle) if share is not None else None
                _fsutil.build_tree(root, rows, self._objects, share=share, digests=mine)
        return root

    def _digests_of(self, bundle: Bundle) -> dict[str, str]:
        """Directory digests of a bundle, kept for the newest two: this push's tree is the next
        push's active one, so each version's digests are computed once."""
        digests = self._dir_digests.get(bundle.digest)
        if digests is None:
            digests = _fsutil.dir_digests((e.path, e.sha256) for e in bundle.entries.values())
            self._dir_digests = {**dict(list(self._dir_digests.items())[-1:]), bundle.digest: digests}
        return digests

    def _shareable(self, bundle: Bundle) -> tuple[Path, dict[str, str]] | None:
        """The active version's tree and its directory digests, for a new tree to share from."""
        active = self.active
        if active is None or active.digest == bundle.digest:
            return None
        root = self.tree_path(active)
        if not root.is_dir():
            return None
        return root, self._digests_of(active)
