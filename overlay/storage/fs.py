"""Crash-safe file system primitives for the store: atomic writes, JSON-lines records, hard links,
and the writers' lock.

A ``kill -9`` or a power cut may stop us between any two system calls. Every helper here leaves
either the old state or the new one on disk: data is written to a temp file in the destination's
directory, renamed over the target with ``os.replace`` (atomic on POSIX), and, unless the caller
defers it (the store's ``sync`` setting), fsynced first, with the directory fsynced after so the
rename itself is durable. Temp files carry :data:`TMP_PREFIX`, so whatever an
interrupted write leaves behind is recognisable and removed by :func:`remove_orphans`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from overlay.errors import StoreError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def os_errors_as_store_errors(where: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn an OSError (disk full, permissions) raised while doing ``what`` in ``where`` into a
    StoreError that says what to do."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"could not {what} in {where}: {exc.strerror or exc}; the active version did "
                         "not change: fix the disk (space, permissions) and retry") from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(paths: Iterable[Path], mode: int) -> None:
    """Create the directories of ``paths`` that are missing, and their missing parents, each made
    durable in its parent: an fsync of a directory keeps its entries, not its own name."""
    created: list[Path] = []
    for path in paths:
        missing, here = [], path
        while not here.is_dir():
            missing.append(here)
            here = here.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=mode)
            except FileExistsError:  # another process made it meanwhile: it makes it durable
                continue
            created.append(directory)
    for parent in dict.fromkeys(d.parent for d in created):
        fsync_dir(parent)


def parse_json(raw: bytes) -> tuple[Any, str]:
    """The JSON value in ``raw``, or None and what is wrong (empty, corrupt).

    Duplicate keys count as corruption: ``json.loads`` would silently keep the last one.
    """
    if not raw.strip():
        return None, "empty"
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys), ""
    except (ValueError, RecursionError) as exc:
        return None, f"corrupt ({exc})"


def read_small(path: str | os.PathLike[str], *, flags: int = 0, limit: int | None = None,
               regular: bool = False) -> bytes:
    """A small file's bytes, read with three system calls (``open()``'s file object costs six,
    and a push reads the state file three times). ``flags`` are added to ``os.open``'s (e.g.
    ``O_NOFOLLOW``); with ``limit``, no more than that many bytes are read. ``regular`` refuses
    anything but a regular file (a directory, a FIFO, a device) with ``NotARegularFile``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        if regular and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
        chunks, left = [], limit
        while left is None or left > 0:
            chunk = os.read(fd, 1 << 16 if left is None else min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            if left is not None:
                left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class NotARegularFile(OSError):
    """A path of the store or a tree holds something else than the regular file habanero expects."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a key is repeated")
    return dict(pairs)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, sync_dir: bool = True,
                 sync: bool = True, retire: list[str] | None = None, preallocate: bool = False) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old content or the new, never a mix.

    ``sync_dir=False`` lets a caller writing many files fsync their directories once at the end;
    ``sync=False`` leaves flushing to the caller (the store's background sync). With ``retire``,
    the file being replaced keeps a second name (a temp name, appended to ``retire``) for the
    caller to unlink later: freeing its blocks is then not part of this call (~0.15 ms on ext4).

    ``preallocate`` allocates the file's space before writing it. ext4 (``auto_da_alloc``) writes
    back a file with delayed allocation when it is renamed over another, inside the rename: that is
    what makes write-then-rename give the old content or the new after a power cut. A preallocated
    file skips that write, so a power cut before the caller's flush can leave it full of zeros:
    only for files whose content is checked where they are used (the store's objects, hashed, and
    the tree files linked to them, checked at open), never for a commit point.
    """
    directory = os.path.dirname(path)
    fd, tmp = _temp_file(directory, mode)
    kept = None
    try:
        try:
            if preallocate and not sync and data:
                with contextlib.suppress(OSError):  # only a speed-up: any file system may refuse it
                    os.posix_fallocate(fd, 0, len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
            if sync:
                os.fsync(fd)  # data before name: a rename must never expose unwritten blocks
        finally:
            os.close(fd)
        if retire is not None:
            kept = _keep_old(path, directory)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, kept):
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        raise
    if retire is not None and kept is not None:  # kept: only with retire
        retire.append(kept)
    if sync_dir:
        fsync_dir(directory)


def _keep_old(path: str | os.PathLike[str], directory: str) -> str | None:
    """A second (temp) name for the file at ``path``, or None when there is none (no file, or a
    file system without hard links)."""
    while True:
        name = os.path.join(directory, f"{TMP_PREFIX}old-{os.getpid()}-{next(_temp_names)}")
        try:
            os.link(path, name)
            return name
        except FileExistsError:
            continue
        except OSError:  # no file there, or no hard links here: the replace frees it, slower
            return None


_temp_names = itertools.count()


def _temp_file(directory: str | os.PathLike[str], mode: int) -> tuple[int, str]:
    """A new file for an atomic write, created exclusively (``tempfile.mkstemp`` costs a random
    name per try; the pid and a counter are unique already, the random part guards the rest)."""
    while True:
        name = os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{next(_temp_names)}-{os.urandom(3).hex()}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), name
        except FileExistsError:
            continue


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
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise NotARegularFile(errno.EINVAL, "not a regular file", os.fspath(self.path))
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
        except OSError as exc:  # a link or something else planted in its place: nothing habanero wrote
            warn_unsafe(self.path, exc)
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


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by name; one that is gone meanwhile needs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_record(path: str | os.PathLike[str], record: dict[str, Any], *, sync: bool = True) -> None:
    """Append ``record`` as one JSON line (and fsync it, unless ``sync=False``).

    A crash mid-append leaves a torn last line. If the file does not end with a newline, one is
    written first, so the torn fragment stays a line of its own (readers skip it) instead of
    swallowing this record. Callers serialise appends (the store's lock).
    """
    line = json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"
    created = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
        size = st.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if created and sync:
        fsync_dir(os.path.dirname(path))


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (free, shares the read-only inode); copy when linking fails.

    Linking fails on file systems without hard links and when an inode reaches its link limit
    (ext4: 65,000), which one empty ``__init__.py`` shared by many packages and versions can hit.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)  # the object's mtime too
        os.chmod(dst, 0o444)


