"""The store's objects and its source tree: file bodies by content, and the running version as files.

``objects/<sha256[:2]>/<sha256>`` holds every body of every stored version, once, read-only:
stored delta bundles take the entries they do not carry from there, and the tree links to them.

``tree/<entry path>`` lays out the version that runs as real files, at paths that never change from
one version to the next, so ``__file__``, ``Path(__file__).parent / "templates"``, tracebacks,
``inspect`` and ``importlib.resources`` see real files, and a module a push does not change keeps
its ``__file__`` and ``__spec__``. A push rewrites only the files it changes (a hard link to the new
object renamed over the old file, atomic for a reader) and removes the files of removed entries,
with their directories once empty (an empty directory would import as a namespace package). It
does so before the new code runs, so that code sees its own tree, and :meth:`update_tree` returns
the undo that puts the old files back. One tree per store: processes sharing a store directory
share it and see the files of the newest commit.

The tree is derived data: it is never fsynced, and ``Store.open`` checks it against the active
bundle, file by file, and repairs what differs. Objects of new pushes are written without fsync
under ``sync="background"`` and flushed by a worker thread right after the push has answered
(see ``Store``); a power cut before that makes the store fall back to the newest version whose
bodies verify.

Unreferenced objects (of versions retention dropped) are swept by the same worker once every
``SWEEP_EVERY`` dropped versions, never on a push's path and never while the app starts: until
then they only take disk space. ``TreesMixin`` is part of :class:`overlay.store.Store`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from . import _fsutil
from ._manifest import is_sha256
from .bundle import Bundle, Entry, manifest_bytes_of
from .errors import BadEntryName, StoreError

logger = logging.getLogger("overlay.store")

#: Dropped versions between two object sweeps: a sweep reads every stored manifest (milliseconds
#: of a worker thread), and what waits for it is only disk space.
SWEEP_EVERY = 10

Task = Callable[[], None]


def _stem(version: int, digest: str) -> str:
    return f"{version:010d}-{digest}"


class TreesMixin:
    """Object and tree methods of ``Store`` (see the module docstring)."""

    _objects: Path
    _bundles: Path
    _staged: Path
    _lock: _fsutil.FileLock
    active: Bundle | None
    path: Path
    sync: str

    def _init_trees(self) -> None:
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._dropped_since_sweep = 0

    @property
    def tree_root(self) -> Path:
        """Where the running version's files are: ``__file__`` of every module served is below it."""
        return self.path / "tree"

    # ------------------------------------------------------------------------------ objects

    def object(self, sha256: str) -> bytes | None:
        """An entry body this store holds (for delta bundles), or None. Its hash is checked by the reader."""
        if not is_sha256(sha256):
            return None
        try:
            with open(self._object_path(sha256), "rb") as fh:
                return fh.read()
        except OSError:
            return None

    def _object_path(self, sha256: str) -> str:
        return os.path.join(self._objects, sha256[:2], sha256)

    def _write_objects(self, bundle: Bundle, known: Bundle | None, names: Iterable[str] | None = None
                       ) -> list[str]:
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
            path = self._object_path(sha256)
            try:
                if os.stat(path).st_size == entry.size:
                    continue
            except FileNotFoundError:
                pass
            self._put_object(path, bundle.read(entry.name), sync=self.sync == "commit")
            written.append(path)
        return written

    @staticmethod
    def _put_object(path: str, body: bytes, *, sync: bool) -> None:
        """Write one object, read-only. Preallocated: objects are hashed where they are used (see
        ``_fsutil.write_atomic``)."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        _fsutil.write_atomic(path, body, mode=0o444, sync=sync, sync_dir=False, preallocate=True)

    # --------------------------------------------------------------------------------- tree

    def update_tree(self, old: Bundle | None, new: Bundle, names: Iterable[str] | None = None) -> Task:
        """Make the tree show ``new`` where it differs from ``old``; return the undo.

        ``names`` are the entries that differ (added, changed or removed, by name), when the caller
        knows them already; otherwise every entry is compared. Needs the objects of both versions.
        """
        root = os.fspath(self.tree_root)
        old_entries = old.entries if old is not None else {}
        new_entries = new.entries
        if names is None:
            names = [n for n, e in new_entries.items() if _differs(old_entries.get(n), e)]
            names += [n for n in old_entries if n not in new_entries]
        steps: list[tuple[str, str | None, str | None]] = []  # path, new sha256 or None, old or None
        for name in names:
            before, after = old_entries.get(name), new_entries.get(name)
            if before is not None and (after is None or before.path != after.path):
                steps.append((before.path, None, before.sha256))
        for name in names:
            before, after = old_entries.get(name), new_entries.get(name)
            if after is not None:
                steps.append((after.path, after.sha256,
                              before.sha256 if before is not None and before.path == after.path else None))
        done: list[tuple[str, str | None]] = []

        def undo() -> None:
            """Every step is tried even when one fails (the first failure is raised after): a
            half-reverted tree is repaired at the next open, but should be as small as can be."""
            failed: BaseException | None = None
            with self._lock:
                for path, sha256 in reversed(done):
                    try:
                        self._put(root, path, sha256)
                    except Exception as exc:  # noqa: BLE001  (re-raised below)
                        failed = failed or exc
            if failed is not None:
                raise failed

        with self._lock, self._io(f"update the source tree for v{new.version}"):
            os.makedirs(root, mode=0o700, exist_ok=True)
            try:
                for path, sha256, previous in steps:
                    self._put(root, path, sha256)
                    done.append((path, previous))
            except BaseException:
                undo()
                raise
        return undo

    def _put(self, root: str, relative: str, sha256: str | None) -> None:
        """Make ``root/relative`` the object ``sha256`` (atomically), or absent when None."""
        target = _inside(root, relative)
        if sha256 is None:
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass
            _remove_empty_dirs(root, os.path.dirname(target))
            return
        parent = os.path.dirname(target)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if parent != root and not _below(os.path.realpath(parent), root):
            raise BadEntryName(f"entry path {relative!r} resolves outside the source tree", name=relative)
        tmp = os.path.join(parent, f"{_fsutil.TMP_PREFIX}{uuid.uuid4().hex[:12]}")
        _fsutil.link_or_copy(self._object_path(sha256), tmp)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise

    def _check_tree(self) -> None:
        """At open: the tree holds exactly the active version's files (it is never fsynced, and a
        crash mid-push may have left another version's files); repair what differs."""
        root = self.tree_root
        bundle = self.active
        if bundle is None:
            if root.exists():
                self._drop_later(root)
            return
        expected = {e.path: e for e in bundle.entries.values()}
        wrong: list[Entry] = []
        for entry in expected.values():
            body = bundle.read(entry.name)
            tree_ok, inode = _holds(os.path.join(root, entry.path), body)
            # The tree file is a hard link to the object: the same inode, already read, is the
            # object checked too. Otherwise (a copy, a repair pending) the object is read as well.
            obj = self._object_path(entry.sha256)
            if not (inode is not None and _inode(obj) == inode) and not _holds(obj, body)[0]:
                logger.warning("object %s of v%s is missing or damaged; writing it again",
                               entry.sha256[:12], bundle.version)
                self._put_object(obj, body, sync=True)
                tree_ok = False  # relink the tree file to the new object
            if not tree_ok:
                wrong.append(entry)
        extra = [p for p in _files_below(root) if p not in expected] if root.is_dir() else []
        if not wrong and not extra:
            return
        if not root.is_dir():
            logger.info("laying out the source tree of v%s", bundle.version)
        else:
            logger.warning("the source tree of v%s differs from its bundle (%d files wrong or missing, "
                           "%d extra); repairing it", bundle.version, len(wrong), len(extra))
        with self._lock.attempt() as idle:
            if not idle:  # a writer is busy (another process pushing): starting up never waits
                logger.warning("the source tree of v%s is left for the next start: the store is busy",
                               bundle.version)
                return
            os.makedirs(root, mode=0o700, exist_ok=True)
            for path in extra:
                self._put(os.fspath(root), path, None)
            for entry in wrong:
                self._put(os.fspath(root), entry.path, entry.sha256)

    # ------------------------------------------------------------------- background work

    def later(self, task: Task) -> None:
        """Run ``task`` on the store's worker thread, after the current push has answered: work a
        push makes necessary but need not wait for (flushes, retention, the next push's set-up).
        An ``OSError`` or ``StoreError`` it raises is logged as a warning."""
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="habanero-store-worker", daemon=True)
            self._worker.start()
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is None:  # close()
                    return
                task()
            except (OSError, StoreError) as exc:
                logger.warning("store %s: background work failed (%s); it is retried later", self.path, exc)
            except Exception:  # never let the worker die silently
                logger.exception("store %s: background work failed", self.path)
            finally:
                self._tasks.task_done()

    def settle(self) -> None:
        """Wait until background work is done (tests, shutdown). Never call it holding the lock."""
        self._tasks.join()

    def _stop_worker(self) -> None:
        self.settle()
        if self._worker is not None and self._worker.is_alive():
            self._tasks.put(None)
            self._worker.join()

    def _flush_later(self, files: list[str], retired: Iterable[str] = ()) -> None:
        """``sync="background"``: make what a commit wrote durable, off the push's path; then drop
        ``retired``, the second names that kept replaced files (their blocks are freed here)."""
        if self.sync != "background" or not files:
            return

        def flush() -> None:
            for path in files:
                _fsutil.fsync_path(path)
            for directory in sorted({os.path.dirname(p) for p in files}):
                _fsutil.fsync_path(directory)
            for path in retired:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

        self.later(flush)

    def _drop_later(self, path: Path) -> None:
        """Take a directory away now (a rename), delete it on the worker."""
        doomed = path.with_name(f"{_fsutil.TMP_PREFIX}rm-{uuid.uuid4().hex}")
        os.replace(path, doomed)
        self.later(lambda: shutil.rmtree(doomed, ignore_errors=True))

    def _dropped(self, count: int) -> None:
        """Retention dropped ``count`` versions: sweep their objects once enough have gone."""
        self._dropped_since_sweep += count
        if self._dropped_since_sweep >= SWEEP_EVERY:
            self._dropped_since_sweep = 0
            self.later(self._sweep_objects)

    def _sweep_objects(self) -> None:
        """Delete objects no stored or staged bundle refers to.

        The manifests are read outside the store lock (milliseconds per bundle); under the lock,
        bundles that appeared meanwhile are read too, so an object a push has just staged (stage
        writes objects and its bundle under one hold of the lock) is never taken.
        """
        seen: dict[str, set[str]] = {}
        for path in self._bundle_files():
            seen[path] = _hashes_in(path)
        candidates = [(sub.name, entry.name) for sub in _scandir(self._objects)
                      if sub.is_dir(follow_symlinks=False) and not sub.name.startswith(_fsutil.TMP_PREFIX)
                      for entry in _scandir(sub.path)]
        with self._lock:
            for path in self._bundle_files():
                if path not in seen:
                    seen[path] = _hashes_in(path)
            referenced = set().union(*seen.values())
            if self.active is not None:
                referenced.update(self.active.by_hash)
            for shard, name in candidates:
                if name not in referenced:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self._objects, shard, name))

    def _bundle_files(self) -> list[str]:
        return [os.path.join(d, n) for d in (self._bundles, self._staged) for n in os.listdir(d)
                if n.endswith(".hbn")]


