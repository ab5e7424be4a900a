"""Opening a store: check its layout, make its directories, repair what a crash left, and pick the
bundle to serve.

Opening never waits and never raises for a damaged store. What a crash can leave (temp files,
staged bundles that never committed, one whose move to ``bundles/`` was cut short after its commit
point, bundles above the highest version) is cleaned up only while no writer runs and no deploy is
under way; else a later open does it. The state file's active bundle is re-verified against the
current trusted keys; when it fails, the newest earlier bundle that verifies is served, down to none
(the code on disk). A fallback is reported (``Opened.problems``), not written: the pointer changes
only through a commit.

Whoever can write the store chooses what runs: a symbolic link, or a file of another type, where
habanero writes a directory or a file makes the store read-only (``unsafe_layout``): it serves what
verifies and refuses every write with ``store_unsafe`` (``unsafe_error``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from overlay.bundle import Bundle
from overlay.errors import StoreError
from overlay.storage import fs
from overlay.storage.bundles import BundleFiles, short
from overlay.storage.history import ACTIONS, History
from overlay.storage.objects import ObjectStore
from overlay.storage.retention import Retention
from overlay.storage.state import StateFile
from overlay.storage.tree import foreign_files
from overlay.storage.worker import Worker

__all__ = ["Opened", "prepare", "recover", "unsafe_error", "unsafe_layout"]

logger = logging.getLogger("overlay.store")

#: What the store writes at its root: directories, then files (``unsafe_layout`` checks them).
_DIRECTORIES = ("bundles", "staged", "objects", "pycache")
_FILES = ("state.json", "history.jsonl", "lock", "deploy.lock", "requests.jsonl")


def unsafe_layout(root: Path, *, shards: bool) -> list[str]:
    """What makes the store at ``root`` unsafe to write: a symbolic link, or a file of another type,
    where habanero writes a directory or a file (with ``shards``, the directories of ``objects/``
    too: a ``scandir``). Empty when every one is what it should be, or absent."""
    base = os.fspath(root)
    problems = [p for name in _DIRECTORIES if (p := fs.unsafe_entry(os.path.join(base, name), directory=True))]
    problems += [p for name in _FILES if (p := fs.unsafe_entry(os.path.join(base, name), directory=False))]
    if shards and not problems:
        with contextlib.suppress(OSError):
            for entry in os.scandir(root / "objects"):
                if not entry.name.startswith(fs.TMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
                    problems.append(fs.unsafe_entry(entry.path, directory=True) or f"{entry.path} is not a directory")
    return problems


def unsafe_error(root: Path, problem: str, active: Bundle | None) -> StoreError:
    """The ``store_unsafe`` refusal of a write to the store at ``root``, for ``problem``."""
    serving = f"v{active.version}" if active is not None else "the code on disk"
    return StoreError(
        f"the habanero store {root} is not safe to write: {problem}. habanero never writes through a "
        "symbolic link or into a file it did not create in its store (whoever placed it could choose what "
        f"runs or what gets overwritten); nothing changed and {serving} still serves: check who put it "
        "there, remove it, and restart the app", code="store_unsafe", path=str(root))


def prepare(root: Path, *, lock_timeout: float) -> tuple[fs.FileLock, list[str]]:
    """Make the store's directories at ``root`` (mode 0700) and open its writers' lock; with what
    makes it unsafe to write (then the lock excludes this process's threads only, with no file).
    Raises :class:`StoreError` when the directory cannot be used at all."""
    try:
        fs.make_dirs((root,), mode=0o700)  # durable in its parent: see fs.make_dirs
        unsafe = unsafe_layout(root, shards=True)
        # What is wrong is reported; the rest is made.
        fs.make_dirs([d for d in (root / n for n in ("bundles", "staged", "objects")) if not d.is_symlink()],
                     mode=0o700)
        try:
            lock = fs.FileLock(root / "lock", timeout=lock_timeout, local=bool(unsafe))
        except (fs.NotARegularFile, OSError) as exc:
            if exc.errno not in (errno.ELOOP, errno.EINVAL, errno.ENXIO, errno.EISDIR):
                raise
            unsafe.append(f"{root / 'lock'} is not a regular file habanero created")
            lock = fs.FileLock(root / "lock", timeout=lock_timeout, local=True)
    except OSError as exc:
        raise StoreError(f"cannot use {root} as the habanero store ({exc.strerror or exc}); point "
                         "it at a directory this process can create and write", path=str(root)) from None
    if root.stat().st_mode & 0o022:
        logger.warning("store %s is writable by other users, who could change what code runs: "
                       "chmod 700 it", root)
    return lock, unsafe


def deploy_lock(root: Path, unsafe: list[str]) -> fs.FileLock:
    """The lock one deploy at a time holds (``deploy.lock``); in-process only, with ``unsafe`` told
    why, when the store is unsafe to write or its file is not one habanero created."""
    try:
        return fs.FileLock(root / "deploy.lock", timeout=60.0, local=bool(unsafe))
    except OSError:
        unsafe.append(f"{root / 'deploy.lock'} is not a regular file habanero created")
        return fs.FileLock(root / "deploy.lock", timeout=60.0, local=True)


def cache_dir(root: Path) -> Path | None:
    """``<root>/pycache``, created on demand; None (code is cached in memory only) when something
    else than a directory of ours is in its place."""
    path = root / "pycache"
    problem = fs.unsafe_entry(path, directory=True)
    if problem is None:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        problem = fs.unsafe_entry(path, directory=True)
    if problem is not None:
        logger.error("habanero store %s: %s; compiled code is not written there (habanero never writes "
                     "through a symbolic link in its store): remove it", root, problem)
        return None
    return path


class Opened(NamedTuple):
    """What :func:`recover` found: the bundle to serve, the highest accepted version, and what is
    wrong (each one logged as an error already)."""

    active: Bundle | None
    highest: int
    problems: list[str]


def recover(files: BundleFiles, state: StateFile, history: History, retention: Retention, worker: Worker, *,
            deploy_lock: fs.FileLock, lock: fs.FileLock, unsafe: Sequence[str]) -> Opened:
    """Repair what a crash left in the store of ``files`` and pick the bundle to serve.

    Leftovers are leftovers only while no writer runs and no deploy is under way: they are cleaned
    up if both ``deploy_lock`` and ``lock`` (the writers') are free right now, else left to a later
    open (starting never waits).
    """
    root = files.root
    problems: list[str] = []
    for problem in unsafe:
        message = (f"{problem}: habanero never writes through a symbolic link or into a file it did not "
                   "create in its store; it serves what verifies and refuses every push and rollback until "
                   "that is removed (check who put it there: whoever can write the store chooses what runs)")
        logger.error("habanero store %s: %s", root, message)
        problems.append(message)
    with deploy_lock.attempt() as no_deploy, lock.attempt() as free:
        idle = no_deploy and free and not unsafe
        if idle:
            objects_dir = Path(files.objects.root)
            objects = [d for d in objects_dir.iterdir() if d.is_dir()]
            for path in fs.remove_orphans([root, files.bundles, files.staged, objects_dir, *objects]):
                logger.warning("removed %s, left by an interrupted write", path)
            for legacy in ("trees", "tree"):  # the shared trees of an older habanero
                if (root / legacy).is_dir():
                    _remove_legacy(root / legacy, files.objects, worker)
        found, why = state.read()
        if idle:
            files.clear_staged(found["active"] if found is not None else None)
        if idle and why == "missing" and not files.stored() and not history.read():
            # A new store gets its state file now, so a crash during the first commit leaves a
            # pointer to "nothing" and an unreferenced bundle, never a store without a pointer.
            state.write(None, 0)
            found, why = state.read()
        if idle and found is not None:
            retention.drop_above(found["highest"], keep=found["active"], reason="its commit did not finish")
    if found is not None:
        pointer = found["active"]
        highest = max(found["highest"], pointer["version"] if pointer else 0)
        if pointer is None:
            return Opened(None, highest, problems)
        active, why = files.verify(pointer["version"], pointer["digest"])
        if active is None:
            active = _fall_back(files, f"active bundle v{pointer['version']} ({short(pointer['digest'])}) "
                                f"cannot be served: {why}", problems, below=pointer["version"])
        return Opened(active, highest, problems)
    # No usable pointer: rebuild the mark from what is on disk, never lower than it was.
    commits = [e for e in history.read() if e.get("outcome") == "ok" and e.get("action") in ACTIONS
               and type(e.get("version")) is int]
    highest = max([v for v, _ in files.stored()] + [e["version"] for e in commits], default=0)
    if why == "missing" and highest == 0:
        return Opened(None, 0, problems)  # a new store
    # After a rollback the last commit is not the newest bundle: prefer what history says.
    active = _fall_back(files, f"state file {root / 'state.json'} is {why}", problems, below=None,
                        prefer=commits[-1].get("digest") if commits else None)
    return Opened(active, highest, problems)


def _remove_legacy(directory: Path, objects: ObjectStore, worker: Worker) -> None:
    """Remove an older habanero's tree, unless the app wrote files into it (its ``__file__``
    paths pointed there): then it stays, whole, and a warning names them."""
    foreign = foreign_files(directory, objects)
    if not foreign:
        worker.remove_later(directory)
        return
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    logger.warning("%s, the source tree of an older habanero, holds files habanero did not write (%s): it is "
                   "left in place; move what the app needs of them into the project directory, then delete "
                   "%s", directory, shown, directory)


def _fall_back(files: BundleFiles, problem: str, problems: list[str], *, below: int | None,
               prefer: str | None = None) -> Bundle | None:
    """The newest stored bundle below ``below`` that verifies, with ``problem`` and why each newer
    one did not logged and added to ``problems``."""
    active, skipped = files.newest_verifying(lambda v: below is None or v < below, prefer)
    serving = ("no stored bundle verifies: serving the code on disk" if active is None else
               f"serving v{active.version} ({short(active.digest)}) instead")
    for message in (f"{problem}; {serving}", *skipped):
        logger.error("habanero store %s: %s", files.root, message)
        problems.append(message)
    return active
