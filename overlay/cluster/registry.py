"""The processes that serve one store on this machine, found through the file system.

Each process that installed the overlay has a directory of its own::

    <runtime>/<store key>/<pid>-<start time>/
        sock        a Unix socket: how a push reaches this process (see ``overlay.cluster.member``)
        info.json   pid, when it started, the address it listens on (if any)
        tree/       its source tree: the files of the version this process runs, and only those

``<runtime>`` is ``HABANERO_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/habanero``, else
``<temp dir>/habanero-<uid>``: outside the project, so that the file watchers of dev reloaders
(uvicorn ``--reload`` watches the working directory) never see a push rewrite a tree. ``<store key>``
names the store by its real path, so every process of one store meets in one directory whatever
their working directory. The directories are created with mode 0700 and refused unless owned by
this user: the tree files are read by the app (templates, data), so whoever could write them could
change what runs.

A process is alive while a process with its pid exists *and* started at the recorded time (from
``/proc``): a recycled pid is not mistaken for it. The directories of dead processes are removed by
whichever process next walks the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlay.errors import ConfigError
from overlay.storage import fs

__all__ = ["Registry", "WorkerEntry", "process_start", "runtime_root"]

logger = logging.getLogger("overlay.cluster")

SOCKET = "sock"
INFO = "info.json"
TREE = "tree"
#: The longest path a Unix socket may have on Linux is 107 bytes; keep well inside it.
_MAX_SOCKET_PATH = 100


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold anything: count fields after it.
    fields = raw.rpartition(b")")[2].split()
    try:
        return int(fields[19])  # field 22, starttime
    except (IndexError, ValueError):
        return None


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
    """One process's directory in the registry."""

    path: Path
    pid: int
    start: int

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
        return process_start(self.pid) == self.start

    def info(self) -> dict[str, Any]:
        try:
            value = json.loads((self.path / INFO).read_bytes())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


class Registry:
    """The worker directories of one store (see the module docstring)."""

    def __init__(self, store: Path, *, root: Path | None = None) -> None:
        real = os.path.realpath(store)
        key = hashlib.sha256(real.encode()).hexdigest()[:16]
        self.store = Path(real)
        self.root = (root or runtime_root()) / key

    def ensure(self) -> None:
        """Create the registry's directories (mode 0700), refusing any not owned by this user."""
        for directory in (self.root.parent, self.root):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)
            _check_private(directory)
        with contextlib.suppress(FileExistsError):  # so that someone looking knows what this is
            fd = os.open(self.root / "STORE", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{self.store}\n")

    def create(self, info: dict[str, Any]) -> WorkerEntry:
        """This process's directory, new and empty but for its info."""
        self.ensure()
        pid = os.getpid()
        start = process_start(pid)
        if start is None:
            raise ConfigError("cannot read /proc/self/stat: habanero's worker processes need Linux's /proc",
                              code="bad_config")
        entry = WorkerEntry(self.root / f"{pid}-{start}", pid, start)
        if entry.path.exists():  # a process with our pid and start time cannot have left one: clear it
            shutil.rmtree(entry.path, ignore_errors=True)
        entry.path.mkdir(mode=0o700)
        if len(os.fsencode(entry.socket)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"the worker directory {entry.path} is too long a path for a Unix socket; "
                              "set HABANERO_RUNTIME_DIR to a shorter directory", code="bad_config")
        fs.write_atomic(entry.path / INFO, json.dumps({"pid": pid, "started": time.time(), **info}).encode(),
                        sync=False, sync_dir=False)
        return entry

    def entries(self) -> list[WorkerEntry]:
        """Every worker directory, live or not, in the order the processes started."""
        found = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        for name in names:
            pid, sep, start = name.partition("-")
            if sep and pid.isdigit() and start.isdigit():
                found.append(WorkerEntry(self.root / name, int(pid), int(start)))
        return sorted(found, key=lambda e: (e.start, e.pid))

    def live(self) -> list[WorkerEntry]:
        """The entries of processes that are still running; the others are removed."""
        alive = []
        for entry in self.entries():
            if entry.alive():
                alive.append(entry)
            else:
                self.remove(entry)
        return alive

    def remove(self, entry: WorkerEntry) -> None:
        """Take a dead process's directory away (a rename: atomic for anyone listing), then delete it."""
        doomed = self.root / f"{fs.TMP_PREFIX}{entry.id}"
        try:
            os.replace(entry.path, doomed)
        except OSError:
            return  # someone else took it already
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("removed the worker directory of process %d, which has stopped", entry.pid)


def _check_private(directory: Path) -> None:
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"{directory} is not a private directory of this user (it must be a directory owned by uid "
            f"{os.getuid()} with mode 0700): another user could change the files habanero serves; remove "
            "it, or set HABANERO_RUNTIME_DIR to a directory of your own", code="bad_config")