@functools.lru_cache(maxsize=16)
def _real(root: str) -> str:
    """The tree root with symlinks resolved: once per root, not per file (a system call per
    component of the path)."""
    return os.path.realpath(root)


def _below(real_path: str, root: str) -> bool:
    """Whether ``real_path`` is inside the tree ``root``; the root is resolved again before saying
    no, in case a link in the store's path was re-pointed since it was cached."""
    if real_path.startswith(_real(root) + os.sep):
        return True
    _real.cache_clear()
    return real_path.startswith(_real(root) + os.sep)


def _holds(path: str, body: bytes) -> tuple[bool, int | None]:
    """Whether the file at ``path`` holds exactly ``body``, and its inode when it does."""
    try:
        with open(path, "rb") as fh:
            if fh.read() == body:
                return True, os.fstat(fh.fileno()).st_ino
    except OSError:
        pass
    return False, None


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _differs(before: Entry | None, after: Entry) -> bool:
    return before is None or before.sha256 != after.sha256 or before.kind != after.kind


def _hashes_in(path: str) -> set[str]:
    """The entry hashes a stored bundle's manifest lists (unverified: only used to keep objects)."""
    try:
        with open(path, "rb") as fh:
            manifest = json.loads(manifest_bytes_of(fh.read()))
        return {e["sha256"] for e in manifest["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _inside(root: str, relative: str) -> str:
    """``root/relative``, refusing what would land outside ``root``: bundle.py checked the names
    already, this is defence in depth against a bug there."""
    target = os.path.normpath(os.path.join(root, relative))
    if relative.startswith("/") or ".." in relative.split("/") or not target.startswith(root + os.sep):
        raise BadEntryName(f"entry path {relative!r} would land outside the source tree; it should "
                           "have been refused when the bundle was opened: please report this",
                           name=relative)
    return target


def _remove_empty_dirs(root: str, directory: str) -> None:
    while directory != root and directory.startswith(root + os.sep):
        try:
            os.rmdir(directory)
        except OSError:  # not empty (or gone): stop here
            return
        directory = os.path.dirname(directory)


def _files_below(root: Path) -> list[str]:
    """Relative POSIX paths of the files under ``root`` (temp files of an interrupted write too)."""
    found = []
    for directory, _, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        for name in files:
            found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return found


def _scandir(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []
