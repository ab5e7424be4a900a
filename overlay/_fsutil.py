"""Crash-safe file system primitives for the store: atomic writes, JSON-lines records,
content-addressed read-only trees, and the writers' lock.

A ``kill -9`` or a power cut may stop us between any two system calls. Every helper here leaves
either the old state or the new one on disk: data is written to a temp file in the destination's
directory, fsynced, renamed over the target with ``os.replace`` (atomic on POSIX), and the directory
is fsynced so the rename itself is durable. Temp files carry :data:`TMP_PREFIX`, so whatever an
interrupted write leaves behind is recognisable and removed by :func:`remove_orphans`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import BadEntryName, StoreError

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> tuple[Any, str]:
    """The JSON value in ``path``, or None and what is wrong (missing, empty, unreadable, corrupt).

    Duplicate keys count as corruption: ``json.loads`` would silently keep the last one.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if not raw.strip():
        return None, "empty"
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys), ""
    except (ValueError, RecursionError) as exc:
        return None, f"corrupt ({exc})"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a key is repeated")
    return dict(pairs)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True,
                 sync: bool = True) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old content or the new, never a mix.

    ``sync_dir=False`` lets a caller writing many files fsync their directories once at the end;
    ``sync=False`` is for derived data that is checked and rebuilt after a crash (source trees).
    """
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if sync:
                os.fsync(fh.fileno())  # data before name: a rename must never expose unwritten blocks
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file written by :func:`append_record`, skipping torn or corrupt lines."""
    return RecordLog(path).read()


class RecordLog:
    """An append-only JSON-lines file, read incrementally: only bytes appended since the last read.

    Status pages read the history on every request; re-parsing a file that grows with every push
    would make them slower with each deploy. Another process's appends are picked up (the file
    grew); a file that shrank or was replaced is read again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: list[dict[str, Any]] = []
        self._size = 0
        self._inode = -1
        self._pending = b""  # a last line without its newline yet (being appended, or torn)

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self._inode or st.st_size < self._size:
                    self._records, self._size, self._inode, self._pending = [], 0, st.st_ino, b""
                if st.st_size > self._size:
                    fh.seek(self._size)
                    chunk = self._pending + fh.read(st.st_size - self._size)
                    self._size = st.st_size
                    lines = chunk.split(b"\n")
                    self._pending = lines.pop()  # b"" when the chunk ended with a newline
                    self._records.extend(_parse_lines(lines))
        except FileNotFoundError:
            self._records, self._size, self._inode, self._pending = [], 0, -1, b""
        tail = list(_parse_lines([self._pending])) if self._pending else []
        return self._records + tail


def _parse_lines(lines: list[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a crash mid-append tore it; append_record kept it on a line of its own
        if isinstance(record, dict):
            yield record


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line and fsync it.

    A crash mid-append leaves a torn last line. If the file does not end with a newline, one is
    written first, so the torn fragment stays a line of its own (readers skip it) instead of
    swallowing this record. Callers serialise appends (the store's lock).
    """
    line = json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (free, shares the read-only inode); copy when linking fails.

    Linking fails on file systems without hard links and when an inode reaches its link limit
    (ext4: 65,000), which one empty ``__init__.py`` shared by many packages and versions can hit.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o444)


TreeRow = tuple[str, str, int, Callable[[], bytes]]  # relative path, sha256, size, read the body


def build_tree(root: Path, rows: Iterable[TreeRow], objects: Path,
               share: tuple[Path, dict[str, str]] | None = None,
               digests: dict[str, str] | None = None) -> None:
    """Build a read-only tree at ``root``: every row's body at ``root/<relative path>``.

    Each body is stored once as ``objects/<sha256[:2]>/<sha256>`` (0444) and hard-linked in, so a
    tree whose files mostly exist already costs about one link per file. The tree is put together
    under a temp name and renamed into place: a reader sees no tree or a whole one.

    New objects are fsynced (later trees link to them); the tree's directories are not: a tree is
    derived from a bundle that is, and the store checks the active tree against its bundle when it
    opens and rebuilds it if a power cut damaged it. Syncing some 20 directories per push would cost
    more than the rest of the push.

    ``share`` is ``(tree, its dir_digests)`` of an existing tree (the active version's): every
    directory whose whole content is the same there becomes a relative symlink to it, so a push that
    changes one file of 1,000 makes a few links instead of a thousand. Trees are immutable, so
    sharing is safe; the store keeps a tree alive while another links into it.
    """
    rows = list(rows)
    tmp = root.with_name(f"{TMP_PREFIX}{root.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(mode=0o700)
    try:
        if share is not None:
            mine = digests if digests is not None else dir_digests((row[0], row[1]) for row in rows)
            rows = _share_dirs(os.fspath(tmp), os.fspath(root), rows, *share, mine)
        dirs = _fill_tree(os.fspath(tmp), rows, os.fspath(objects))
        for directory in sorted(dirs, key=lambda d: d.count(os.sep), reverse=True):
            os.chmod(directory, 0o555)  # read-only: not even a __pycache__ can appear in a tree
        os.rename(tmp, root)
    except BaseException:
        if tmp.exists():
            _rmtree(tmp)
        raise


def dir_digests(rows: Iterable[tuple[str, str]]) -> dict[str, str]:
    """For every directory of a tree (relative POSIX path), a digest of every ``(path, sha256)`` below it."""
    acc: dict[str, list[str]] = {}
    for path, sha256 in sorted(rows):
        line = f"{path}\0{sha256}"
        directory = path.rpartition("/")[0]
        while directory:
            acc.setdefault(directory, []).append(line)
            directory = directory.rpartition("/")[0]
    return {d: hashlib.sha256("\n".join(lines).encode()).hexdigest() for d, lines in acc.items()}


def _share_dirs(base: str, final: str, rows: list[TreeRow], other: Path,
                other_digests: dict[str, str], mine: dict[str, str]) -> list[TreeRow]:
    """Symlink the directories whose content equals ``other``'s; return the rows still to link."""
    shared = sorted(d for d, digest in mine.items() if other_digests.get(d) == digest)
    top: list[str] = []
    for directory in shared:  # sorted: a parent comes before its children
        if not any(directory.startswith(t + "/") for t in top):
            top.append(directory)
    linked = []
    for directory in top:
        target = os.path.realpath(os.path.join(other, directory))
        if not os.path.isdir(target):
            continue
        link = os.path.join(base, *directory.split("/"))
        os.makedirs(os.path.dirname(link), mode=0o700, exist_ok=True)
        # Relative to where the tree will live, so moving the whole store keeps it working.
        os.symlink(os.path.relpath(target, os.path.dirname(os.path.join(final, *directory.split("/")))), link)
        linked.append(directory + "/")
    if not linked:
        return rows
    shared_dirs = {prefix[:-1] for prefix in linked}

    def under_shared(path: str) -> bool:
        directory = path.rpartition("/")[0]
        while directory:
            if directory in shared_dirs:
                return True
            directory = directory.rpartition("/")[0]
        return False

    return [row for row in rows if not under_shared(row[0])]


def tree_links(root: Path) -> set[str]:
    """Names of the trees (siblings of ``root``) that ``root`` symlinks into."""
    found = set()
    trees = os.path.normpath(os.path.dirname(os.path.abspath(root)))
    for directory, subdirs, _ in os.walk(root):
        for name in subdirs:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                # Our links are relative and point straight at a real directory of a sibling tree.
                target = os.path.normpath(os.path.join(directory, os.readlink(path)))
                if target.startswith(trees + os.sep):
                    found.add(target[len(trees) + 1 :].split(os.sep, 1)[0])
    return found


def _fill_tree(base: str, rows: Iterable[TreeRow], objects: str) -> set[str]:
    """Link every row into ``base``; return the directories made (to fsync and make read-only).

    Plain ``os.path`` strings, not ``Path``: this loop runs once per file of every push.
    """
    dirs = {base}
    real_base = os.path.realpath(base)
    for relative, sha256, size, read in rows:
        target = _inside(base, relative)
        parent = os.path.dirname(target)
        if parent not in dirs:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            if not os.path.realpath(parent).startswith(real_base + os.sep):
                raise BadEntryName(f"entry path {relative!r} resolves outside the source tree", name=relative)
            while parent not in dirs:
                dirs.add(parent)
                parent = os.path.dirname(parent)
        shard = os.path.join(objects, sha256[:2])
        obj = os.path.join(shard, sha256)
        try:
            stored_size = os.stat(obj).st_size
        except FileNotFoundError:
            stored_size = -1
        if stored_size != size:  # absent, or torn by a power cut: (re)write it
            os.makedirs(shard, mode=0o700, exist_ok=True)
            # Objects are fsynced (a push writes only its new ones): later trees link to them.
            write_atomic(Path(obj), read(), mode=0o444, sync_dir=False)
        link_or_copy(obj, target)
    return dirs


def _inside(base: str, relative: str) -> str:
    """``base/relative``, refusing what would land outside ``base``: bundle.py checked the names
    already, this is defence in depth against a bug there."""
    target = os.path.normpath(os.path.join(base, relative))
    if relative.startswith("/") or ".." in relative.split("/") or not target.startswith(base + os.sep):
        raise BadEntryName(f"entry path {relative!r} would land outside the source tree; it should "
                           "have been refused when the bundle was opened: please report this",
                           name=relative)
    return target


def sweep_objects(objects: Path) -> None:
    """Remove objects no tree links to any more (link count 1: only ``objects/`` holds them)."""
    for sub in os.scandir(objects):
        if sub.is_dir(follow_symlinks=False) and not sub.name.startswith(TMP_PREFIX):
            for entry in os.scandir(sub.path):
                if entry.stat(follow_symlinks=False).st_nlink <= 1:
                    os.unlink(entry.path)


def remove_tree(path: Path) -> None:
    """Remove a directory tree atomically from a reader's point of view.

    The tree is first renamed to a temp name, so a crash mid-removal leaves an orphan that
    :func:`remove_orphans` finishes, never a half-empty tree under its real name.
    """
    _rmtree(unlink_tree_name(path))


def unlink_tree_name(path: Path) -> Path:
    """Take a tree away under a temp name (instant); return that name for :func:`_rmtree` later."""
    doomed = path.with_name(f"{TMP_PREFIX}rm-{uuid.uuid4().hex}")
    os.replace(path, doomed)
    return doomed


def rmtree_quietly(path: Path) -> None:
    """Delete a tree already taken away by :func:`unlink_tree_name`; leftovers go at the next open."""
    with contextlib.suppress(OSError):
        _rmtree(path)


def _rmtree(path: Path) -> None:
    # Trees are read-only (0555 directories); give ourselves write access back before unlinking.
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
    os.chmod(path, 0o700)
    shutil.rmtree(path)


def remove_orphans(dirs: Iterable[Path]) -> list[Path]:
    """Delete what interrupted writes left (names starting with :data:`TMP_PREFIX`) in ``dirs``."""
    removed = []
    for directory in dirs:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX):
                continue
            target = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                _rmtree(target)
            else:
                target.unlink(missing_ok=True)
            removed.append(target)
    return removed


