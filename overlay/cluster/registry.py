"""The processes that serve one store on this machine, found through the file system.

Each process that installed the overlay holds a *slot* of its own, the lowest one free::

    <runtime>/<store key>/
        w0.lock        flock()ed by the process holding slot 0, for as long as it lives
        w0/
            sock       a Unix socket: how a push reaches this process (``overlay.cluster.member``)
            info.json  its pid, when it started, the address it listens on (if any)
            tree/      its source tree: the files of the version it runs, and only those

A slot is held while its lock is: the kernel releases it when the process ends, however it ends,
so a slot is free exactly when its process is gone (a recycled pid fools nothing). Slots are reused
lowest first, so a process that restarts finds its tree where it was: ``__file__`` paths, and the
compiled code cached for them, stay the same from one run to the next.

``<runtime>`` is ``HABANERO_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/habanero``, else
``<temp dir>/habanero-<uid>``: outside the project, so that the file watchers of dev reloaders
(uvicorn ``--reload`` watches the working directory) never see a push rewrite a tree. The store
records the one its processes use (``<store>/runtime``), and a process whose environment points
elsewhere follows it when it can, and warns when it cannot: processes that do not meet would
take pushes apart. The registry's directory is held with a shared ``flock`` while processes use it,
which ``systemd-tmpfiles`` honours: a quiet week does not age the slots out of ``/tmp``. ``<store key>``
names the store by its real path, so every process of one store meets in one directory whatever
its working directory. The directories are created with mode 0700 and refused unless owned by this
user: the tree files are read by the app (templates, data), so whoever could write them could
change what runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay.errors import ConfigError
from overlay.storage import fs

__all__ = ["Registry", "WorkerEntry", "runtime_root"]

logger = logging.getLogger("overlay.cluster")

SOCKET = "sock"
#: In the store: the runtime root its processes last met in (see ``_agreed_root``).
RECORD = "runtime"
INFO = "info.json"
TREE = "tree"
#: The longest path a Unix socket may have on Linux is 107 bytes; keep well inside it.
_MAX_SOCKET_PATH = 100
#: More slots than this would mean thousands of processes on one store: a leak, not an app.
_MAX_SLOTS = 4096


def _recorded(record: Path) -> Path | None:
    try:
        text = fs.read_small(record).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text) if text.startswith("/") and "\0" not in text else None


def _agreed_root(record: Path) -> Path:
    """The runtime root the store's other processes use, when this one can use it too.

    Processes of one app may resolve ``runtime_root()`` differently (one service sets
    ``XDG_RUNTIME_DIR`` and another does not, a different ``TMPDIR``): they would never meet, and
    a push would reach some of them only. So the store records where its processes meet
    (``<store>/runtime``) and a process follows it unless told otherwise by
    ``HABANERO_RUNTIME_DIR``, or unable to (another mount namespace, another user's directory).
    """
    mine = runtime_root()
    theirs = _recorded(record)
    if theirs is None or theirs == mine:
        return mine
    explicit = bool(os.environ.get("HABANERO_RUNTIME_DIR", "").strip())
    usable = False
    with contextlib.suppress(OSError, ConfigError):
        _check_private(theirs)
        usable = True
    if usable and not explicit:
        return theirs
    logger.warning("the other processes of store %s meet in %s, and this one in %s (%s): pushes to either "
                   "side will not reach the other; give every process of the app the same "
                   "HABANERO_RUNTIME_DIR", record.parent, theirs, mine,
                   "HABANERO_RUNTIME_DIR says so" if explicit else "it cannot use theirs")
    return mine


def runtime_root() -> Path:
    """Where the worker directories of every store of this user live (see the module docstring)."""
    chosen = os.environ.get("HABANERO_RUNTIME_DIR", "").strip()
    if chosen:
        return Path(chosen).absolute()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "habanero"
    return Path(tempfile.gettempdir()) / f"habanero-{os.getuid()}"


@dataclass(frozen=True)
class WorkerEntry:
    """One slot of the registry and the process that held it when it was read."""

    path: Path
    pid: int

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def socket(self) -> Path:
        return self.path / SOCKET

    @property
    def tree(self) -> Path:
        return self.path / TREE

    def alive(self) -> bool:
        """Whether the slot is still held (by this process or the one that held it)."""
        return _held(self.path.with_name(self.path.name + ".lock"))

    def info(self) -> dict[str, Any]:
        try:
            value = json.loads(fs.read_small(self.path / INFO))
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


class Registry:
    """The slots of one store (see the module docstring)."""

    def __init__(self, store: Path, *, root: Path | None = None) -> None:
        real = os.path.realpath(store)
        key = hashlib.sha256(real.encode()).hexdigest()[:16]
        self.store = Path(real)
        self._record = self.store / RECORD
        self.root = (root or _agreed_root(self._record)) / key
        self._held: int | None = None  # the fd that holds this process's slot
        self._pinned: int | None = None  # the registry directory, held LOCK_SH while we use it

    def ensure(self) -> None:
        """Create the registry's directories (mode 0700), refusing any not owned by this user.

        The registry's directory is then held with a shared ``flock`` for as long as this process
        uses it: ``systemd-tmpfiles`` does not age out a locked directory, and the files in it
        (locks, trees whose files keep an old mtime) would otherwise look stale after ten days in
        ``/tmp`` without a push, and be deleted under the processes using them.
        """
        for directory in (self.root.parent, self.root):
            try:
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700)
            except OSError as exc:
                raise ConfigError(f"cannot create habanero's runtime directory {directory} ({exc.strerror}); "
                                  "set HABANERO_RUNTIME_DIR to a directory of your own", code="bad_config") from None
            _check_private(directory)
        if self._pinned is None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._pinned = fd
        if _recorded(self._record) != self.root.parent:  # where the next process of this store looks
            with contextlib.suppress(OSError):
                fs.write_atomic(self._record, f"{self.root.parent}\n".encode(), sync=False, sync_dir=False)
        with contextlib.suppress(FileExistsError):  # so that someone looking knows what this is
            fd = os.open(self.root / "STORE", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{self.store}\n")

    def create(self, info: dict[str, Any]) -> WorkerEntry:
        """Take the lowest free slot for this process, held until it ends (or :meth:`remove`)."""
        self.ensure()
        for n in range(_MAX_SLOTS):
            lock = self.root / f"w{n}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._held = fd  # first: a child forked while we lock it must know to close its copy
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._held = None
                os.close(fd)
                continue
            if not _same_file(fd, lock):  # the file was replaced meanwhile: that lock guards nothing
                self._held = None
                os.close(fd)
                continue
            return self._prepare(self.root / f"w{n}", info)
        raise ConfigError(f"{self.root} has {_MAX_SLOTS} live processes; that is a leak of processes, not an app",
                          code="bad_config")

    def _prepare(self, path: Path, info: dict[str, Any]) -> WorkerEntry:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        _check_private(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / SOCKET)  # the last holder's, who is gone
        if len(os.fsencode(path / SOCKET)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"the worker directory {path} is too long a path for a Unix socket; "
                              "set HABANERO_RUNTIME_DIR to a shorter directory", code="bad_config")
        fs.write_atomic(path / INFO, json.dumps({"pid": os.getpid(), "started": time.time(), **info}).encode(),
                        sync=False, sync_dir=False)
        return WorkerEntry(path, os.getpid())

    def live(self, *, skip: str | None = None) -> list[WorkerEntry]:
        """The slots held now, lowest first; ``skip`` names one not to look at (this process's own)."""
        found = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        for name in names:
            if not (name.startswith("w") and name.endswith(".lock") and name[1:-5].isdigit()) or name[:-5] == skip:
                continue
            path = self.root / name[:-5]
            if _held(self.root / name):
                found.append(WorkerEntry(path, int(WorkerEntry(path, 0).info().get("pid") or 0)))
        return sorted(found, key=lambda e: int(e.id[1:]))

    def remove(self, entry: WorkerEntry) -> None:
        """Give this process's slot back (its tree stays, for whoever takes the slot next)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.socket)
        self.release()

    def release(self) -> None:
        for fd in (self._held, self._pinned):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._held = self._pinned = None

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's slot is the parent's (the lock's open file is shared)."""
        self.release()  # the parent keeps its own descriptors, hence its locks


def _held(lock: Path) -> bool:
    """Whether some process holds the flock on ``lock`` (this one included, through another fd).

    Probed with a shared lock: were this process to fork while it holds the probe, the child's
    copy would keep a shared lock, which no probe takes for a live slot and no ``create`` can take.
    """
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we just took: the slot stays free
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _check_private(directory: Path) -> None:
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{directory} is not a private directory of this user (it must be a directory owned by uid "
            f"{os.getuid()} with mode 0700): another user could change the files habanero serves; remove "
            "it, or set HABANERO_RUNTIME_DIR to a directory of your own", code="bad_config")
