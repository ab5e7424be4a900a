"""A power-cut model of a directory tree: record what a process makes durable, rebuild what a disk
could hold after the power went at any moment.

:class:`Recorder` (in the writing process) wraps the ``os`` calls that change files and directories
and logs, under ``root``, every ``fsync``: of a file, its whole content then; of a directory, its
entries then (name, inode, file or directory). Inodes are told apart by ``(inode, generation)``:
the generation goes up each time a call creates an inode, so a number the kernel reuses after an
unlink is a new file. The process adds its own marks to the log (``ack N``: the push of version
N has answered).

:func:`images` (in the test) replays the log. The disk after a power cut at any point is, in the
worst case POSIX allows: each file holds what it held at its last ``fsync`` (nothing, if it never
had one and did not exist before the recording); each directory holds the entries it had at its last
``fsync`` (the ones it had before the recording, if none). Everything else is dropped: writes,
creations, renames, links, unlinks, ``mkdir``. That image changes only at an ``fsync``, so one
image per ``fsync`` covers every point at which the power can go.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Key = tuple[int, int]  # (inode, generation)
Listing = dict[str, tuple[Key, bool]]  # name -> (its inode, is a directory)


class Recorder:
    """Log the fsyncs under ``root`` to ``log_path``; :meth:`install` patches ``os``."""

    def __init__(self, root: str, log_path: str) -> None:
        self.root = os.path.abspath(root)
        self._real: dict[str, Callable[..., Any]] = {}
        self._lock = threading.RLock()  # the store's worker thread writes too: one order for all
        self._generation: dict[int, int] = {}  # inode -> generation, for inodes created here
        self._fds: dict[int, int] = {}  # open fd under root -> inode
        self._log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _inside(self, path: Any) -> bool:
        full = os.path.abspath(os.fsdecode(os.fspath(path)))
        return full == self.root or full.startswith(self.root + os.sep)

    def _key(self, ino: int) -> Key:
        return ino, self._generation.get(ino, 0)

    def _created(self, ino: int) -> None:
        self._generation[ino] = self._generation.get(ino, 0) + 1

    def mark(self, *event: Any) -> None:
        """Add ``event`` to the log (``("ack", 7)``), in order with the fsyncs."""
        with self._lock:
            self._write(event)

    def _write(self, event: tuple[Any, ...]) -> None:
        data = pickle.dumps(event)
        self._real["write"](self._log, len(data).to_bytes(4, "big") + data)

    def install(self) -> None:
        real = self._real
        for name in ("open", "mkdir", "fsync", "fdatasync", "close", "write"):
            real[name] = getattr(os, name)

        def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            if dir_fd is not None or not self._inside(path):
                return real["open"](path, flags, mode, dir_fd=dir_fd)
            with self._lock:
                new = bool(flags & os.O_CREAT) and (bool(flags & os.O_EXCL) or not os.path.lexists(path))
                fd = real["open"](path, flags, mode)
                ino = os.fstat(fd).st_ino
                if new:
                    self._created(ino)
                self._fds[fd] = ino
                return fd

        def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
            if dir_fd is not None or not self._inside(path):
                return real["mkdir"](path, mode, dir_fd=dir_fd)
            with self._lock:
                real["mkdir"](path, mode)
                self._created(os.lstat(path).st_ino)
            return None

        def fsync(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            with self._lock:
                real["fsync"](fd)
                if fd in self._fds:
                    self._write(self._snapshot(fd))

        def close(fd: int) -> None:
            with self._lock:
                self._fds.pop(fd, None)
                real["close"](fd)

        os.open, os.mkdir, os.fsync, os.fdatasync, os.close = open_, mkdir, fsync, fsync, close  # type: ignore[assignment]
        for name in ("write", "ftruncate", "replace", "rename", "link", "unlink", "remove", "rmdir"):
            setattr(os, name, self._noted(name, getattr(os, name)))

    def _noted(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call``, logged as a mark when it touches the tree: where a cut fell, for messages."""

        def noted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                result = call(*args, **kwargs)
                if args and isinstance(args[0], int):  # write, ftruncate: by fd
                    if args[0] in self._fds:
                        self._write(("op", name, f"inode {self._fds[args[0]]}"))
                elif any(self._inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
                    self._write(("op", name, *(os.path.relpath(os.fsdecode(os.fspath(a)), self.root) for a in args[:2]
                                               if isinstance(a, (str, bytes, os.PathLike)))))
                return result

        return noted

    def _snapshot(self, fd: int) -> tuple[Any, ...]:
        """What an fsync of ``fd`` made durable: a file's bytes, or a directory's entries."""
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            listing: Listing = {}
            for name in os.listdir(fd):
                entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
                listing[name] = (self._key(entry.st_ino), stat.S_ISDIR(entry.st_mode))
            return "dir", self._key(st.st_ino), listing
        reader = self._real["open"](f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(reader, 1 << 20):
                chunks.append(chunk)
        finally:
            self._real["close"](reader)
        return "file", self._key(st.st_ino), b"".join(chunks)


# ---------------------------------------------------------------------------------- the parent side


class Baseline:
    """The tree under ``root`` before the recording: all of it on disk (generation 0)."""

    def __init__(self, root: Path) -> None:
        self.root_key: Key = (root.stat().st_ino, 0)
        self.dirs: dict[Key, Listing] = {}
        self.files: dict[Key, bytes] = {}
        self._scan(root)

    def _scan(self, directory: Path) -> None:
        listing: Listing = {}
        for entry in os.scandir(directory):
            st = entry.stat(follow_symlinks=False)
            key, is_dir = (st.st_ino, 0), stat.S_ISDIR(st.st_mode)
            listing[entry.name] = (key, is_dir)
            if is_dir:
                self._scan(Path(entry.path))
            else:
                self.files[key] = Path(entry.path).read_bytes()
        self.dirs[(directory.stat().st_ino, 0)] = listing


def read_log(path: Path) -> list[tuple[Any, ...]]:
    """The events of a recorder's log, in order; a record the end of the process cut is dropped."""
    data, events, pos = path.read_bytes(), [], 0
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        if pos + 4 + size > len(data):
            break
        events.append(pickle.loads(data[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return events


class Image:
    """The disk after a power cut at event ``at`` of the log (``-1``: before the first)."""

    def __init__(self, at: int, dirs: dict[Key, Listing], files: dict[Key, bytes], baseline: Baseline) -> None:
        self.at, self._dirs, self._files, self._baseline = at, dirs, files, baseline

    def tree(self) -> dict[str, bytes | None]:
        """Every path under the root (relative, ``/``-separated) with its bytes; None for a directory."""
        found: dict[str, bytes | None] = {}
        stack = [(self._baseline.root_key, "")]
        while stack:
            key, prefix = stack.pop()
            for name, (child, is_dir) in self._dirs.get(key, self._baseline.dirs.get(key, {})).items():
                found[prefix + name] = None if is_dir else self._content(child)
                if is_dir:
                    stack.append((child, f"{prefix}{name}/"))
        return found

    @staticmethod
    def write(tree: dict[str, bytes | None], target: Path) -> None:
        """Lay ``tree`` out at ``target`` (in the place of the recorder's root)."""
        target.mkdir(mode=0o700)
        for path, content in sorted(tree.items()):  # a directory before what it holds
            if content is None:
                (target / path).mkdir(mode=0o700)
            else:
                (target / path).write_bytes(content)

    def _content(self, key: Key) -> bytes:
        if key in self._files:
            return self._files[key]
        if key[1] > 0:
            return b""  # created during the recording, never fsynced
        if key not in self._baseline.files:
            raise AssertionError(f"inode {key[0]} appeared without a call the recorder wraps: the model "
                                 "misses a way the code creates files")
        return self._baseline.files[key]


def images(events: list[tuple[Any, ...]], baseline: Baseline) -> Iterator[tuple[Image, list[Any]]]:
    """Every distinct power-cut image, with the marks logged while it was the disk's worst case
    (from its fsync to the next one): a cut anywhere in that span leaves exactly this image."""
    dirs: dict[Key, Listing] = {}
    files: dict[Key, bytes] = {}
    at, marks = -1, []
    for index, event in enumerate(events):
        if event[0] in ("dir", "file"):
            yield Image(at, dict(dirs), dict(files), baseline), marks
            (dirs if event[0] == "dir" else files)[event[1]] = event[2]
            at, marks = index, []
        else:
            marks.append(event)
    yield Image(at, dict(dirs), dict(files), baseline), marks


@contextlib.contextmanager
def recording(root: str, log_path: str) -> Iterator[Recorder]:
    recorder = Recorder(root, log_path)
    recorder.install()
    yield recorder
