"""A source tree: the running version's files, at paths that stay the same from version to version.

``<root>/<entry path>`` lays out a version as real files, so ``__file__``,
``Path(__file__).parent / "templates"``, tracebacks, ``inspect`` and ``importlib.resources`` see real
files, and a module a push does not change keeps its ``__file__`` and ``__spec__``. A push rewrites
only the files it changes (a hard link to the new object renamed over the old file, atomic for a
reader) and removes the files of removed entries, with their directories once empty (an empty
directory would import as a namespace package). It does so before the new code runs, so that code
sees its own tree, and :meth:`SourceTree.update` returns the undo that puts the old files back.

Each process has a tree of its own (see ``overlay.cluster.registry``), so a process still running
one version never reads another version's files. The tree is derived data: it is never fsynced,
and :meth:`SourceTree.lay_out` checks it against the bundle it should show, file by file, and
repairs what differs.

Beside the packages, the tree root links to the project's other files (``overlay.storage.mirror``),
so paths derived from ``__file__`` (``BASE_DIR / "db.sqlite3"``) reach the project. The app may still
write into the tree (a file its project did not have when the links were made): habanero removes
only what it can prove it wrote itself, and leaves anything else where it is, with a warning. Proof
is one of: a temp file of ours (:data:`fs.TMP_PREFIX`); inside a served package, a read-only file
that is a hard link to an object of the store, or a copy of one (its sha256 names an object), or a
read-only module file with habanero's fixed mtime (:data:`MODULE_MTIME`, for a version whose objects
retention has dropped since). The mirror's own links are managed by the mirror.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from overlay.bundle import DEFAULT_LIMITS, Bundle, Entry
from overlay.errors import BadEntryName, StoreError
from overlay.storage import fs
from overlay.storage.mirror import Mirror, warn_once
from overlay.storage.objects import ObjectStore

__all__ = ["SourceTree"]

logger = logging.getLogger("overlay.store")

Undo = Callable[[], None]
#: The mtime of every module file in a tree (2000-01-01): see ``SourceTree._put``.
MODULE_MTIME = 946684800


class SourceTree:
    """The files of one version under ``root``, hard links into ``objects``.

    One process writes a tree (its own), so nothing here takes a lock: the objects a tree links to
    belong to stored or staged bundles, which the store's sweep never takes.
    """

    def __init__(self, root: Path, objects: ObjectStore, *, label: str, mirror: Mirror | None = None) -> None:
        self.root = root
        self._objects = objects
        self._label = label  # the store, for error messages
        #: The links to the project's other files at the root (None: no links, as in a test's tree).
        self.mirror = mirror

    def update(self, old: Bundle | None, new: Bundle, names: Iterable[str] | None = None) -> Undo:
        """Make the tree show ``new`` where it differs from ``old``; return the undo.

        ``names`` are the entries that differ (added, changed or removed, by name), when the caller
        knows them already; otherwise every entry is compared. Needs the objects of both versions.
        """
        root = os.fspath(self.root)
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
            for path, sha256 in reversed(done):
                try:
                    self._put(root, path, sha256)
                except Exception as exc:  # re-raised below
                    failed = failed or exc
            if failed is not None:
                raise failed

        with fs.os_errors_as_store_errors(self._label, f"update the source tree for v{new.version}"):
            self._make_root()
            if self.mirror is not None:  # first: a name the push makes a package's is unlinked
                self.mirror.refresh(root)
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            _remove_empty_dirs(root, os.path.dirname(target))
            return
        parent = os.path.dirname(target)
        self._make_dirs(root, parent)
        if parent != root and not _below(os.path.realpath(parent), root):
            raise BadEntryName(f"entry path {relative!r} resolves outside the source tree", name=relative)
        problem = fs.unsafe_entry(target, directory=False)
        if problem is not None:
            raise self._unsafe(problem)
        tmp = os.path.join(parent, f"{fs.TMP_PREFIX}{os.urandom(6).hex()}")
        fs.link_or_copy(self._objects.path(sha256), tmp)
        if relative.endswith(".py"):
            # Dev reloaders (werkzeug's and Django's stat reloaders) restart the app when a module's
            # file gets a newer mtime: every module file of every version has the same one, so a
            # push that rewrites a module is not taken for an edit. (Data files keep their own:
            # template loaders compare mtimes.)
            os.utime(tmp, (MODULE_MTIME, MODULE_MTIME))
        try:
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise

    def _make_root(self) -> None:
        """Create the tree's root (its parent is the process's slot, see ``overlay.cluster.registry``);
        refuse one that is a symbolic link: the mirror's links and the packages would land elsewhere."""
        root = os.fspath(self.root)
        os.makedirs(os.path.dirname(root), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(root, 0o700)
        problem = fs.unsafe_entry(root, directory=True)
        if problem is not None:
            raise self._unsafe(problem)

    def _make_dirs(self, root: str, directory: str) -> None:
        """Create ``directory`` below ``root`` one component at a time, never through a symbolic
        link or into something that is not a directory (``store_unsafe``): a link planted in place
        of a package directory would have habanero create directories elsewhere."""
        path = root
        for part in ["", *os.path.relpath(directory, root).split(os.sep)]:
            path = os.path.join(path, part) if part and part != "." else path
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o700)
                continue
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise self._unsafe(fs.unsafe_entry(path, directory=True) or f"{path} is not a directory")

    def _unsafe(self, problem: str) -> StoreError:
        return StoreError(f"cannot write the source tree {self.root}: {problem}, where habanero lays out a "
                          "package; it never writes through a symbolic link or over a file it did not create "
                          "there: check who put it there and remove it", code="store_unsafe", path=problem)

    def lay_out(self, bundle: Bundle) -> None:
        """Make the tree hold exactly ``bundle``'s files, new or repaired, checked file by file.

        Objects are not fsynced under ``sync="background"``: one a power cut damaged or lost is
        written again from the bundle (verified, in memory) before the tree links to it.
        """
        root = self.root
        expected = {e.path: e for e in bundle.entries.values()}
        with fs.os_errors_as_store_errors(self._label, f"lay out the source tree of v{bundle.version}"):
            if expected:
                self._make_root()
        if self.mirror is not None and expected:
            self.mirror.refresh(os.fspath(root))  # first: a name the version makes a package's is unlinked
        # Every directory the version's files are in is a directory of the tree, not a link elsewhere
        # (a file there may hold the right bytes: it would still not be the tree's).
        for directory in sorted({os.path.dirname(path) for path in expected} - {""}):
            problem = fs.unsafe_entry(os.path.join(root, directory), directory=True)
            if problem is not None:
                raise self._unsafe(problem)
        wrong: list[Entry] = []
        for entry in expected.values():
            body = bundle.read(entry.name)
            tree_ok, inode = _holds(os.path.join(root, entry.path), body)
            # The tree file is a hard link to the object: the same inode, already read, is the
            # object checked too. Otherwise (a copy, a repair pending) the object is read as well.
            obj = self._objects.path(entry.sha256)
            if not (inode is not None and _inode(obj) == inode) and not _holds(obj, body)[0]:
                logger.warning("object %s of v%s is missing or damaged; writing it again",
                               entry.sha256[:12], bundle.version)
                self._objects.put(obj, body, sync=True)
                tree_ok = False  # relink the tree file to the new object
            if not tree_ok:
                wrong.append(entry)
        extra = self._ours([p for p in _files_below(root) if p not in expected], expected) if root.is_dir() else []
        if not wrong and not extra:
            return
        if root.is_dir() and len(wrong) < len(expected):
            logger.warning("the source tree of v%s differs from its bundle (%d files wrong or missing, "
                           "%d extra); repairing it", bundle.version, len(wrong), len(extra))
        with fs.os_errors_as_store_errors(self._label, f"lay out the source tree of v{bundle.version}"):
            self._make_root()
            for path in extra:
                self._put(os.fspath(root), path, None)
            for entry in wrong:
                self._put(os.fspath(root), entry.path, entry.sha256)

    def _ours(self, extra: list[str], expected: dict[str, Entry]) -> list[str]:
        """The files of ``extra`` (relative paths no entry has) habanero can prove it wrote (see the
        module docstring); every other one is left alone, with a warning."""
        served = {path.partition("/")[0] for path in expected}
        if self.mirror is not None:
            served |= self.mirror.served
        ours: list[str] = []
        for path in extra:
            full = os.path.join(self.root, path)
            top, sep, _ = path.partition("/")
            if os.path.basename(path).startswith(fs.TMP_PREFIX) or (top in served and _wrote(full, self._objects)):
                ours.append(path)
            elif sep and top in served:  # at the root, the mirror tells about it
                warn_once("foreign", full, "%s is a file the app created inside its package in habanero's source "
                          "tree, not in the project; habanero leaves it there, but a push or a restart does not "
                          "bring it along to another process: create such files in the project directory, or "
                          "derive their path from a setting or an environment variable", full)
        return ours


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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)  # never a FIFO's wait
        with open(fd, "rb") as fh:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size == len(body) and fh.read(len(body) + 1) == body:
                return True, st.st_ino
    except OSError:
        pass
    return False, None


def foreign_files(root: Path, objects: ObjectStore) -> list[str]:
    """The files under ``root`` (relative paths) habanero cannot prove it wrote (see the module
    docstring): what the app wrote into an older habanero's tree."""
    return [path for path in _files_below(root)
            if not os.path.basename(path).startswith(fs.TMP_PREFIX) and not _wrote(os.path.join(root, path), objects)]


def _wrote(path: str, objects: ObjectStore) -> bool:
    """Whether the file at ``path`` is one habanero wrote into a package: a read-only hard link to
    an object, a read-only copy of one, or a read-only module file with the tree's fixed mtime."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o444:
            return False  # every file of a tree is read-only, as its object is
        if path.endswith(".py") and st.st_mtime == MODULE_MTIME:
            return True
        if st.st_size > DEFAULT_LIMITS.max_entry_bytes:
            return False
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        return os.path.isfile(objects.path(digest))  # the same inode (a link) or the same bytes (a copy)
    except OSError:
        return False


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _differs(before: Entry | None, after: Entry) -> bool:
    return before is None or before.sha256 != after.sha256 or before.kind != after.kind


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
    found: list[str] = []
    for directory, _, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        found.extend(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}" for name in files)
    return found