def _rmtree(path: Path) -> None:
    # Directories an older habanero made read-only (0555): give ourselves write access back first.
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


_LOCKS: weakref.WeakSet[FileLock] = weakref.WeakSet()


def _reset_locks_in_child() -> None:
    for lock in list(_LOCKS):
        lock._after_fork()


os.register_at_fork(after_in_child=_reset_locks_in_child)


class FileLock:
    """An exclusive ``flock`` on one file, re-entrant within a process, with a timeout.

    ``flock`` is per open file description, so threads sharing this object would not exclude each
    other through it: a ``threading.RLock`` orders them, and the ``flock`` is taken by the
    outermost holder only. Waiting polls with ``LOCK_NB`` so a stuck writer elsewhere produces an
    actionable error instead of a hang.
    """

    def __init__(self, path: Path, *, timeout: float, local: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        #: Exclude this process's threads only, with no file (a store that is not safe to write, whose
        #: lock file is not one habanero can trust: it is never opened).
        self.local = local
        self._fd: int | None = None if local else _open_lock(path)
        self._pid = os.getpid()
        self._mutex = threading.RLock()
        self._depth = 0
        _LOCKS.add(self)

    def acquire(self, timeout: float, *, wait_for_threads: bool = True) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; whether it is held (then ``release()`` it).

        ``wait_for_threads=False`` refuses at once when another thread of this process holds it.
        """
        if not (self._mutex.acquire(timeout=max(timeout, 0.0)) if wait_for_threads else
                self._mutex.acquire(blocking=False)):
            return False
        try:
            if self._depth == 0 and not self._flock(timeout, raising=False):
                self._mutex.release()
                return False
        except BaseException:
            self._mutex.release()
            raise
        self._depth += 1
        return True

    def release(self) -> None:
        self.__exit__(None, None, None)

    def _after_fork(self) -> None:
        """In a forked child: whatever a parent's thread held is not held here (that thread is gone),
        and the flock belongs to the parent's open file description: start afresh."""
        self._mutex = threading.RLock()
        self._depth = 0
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = _open_lock(self.path)
        self._pid = os.getpid()

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
        if self._depth == 0 and self._fd is not None and not self.local:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    @contextlib.contextmanager
    def attempt(self) -> Iterator[bool]:
        """Hold the lock only if it is free right now; yield whether it is held. Never waits."""
        if not self._mutex.acquire(blocking=False):
            yield False
            return
        try:
            if self._depth == 0 and not self.local:
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
                if self._depth == 0 and not self.local:
                    fcntl.flock(self._require_fd(), fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _require_fd(self) -> int:
        if self.local:
            return -1
        if self._fd is None:
            raise StoreError(f"the store lock {self.path} was closed; open the store again",
                             code="store_error")
        if self._pid != os.getpid():
            # A forked child shares our open file description, hence our flock: it needs its own.
            os.close(self._fd)
            self._fd = _open_lock(self.path)
            self._pid = os.getpid()
        return self._fd

    def _flock(self, timeout: float | None = None, *, raising: bool = True) -> bool:
        fd = self._require_fd()
        if self.local:
            return True
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                if not raising:
                    return False
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


def _open_lock(path: Path) -> int:
    """The lock file, opened (created) without following a link: a planted link would have the
    store create or lock a file elsewhere."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd


def unsafe_entry(path: str | os.PathLike[str], *, directory: bool) -> str | None:
    """Why habanero must not write at ``path`` (a symbolic link, or not the regular file or the
    directory it should be), or None: it is what it should be, or absent (habanero creates it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{os.fspath(path)} is a symbolic link (to {os.readlink(path)})"
    if directory and not stat.S_ISDIR(st.st_mode):
        return f"{os.fspath(path)} is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return f"{os.fspath(path)} is not a regular file"
    return None


def warn_unsafe(path: str | os.PathLike[str], exc: OSError) -> None:
    """Log, once per path, that a file of the store was not read: something else is in its place."""
    key = os.fspath(path)
    if key not in _warned_unsafe:
        _warned_unsafe.add(key)
        logging.getLogger("overlay.store").error(
            "habanero store: %s cannot be read safely (%s): habanero never follows a symbolic link or reads "
            "a FIFO or device in its store; remove it after checking who put it there", key, exc.strerror or exc)


_warned_unsafe: set[str] = set()