class FileLock:
    """An exclusive ``flock`` on one file, re-entrant within a process, with a timeout.

    ``flock`` is per open file description, so threads sharing this object would not exclude each
    other through it: a ``threading.RLock`` orders them, and the ``flock`` is taken by the
    outermost holder only. Waiting polls with ``LOCK_NB`` so a stuck writer elsewhere produces an
    actionable error instead of a hang.
    """

    def __init__(self, path: Path, *, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._depth = 0

    def __enter__(self) -> FileLock:
        if not self._mutex.acquire(timeout=self.timeout):
            raise self._timed_out()
        try:
            if self._depth == 0:
                self._flock()
        except BaseException:
            self._mutex.release()
            raise
        self._depth += 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    @contextlib.contextmanager
    def attempt(self) -> Iterator[bool]:
        """Hold the lock only if it is free right now; yield whether it is held. Never waits."""
        if not self._mutex.acquire(blocking=False):
            yield False
            return
        try:
            if self._depth == 0:
                try:
                    fcntl.flock(self._require_fd(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._require_fd(), fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StoreError(f"the store lock {self.path} was closed; open the store again",
                             code="store_error")
        if self._pid != os.getpid():
            # A forked child shares our open file description, hence our flock: it needs its own.
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def _flock(self) -> None:
        fd = self._require_fd()
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                raise self._timed_out()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _timed_out(self) -> StoreError:
        return StoreError(
            f"another process has held the store lock {self.path} for over {self.timeout:g} s; "
            "wait for its deploy to finish, or find it with `fuser` and stop it if it is stuck",
            code="store_locked", path=str(self.path),
        )

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
