"""The store: every accepted version of an app's code, on disk, surviving ``kill -9``.

Layout (the directory is created with mode 0700: whoever can write it decides what code runs)::

    <store>/
      state.json      the pointer, the single source of truth, replaced atomically:
                      {"format": 1, "app_id": "shop", "active": {"version": 7, "digest": "<sha256>"}
                       | null, "highest": 9}
      bundles/        0000000007-<digest>.hbn: accepted bundles, byte for byte, read-only
      staged/         0000000008-<digest>.hbn: written by stage(), moved to bundles/ by commit()
      objects/        ab/<sha256>: every stored version's file bodies by content, read-only
      deploy.lock     flock()ed by the process that runs a deploy, for the whole of it
      pycache/        compiled code, owned by the finder
                      (while the active version is on probation, also "permanent": the last
                      permanent version, which a restart boots; see overlay.storage.state)
      history.jsonl   one JSON object per push, rollback, revert, verdict, failure or reset; append-only
      requests.jsonl  the nonces of signed control requests within their window (overlay.storage.requests)
      lock            flock()ed by writers only; readers never wait
      .tmp-*          (anywhere above) what an interrupted write left; open() removes it

Crash safety: every file is written to a temp name and renamed into place (``overlay.storage.fs``).
``commit()`` replaces ``state.json`` first, and that replace is the commit point: a ``kill -9`` at
any moment leaves the old pointer or the new one. Only then does the bundle move from ``staged/`` to
``bundles/``, so ``bundles/`` holds committed versions only: a push whose commit failed can never be
rolled back to or started on. A committed bundle whose move a crash cut short is read from
``staged/`` and moved by the next ``open()``.

Power cuts: ``sync`` says when a commit reaches the disk itself. ``"background"`` (the default) has
the page cache hold it when the push answers (a ``kill -9`` or a crash of the app loses nothing) and
a worker thread fsyncs every file and directory it wrote right after the answer; a power cut in
those milliseconds may boot the previous version (the store falls back to the newest bundle that
verifies) and forget that the newest version was accepted. ``"commit"`` fsyncs before the push
answers (a few fsyncs, about 3 ms a push here): an acknowledged push survives a power cut.

What a crash can leave is recognisable and removed by ``open()``: temp files, and staged bundles
the state file does not name (an older habanero promoted before its pointer flip: such a bundle's
version is above ``highest``, which no committed bundle's is, and it is dropped).

Who can write this directory decides what code runs: a local user with write access can replace
the state file, the trusted keys' effect (by planting a bundle signed by a key they also add to the
trusted-keys file, if they can write that too) or the objects. What habanero does about it: every
bundle is verified against the trusted keys at every open; a symbolic link or a foreign file where
the store keeps its own opens the store read-only (``store_unsafe``: it serves the newest version
that verifies and refuses pushes), and nothing is ever written through a link or outside the store.
See ``docs/threat-model.md``.

Shared by processes: every process of an app opens the same store. Each change re-reads the state
file under the lock and derives from what is on disk, never from what this process last saw: the
highest accepted version never goes down, whichever process writes. One deploy runs at a time
(``deploying()``). The files each process serves are its own (its source tree, see
``overlay.storage.tree``), laid out from the objects here.

Nothing on disk is trusted: ``open()`` re-verifies the active bundle against the current trusted
keys and, when it fails, serves the newest earlier bundle that verifies, down to none (the code on
disk). A fallback is reported, not written: the pointer changes only through ``commit()``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from overlay.bundle import DEFAULT_LIMITS, Bundle, Entry, Limits, open_bundle
from overlay.errors import DeployInProgress, HabaneroError, StaleVersion, StoreError, WrongApp
from overlay.keys import TrustedKeys
from overlay.storage import fs
from overlay.storage.mirror import Mirror, homes_of
from overlay.storage.objects import ObjectStore
from overlay.storage.requests import SeenRequests
from overlay.storage.state import Pointer, State, StateFile, pointer_to
from overlay.storage.tree import SourceTree, foreign_files
from overlay.storage.worker import Task, Worker

__all__ = ["SYNC_MODES", "Store", "write_atomic"]

logger = logging.getLogger(__name__)

ACTIONS = ("push", "rollback", "revert")  # revert: probation's rollback to the last permanent version
SYNC_MODES = ("background", "commit")
#: Dropped versions between two object sweeps: a sweep reads every stored manifest (milliseconds
#: of a worker thread), and what waits for it is only disk space.
SWEEP_EVERY = 10
_NAME = re.compile(r"^(\d{1,30})-([0-9a-f]{64})(\.hbn)?$")  # bundles/ and staged/ files
#: Replace a file atomically: the one helper every writer of habanero uses (see ``overlay.storage.fs``).
write_atomic = fs.write_atomic


def _short(digest: str) -> str:
    return digest[:12] + "…"


def _stem(version: int, digest: str) -> str:
    return f"{version:010d}-{digest}"


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


def _read_file(path: Path, limit: int) -> bytes:
    """A stored file's bytes: never through a symbolic link, never from a FIFO or a device (which
    would block or never end), never more than ``limit`` bytes. ``ValueError`` says what is wrong."""
    try:
        raw = fs.read_small(path, flags=os.O_NOFOLLOW | os.O_NONBLOCK, limit=limit + 1, regular=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("is a symbolic link, which habanero never follows in its store") from None
        raise
    if len(raw) > limit:
        raise ValueError("is larger than any bundle may be")
    return raw


class Store:
    """The versions of one app's code on disk; the module docstring has the layout and guarantees.

    Example::

        store = Store.open(".habanero/store", trusted=load_trusted_keys("trusted_keys"), app_id="shop")
        store.check_fresh(bundle); store.stage(bundle); ...; store.commit(bundle)
    """

    def __init__(self, path: Path, *, trusted: TrustedKeys, app_id: str, limits: Limits, keep: int,
                 max_version_jump: int, lock: fs.FileLock, sync: str = "background",
                 unsafe: Sequence[str] = ()) -> None:
        self.path, self.app_id, self.trusted, self.limits = path, app_id, trusted, limits
        self.keep, self.max_version_jump, self.sync = keep, max_version_jump, sync
        self.active: Bundle | None = None
        self.highest = 0
        self.startup_problems: list[str] = []
        self._lock = lock
        self._bundles, self._staged = path / "bundles", path / "staged"
        # The same as strings, for what every push does (a pathlib join costs more than the system call).
        self._bundles_dir, self._staged_dir = os.fspath(self._bundles), os.fspath(self._staged)
        self._state = StateFile(os.path.join(path, "state.json"), app_id)
        self._history_file = os.path.join(path, "history.jsonl")
        self._history = fs.RecordLog(Path(self._history_file))  # read incrementally
        self.objects = ObjectStore(os.fspath(path / "objects"), lock)
        #: What makes the store unsafe to write, found when it was opened: it is then only read.
        self.unsafe: list[str] = list(unsafe)
        try:
            self._deploy_lock = fs.FileLock(path / "deploy.lock", timeout=60.0, local=bool(unsafe))
        except OSError:
            self.unsafe.append(f"{path / 'deploy.lock'} is not a regular file habanero created")
            self._deploy_lock = fs.FileLock(path / "deploy.lock", timeout=60.0, local=True)
        if self.unsafe:
            self.objects.refuse = self._unsafe_error
        self.worker = Worker(str(path))
        self._written: list[str] = []  # files a staged push wrote, to flush once it commits
        #: The nonces of the control requests any process of the app took, until they expire.
        self.requests = SeenRequests(path / "requests.jsonl", lock, self._flush_later,
                                     sync=sync == "commit", writable=self.check_writable)
        self._dropped_since_sweep = 0
        #: Set by ``install(probation=...)``: a push committed from now on is probationary (the
        #: state file keeps the last permanent version until :meth:`make_permanent`).
        self.probation = False

    # ------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, trusted: TrustedKeys, app_id: str,
             limits: Limits = DEFAULT_LIMITS, keep: int = 20, max_version_jump: int = 1000,
             lock_timeout: float = 60.0, sync: str = "background") -> Store:
        """Open (or create) the store, repair what a crash left, and pick the bundle to serve.

        Never raises for a damaged store: problems land in ``startup_problems`` and the error log.
        Raises :class:`StoreError` when the directory cannot be used at all.
        """
        if keep < 0 or max_version_jump < 1:
            raise ValueError("keep must be >= 0 and max_version_jump >= 1")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        root = Path(os.path.abspath(path))  # normalised: tree paths are checked against it
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
        store = cls(root, trusted=trusted, app_id=app_id, limits=limits, keep=keep,
                    max_version_jump=max_version_jump, lock=lock, sync=sync, unsafe=unsafe)
        try:
            with store._io("repair the store"):
                store._recover()
        except BaseException:
            lock.close()
            raise
        return store

    def _recover(self) -> None:
        # Leftovers are leftovers only while no writer runs and no deploy is under way: clean up if
        # both locks are free right now, else leave it to a later open (starting never waits).
        for problem in self.unsafe:
            message = (f"{problem}: habanero never writes through a symbolic link or into a file it did not "
                       "create in its store; it serves what verifies and refuses every push and rollback until "
                       "that is removed (check who put it there: whoever can write the store chooses what runs)")
            logger.error("habanero store %s: %s", self.path, message)
            self.startup_problems.append(message)
        with self._deploy_lock.attempt() as no_deploy, self._lock.attempt() as free:
            idle = no_deploy and free and not self.unsafe
            if idle:
                objects_dir = Path(self.objects.root)
                objects = [d for d in objects_dir.iterdir() if d.is_dir()]
                dirs = [self.path, self._bundles, self._staged, objects_dir, *objects]
                for path in fs.remove_orphans(dirs):
                    logger.warning("removed %s, left by an interrupted write", path)
                for legacy in ("trees", "tree"):  # the shared trees of an older habanero
                    if (self.path / legacy).is_dir():
                        self._remove_legacy(self.path / legacy)
            state, why = self._read_state()
            if idle:
                self._clear_staged(state["active"] if state is not None else None)
            if idle and why == "missing" and not self.stored() and not self.history():
                # A new store gets its state file now, so a crash during the first commit leaves a
                # pointer to "nothing" and an unreferenced bundle, never a store without a pointer.
                self._state.write(None, 0)
                state, why = self._read_state()
            if idle and state is not None:
                self._drop_above(state["highest"], keep=state["active"], reason="its commit did not finish")
        if state is not None:
            pointer = state["active"]
            self.highest = max(state["highest"], pointer["version"] if pointer else 0)
            if pointer is not None:
                self.active, why = self._verify_file(pointer["version"], pointer["digest"])
                if self.active is None:
                    self._fall_back(f"active bundle v{pointer['version']} ({_short(pointer['digest'])}) "
                                    f"cannot be served: {why}", below=pointer["version"])
            return
        # No usable pointer: rebuild the mark from what is on disk, never lower than it was.
        commits = [e for e in self.history() if e.get("outcome") == "ok" and e.get("action") in ACTIONS
                   and type(e.get("version")) is int]
        self.highest = max([v for v, _ in self.stored()] + [e["version"] for e in commits], default=0)
        if why == "missing" and self.highest == 0:
            return  # a new store
        # After a rollback the last commit is not the newest bundle: prefer what history says.
        self._fall_back(f"state file {self.path / 'state.json'} is {why}", below=None,
                        prefer=commits[-1].get("digest") if commits else None)

    def _clear_staged(self, pointer: Pointer | None) -> None:
        """Empty staged/: a push there never committed, but for the one the state file names, whose
        move to bundles/ a crash cut short (see ``commit``): that one moves now."""
        committed = f"{_stem(pointer['version'], pointer['digest'])}.hbn" if pointer is not None else None
        for name in os.listdir(self._staged):
            if name == committed and not (self._bundles / name).exists():
                logger.warning("moved committed bundle %s from staged/ to bundles/: its commit was interrupted "
                               "after its commit point", name)
                os.replace(self._staged / name, self._bundles / name)
                continue
            logger.info("removed staged bundle %s: its push never committed", name)
            (self._staged / name).unlink()

    def _remove_legacy(self, directory: Path) -> None:
        """Remove an older habanero's tree, unless the app wrote files into it (its ``__file__``
        paths pointed there): then it stays, whole, and a warning names them."""
        foreign = foreign_files(directory, self.objects)
        if not foreign:
            self.worker.remove_later(directory)
            return
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        logger.warning("%s, the source tree of an older habanero, holds files habanero did not write (%s): it is "
                       "left in place; move what the app needs of them into the project directory, then delete "
                       "%s", directory, shown, directory)

    def _fall_back(self, problem: str, *, below: int | None, prefer: str | None = None) -> None:
        self.active, skipped = self._newest_verifying(lambda v: below is None or v < below, prefer)
        serving = ("no stored bundle verifies: serving the code on disk" if self.active is None else
                   f"serving v{self.active.version} ({_short(self.active.digest)}) instead")
        for message in (f"{problem}; {serving}", *skipped):
            logger.error("habanero store %s: %s", self.path, message)
            self.startup_problems.append(message)

    # ---------------------------------------------------------------------------- reading

    def _read_state(self) -> tuple[State | None, str]:
        """The state file as on disk now (another process may have committed), or None and why."""
        return self._state.read()

    def _verify_file(self, version: int, digest: str) -> tuple[Bundle | None, str]:
        """The stored bundle of ``(version, digest)``, verified, or None and why. Callers name a
        stored bundle or the state file's: a committed bundle whose move out of staged/ was cut short
        (see ``commit``) is read from there."""
        name = f"{_stem(version, digest)}.hbn"
        path = self._bundles / name
        try:
            raw = _read_file(path, self.limits.max_bundle_bytes)
        except FileNotFoundError:
            try:
                raw = _read_file(self._staged / name, self.limits.max_bundle_bytes)
            except OSError:
                return None, f"{path.name} is missing"
            except ValueError as exc:
                return None, f"{path.name} {exc}"
        except ValueError as exc:
            return None, f"{path.name} {exc}"
        except OSError as exc:
            return None, f"cannot read {path.name} ({exc.strerror})"
        try:
            bundle = open_bundle(raw, self.trusted, app_id=self.app_id, limits=self.limits,
                                 content=self.objects.get)
        except FileNotFoundError:
            return None, f"{path.name} is missing"
        except OSError as exc:
            return None, f"cannot read {path.name} ({exc.strerror})"
        except HabaneroError as exc:
            return None, f"{exc.code}: {exc.message}"
        if (bundle.version, bundle.digest) != (version, digest):
            return None, (f"{path.name} holds v{bundle.version} ({_short(bundle.digest)}), not what its "
                          "name says")
        return bundle, ""

    def _newest_verifying(self, which: Callable[[int], bool],
                          prefer: str | None = None) -> tuple[Bundle | None, list[str]]:
        """The newest stored bundle (``prefer`` first) whose version passes ``which`` and that
        verifies, and why each one skipped did not."""
        candidates = [(v, d) for v, d in reversed(self.stored()) if which(v)]
        candidates.sort(key=lambda vd: vd[1] != prefer)  # stable: newest first otherwise
        skipped: list[str] = []
        for version, digest in candidates:
            bundle, why = self._verify_file(version, digest)
            if bundle is not None:
                return bundle, skipped
            skipped.append(f"stored bundle v{version} ({_short(digest)}) does not verify: {why}")
        return None, skipped

    def stored(self) -> list[tuple[int, str]]:
        """``(version, digest)`` of every stored bundle, ascending."""
        try:
            names = os.listdir(self._bundles)
        except OSError:  # bundles/ is not a directory (reported at open)
            return []
        found = (_NAME.match(name) for name in names if name.endswith(".hbn"))
        return sorted((int(m[1]), m[2]) for m in found if m)

    def pointer(self) -> tuple[Pointer | None, int]:
        """The active version and the highest accepted one, as on disk now: what every process of
        the app should run (this process's ``active`` is what it last saw)."""
        state, _ = self._read_state()
        if state is None:
            return pointer_to(self.active), self.highest
        self.highest = state["highest"]
        return state["active"], state["highest"]

    def sync_active(self) -> Bundle | None:
        """The active bundle as the state file names it now (another process may have committed
        since this store was opened), verified; the one this store knew if that one does not verify."""
        state, _ = self._read_state()
        if state is None:
            return self.active
        self.highest = max(self.highest, state["highest"])
        pointer = state["active"]
        if pointer is not None and (self.active is None or self.active.digest != pointer["digest"]):
            bundle, why = self._verify_file(pointer["version"], pointer["digest"])
            if bundle is None:
                logger.error("habanero store %s: active bundle v%d cannot be served: %s", self.path,
                             pointer["version"], why)
            else:
                self.active = bundle
        return self.active

    def read_bundle(self, version: int, digest: str) -> bytes | None:
        """The bytes of a staged or stored bundle (unverified: open them with ``open_bundle``)."""
        name = f"{_stem(version, digest)}.hbn"
        for directory in (self._staged_dir, self._bundles_dir):
            path = os.path.join(directory, name)
            try:
                if os.stat(path).st_size <= self.limits.max_bundle_bytes:
                    return fs.read_small(path)
            except OSError:
                continue
        return None

    def names_active(self, digest: str) -> bool:
        """Whether the state file names the bundle ``digest`` active, read under the store's lock:
        the store's last word on a deploy, the one every process of the app gets."""
        with self._lock:
            pointer, _ = self.pointer()
        return pointer is not None and pointer["digest"] == digest

    def release(self, bundle: Bundle) -> None:
        """``bundle`` is committed: let it go of its file's bytes and bodies, which this store holds.

        Its bodies are read back from ``objects/`` when asked for (a module the code cache lacks,
        ``get_source``, the next push's diff), each checked against its hash; an object missing or
        damaged is read from the bundle's own file instead.
        """
        version, digest = bundle.version, bundle.digest
        opened: list[tuple[Bundle | None, str]] = []  # the bundle file, verified once if ever needed

        def read(entry: Entry) -> bytes | None:
            body = self.objects.get(entry.sha256, entry.size)
            if body is not None and len(body) == entry.size and hashlib.sha256(body).hexdigest() == entry.sha256:
                return body
            logger.warning("habanero store %s: object %s (%s, of v%d) is missing or damaged; reading it from "
                           "the bundle file", self.path, entry.sha256[:12], entry.name, version)
            if not opened:
                opened.append(self._verify_file(version, digest))
            whole, why = opened[0]
            twin = whole.by_hash.get(entry.sha256) if whole is not None else None
            if whole is None or twin is None:
                logger.error("habanero store %s: %s cannot be read back: %s", self.path, entry.name,
                             why or f"bundle v{version} does not carry it")
                return None
            return whole.bodies[twin.name]

        bundle.release(read)

    def load(self, version: int) -> Bundle:
        """The stored, verified bundle of ``version``; ``StoreError(code="unknown_version")`` if none."""
        if self.active is not None and self.active.version == version:
            return self.active
        bundle, skipped = self._newest_verifying(lambda v: v == version)
        if bundle is not None:
            return bundle
        known = ", ".join(str(v) for v, _ in self.stored()[-10:]) or "none"
        detail = f" that verifies ({'; '.join(skipped)})" if skipped else ""
        raise StoreError(f"version {version} is not in the store{detail}; stored versions: {known}",
                         code="unknown_version", version=version)

    def previous(self, below: int | None = None) -> Bundle | None:
        """The rollback target: the newest stored bundle older than version ``below`` (the active
        one, by default) that verifies."""
        if below is None:
            if self.active is None:
                return None
            below = self.active.version
        active = below
        bundle, skipped = self._newest_verifying(lambda v: v < active)
        for why in skipped:
            logger.warning("rollback candidate skipped: %s", why)
        return bundle

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """History entries, oldest first (only the last ``limit``); a torn line is skipped."""
        entries = self._history.read()
        return entries if limit is None else entries[-limit:] if limit > 0 else []

    def check_fresh(self, bundle: Bundle) -> None:
        """Refuse a replayed or old version, and an absurd jump forward (SECURITY.md fast-forward)."""
        highest, version = self._current_highest(), bundle.version
        if version <= highest:
            raise StaleVersion(
                f"version {version} is not newer than {highest}, the highest version this server has "
                f"accepted (old bundles cannot be replayed); push version {highest + 1} or later; "
                "habanero-pack picks it for you", code="stale_version", version=version, highest=highest)
        if version > highest + self.max_version_jump:
            raise StaleVersion(
                f"version {version} jumps more than {self.max_version_jump} past {highest}, the highest "
                f"accepted version, and would block every later push; push version {highest + 1}, or if "
                f"the jump is intended, have an admin on the server run Store.reset_highest({version - 1})",
                code="version_jump_too_large", version=version, highest=highest)

    def check_parent(self, bundle: Bundle, running: Bundle | None) -> None:
        """Refuse a push built on another version than the one ``running`` (``stale_parent``).

        A bundle's signed ``parent`` names the version it was built on. Naming one that is not
        active means someone pushed or rolled back since: taking it would silently replace their
        version. A bundle with no parent claims no base (the first push, ``habanero-pack push
        --force``, a bundle file built alone) and replaces whatever runs, deliberately.
        """
        parent = bundle.parent
        if parent is None or (running is not None and running.digest == parent):
            return
        versions = {digest: version for version, digest in self.stored()}

        def named(digest: str | None, version: int | None) -> str:
            if digest is None:
                return "the code on disk (no version is active)"
            return f"v{version} ({_short(digest)})" if version is not None else f"{_short(digest)}, not in this store"

        base = named(parent, versions.get(parent))
        active = named(running.digest if running else None, running.version if running else None)
        raise StaleVersion(
            f"version {bundle.version} was built on {base}, but the app runs {active}: someone pushed or "
            "rolled back since, and this push would silently replace their version; pull their change and "
            "rebuild on the active version (habanero-pack push builds on it), or push with --force to "
            "replace it anyway", code="stale_parent", version=bundle.version, parent=parent,
            active=running.digest if running else None)

    def _current_highest(self) -> int:
        """The mark as on disk now (another process may have pushed), else the one in memory."""
        state, _ = self._read_state()
        if state is not None:
            self.highest = state["highest"]
        return self.highest

    # ---------------------------------------------------------------------------- writing

    def stage(self, bundle: Bundle, *, known: Bundle | None = None, names: Iterable[str] | None = None) -> Path:
        """Store the bundle's new bodies in ``objects/`` and the bundle in ``staged/``; not active yet.

        ``known`` is a bundle whose bodies are stored already (the active one, by default): only
        the others are written, so a push costs what it changed; ``names`` (the entries that differ
        from ``known``) spares even the look at the others. An already stored bundle is not
        written again. Objects and the staged file are written under one hold of the lock, which the
        object sweep relies on.
        """
        self._check_app(bundle)
        name = f"{_stem(bundle.version, bundle.digest)}.hbn"
        final, staged = os.path.join(self._bundles_dir, name), os.path.join(self._staged_dir, name)
        with self._lock, self._io(f"stage v{bundle.version}"):
            self._written = []
            self.check_writable()
            if os.path.exists(final):  # a stored version: its objects are there too
                return Path(final)
            self.check_fresh(bundle)
            self._written = self.objects.write_missing(bundle, known if known is not None else self.active,
                                                       names if known is not None else None,
                                                       sync=self.sync == "commit")
            if not os.path.exists(staged):
                commit_sync = self.sync == "commit"
                fs.write_atomic(staged, bundle.raw, mode=0o444, sync=commit_sync, sync_dir=False)
                if commit_sync and self._written:
                    for shard in {os.path.dirname(p) for p in self._written}:
                        fs.fsync_path(shard)
            return Path(staged)

    def commit(self, bundle: Bundle, *, action: str = "push") -> None:
        """Make ``bundle`` active and raise ``highest``, in one atomic replace of the state file.

        A push is re-checked for freshness under the lock (another process may have pushed since);
        a rollback target must already be stored. Then a history entry; retention runs on the
        worker, after the push has answered (until then the store holds one bundle more).
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        self._check_app(bundle)
        name = f"{_stem(bundle.version, bundle.digest)}.hbn"
        final, staged = os.path.join(self._bundles_dir, name), os.path.join(self._staged_dir, name)
        with self._lock:
            with self._io(f"commit v{bundle.version}"):
                self.check_writable()
                # Under the lock, self.highest is re-read from disk (another process may have written).
                if action == "push":
                    self.check_fresh(bundle)
                elif not os.path.exists(final):
                    raise StoreError(f"rollback target v{bundle.version} ({_short(bundle.digest)}) is not "
                                     "in the store; roll back to a stored version", code="unknown_version")
                else:
                    self._current_highest()
                commit_sync = self.sync == "commit"
                written, self._written = self._written, []
                promote = not os.path.exists(final)
                if promote:  # the bundle is on disk (in staged/) before the pointer names it
                    if not os.path.exists(staged):  # another process's open() cleared staged/ meanwhile
                        fs.write_atomic(staged, bundle.raw, mode=0o444, sync=commit_sync, sync_dir=False)
                    if commit_sync:
                        fs.fsync_dir(self._staged_dir)
                highest = max(self.highest, bundle.version)
                retired: list[str] | None = None if commit_sync else []  # the old state file, freed later
                probation = self._probation_of(action)
                named = False
                try:
                    self._state.write(pointer_to(bundle), highest, sync=commit_sync, retire=retired,  # the commit point
                                      probation=probation)
                    named = True
                finally:
                    # Only a version the state file has named moves to bundles/: a push whose commit
                    # failed stays in staged/, which discard() and open() empty, and is never a
                    # rollback target nor a version to start on.
                    if promote and (named or self._names_now(bundle)):
                        self._promote(staged, final, bundle, sync=commit_sync)
                        written.append(final)
                written.append(self._state.path)
            self.active, self.highest = bundle, highest
            # Past the commit point nothing may raise: the caller would undo what disk says is live.
            try:
                self._append_history(action, bundle.version, bundle.digest, bundle.key_ids, "ok", None, "",
                                     sync=commit_sync)
                written.append(self._history_file)
            except (OSError, HabaneroError):
                logger.exception("v%d is committed, but its history entry failed", bundle.version)
            if not commit_sync:
                self.worker.flush_later(written, retired or ())
            self.later(self._retain)

    def _probation_of(self, action: str) -> tuple[Pointer | None] | None:
        """What a commit of ``action`` writes as the last permanent version: for a push on probation,
        the one before it (kept across pushes made during a probation); else none (a rollback or a
        revert is an operator's or a verdict's choice: permanent)."""
        if action != "push" or not self.probation:
            return None
        state, _ = self._read_state()
        if state is None:
            return (pointer_to(self.active),)
        return (state["permanent"],) if "permanent" in state else (state["active"],)

    def on_probation(self) -> tuple[bool, Pointer | None]:
        """Whether the active version (as on disk now) is on probation, and the last permanent one."""
        state, _ = self._read_state()
        if state is None or "permanent" not in state:
            return False, None
        return True, state["permanent"]

    def make_permanent(self, digest: str, reason: str = "") -> bool:
        """The probation of the active version ``digest`` passed: it becomes permanent (a restart
        boots it). False when it is no longer the active version on probation."""
        with self._lock, self._io("make the active version permanent"):
            self.check_writable()
            state, _ = self._read_state()
            active = state["active"] if state is not None else None
            if state is None or "permanent" not in state or active is None or active["digest"] != digest:
                return False
            self._state.write(active, state["highest"])
            self._append_history("probation", active["version"], digest, (), "permanent",
                                 None, reason)
            return True

    def record_verdict(self, version: int, digest: str, outcome: str, reason: str) -> None:
        """Append probation's verdict on ``version`` (``reverted``, with why) to the history."""
        with self._lock, self._io("record a probation verdict"):
            self.check_writable()
            self._append_history("probation", version, digest, (), outcome, "reverted" if outcome == "reverted"
                                 else None, reason)

    def boot_permanent(self) -> Bundle | None:
        """At a start of the app (no other process of it runs) during a probation: go back to the
        last permanent version, which becomes active again (the probationary one stays stored: it
        can be pushed or rolled back to again; the highest version never goes down). Returns the
        bundle to serve (None: the code on disk); does nothing outside a probation."""
        with self._lock, self._io("boot the last permanent version"):
            state, _ = self._read_state()
            if state is None or "permanent" not in state or self.unsafe:
                return self.active
            self.check_writable()
            permanent, active = state["permanent"], state["active"]
            bundle: Bundle | None = None
            if permanent is not None:
                bundle, why = self._verify_file(permanent["version"], permanent["digest"])
                if bundle is None:
                    logger.error("habanero store %s: the last permanent version v%d cannot be served (%s); "
                                 "keeping the probationary one", self.path, permanent["version"], why)
                    return self.active
            self._state.write(permanent, state["highest"])
            shown = f"v{permanent['version']}" if permanent is not None else "the code on disk"
            reason = (f"the app restarted while v{active['version'] if active else '?'} was on probation: it "
                      f"boots {shown}, the last permanent version")
            if active is not None:
                self._append_history("probation", active["version"], active["digest"], (), "reverted", "reverted",
                                     reason)
            self._append_history("revert", permanent["version"] if permanent else None,
                                 permanent["digest"] if permanent else None, (), "ok", None, reason)
            logger.warning("habanero store %s: %s", self.path, reason)
            self.active = bundle
            return bundle

    def _names_now(self, bundle: Bundle) -> bool:
        """Whether the state file on disk names ``bundle`` active (a write that raised may have
        replaced it before raising: its commit point then passed)."""
        with contextlib.suppress(HabaneroError):
            state, _ = self._read_state()
            return state is not None and state["active"] == pointer_to(bundle)
        return False

    def _promote(self, staged: str, final: str, bundle: Bundle, *, sync: bool) -> None:
        """Move a committed bundle from staged/ to bundles/. Never raises for the disk: until it
        moves, the state file's bundle is read from staged/ (``_verify_file``), and ``open()``
        finishes the move."""
        try:
            try:
                os.replace(staged, final)
            except FileNotFoundError:
                fs.write_atomic(final, bundle.raw, mode=0o444, sync=sync, sync_dir=False)
            if sync:
                fs.fsync_dir(self._bundles_dir)
        except OSError as exc:
            logger.error("habanero store %s: v%d is committed but stays in staged/ (%s); it is served from "
                         "there, and the next start moves it", self.path, bundle.version, exc)

    @contextlib.contextmanager
    def deploying(self, wait: float) -> Iterator[None]:
        """Hold the store's deploy lock: one deploy at a time across every process of the app.

        Waits up to ``wait`` seconds for a deploy running in another process, then raises
        ``DeployInProgress``; raises it at once if another thread of this one runs a deploy.
        """
        if not self._deploy_lock.acquire(wait, wait_for_threads=False):
            raise DeployInProgress("another deploy is in progress; wait for it to finish and push again")
        try:
            yield
        finally:
            self._deploy_lock.release()

    def deploy_running(self) -> bool:
        """Whether a deploy holds the deploy lock now (another process's, or another thread's of
        this one). Never waits."""
        with self._deploy_lock.attempt() as free:
            return not free

    def source_tree(self, root: Path, *, mirror: Mirror | None = None) -> SourceTree:
        """A source tree at ``root`` laid out from this store's objects (see ``overlay.storage.tree``),
        with ``mirror``'s links to the project's other files at its root."""
        return SourceTree(root, self.objects, label=str(self.path), mirror=mirror)

    def mirror(self, packages: Iterable[str]) -> Mirror:
        """The links a tree of ``packages`` needs to the rest of their project, as found on
        ``sys.path`` now (see ``overlay.storage.mirror``)."""
        names = tuple(packages)
        return Mirror(homes_of(names), packages=names, avoid=[str(self.path)])

    def discard(self, bundle: Bundle) -> None:
        """Forget a staged bundle whose push failed: a failed push leaves no trace but its history
        entry. The objects it wrote go at a later sweep, unless another version uses them."""
        name = f"{_stem(bundle.version, bundle.digest)}.hbn"
        with self._lock, self._io(f"discard v{bundle.version}"):
            self._written = []
            self.check_writable()
            if not (self._bundles / name).exists():  # a stored version (a rollback target) stays
                (self._staged / name).unlink(missing_ok=True)

    def record_failure(self, *, action: str, version: int | None, digest: str | None,
                       key_ids: Sequence[str], code: str, reason: str) -> None:
        """Append a failed push or rollback to the history; nothing else changes."""
        with self._lock, self._io("record a failure in the history"):
            self.check_writable()
            self._append_history(action, version, digest, key_ids, "failed", code, reason)

    def reset_highest(self, value: int) -> None:
        """Set the highest accepted version: a local admin action, never reachable over HTTP.

        Used after a mistaken jump forward. It cannot go below the active version; stored bundles
        above the new mark are removed (they could never be pushed again).
        """
        if type(value) is not int or value < 0:
            raise StoreError(f"highest must be a non-negative integer, not {value!r}", code="bad_highest")
        with self._lock, self._io("reset the highest version"):
            self.check_writable()
            state, _ = self._read_state()
            pointer = state["active"] if state is not None else pointer_to(self.active)
            if pointer and value < pointer["version"]:
                raise StoreError(f"cannot set highest to {value}: active version {pointer['version']} is "
                                 "above it; roll back first", code="bad_highest")
            old = state["highest"] if state is not None else self.highest
            kept = (state["permanent"],) if state is not None and "permanent" in state else None
            self._state.write(pointer, value, probation=kept)
            self.highest = value
            self._drop_above(value, keep=pointer, reason=f"highest was reset to {value}")
            self._append_history("reset_highest", value, None, (), "ok", None, f"highest {old} -> {value}")

    def _append_history(self, action: str, version: int | None, digest: str | None,
                        key_ids: Sequence[str], outcome: str, code: str | None, reason: str, *,
                        sync: bool = True) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fs.append_record(self._history_file, {
            "time": now, "action": action, "version": version, "digest": digest,
            "key_ids": list(key_ids), "outcome": outcome, "code": code, "reason": reason}, sync=sync)

    def _drop_above(self, highest: int, *, keep: Pointer | None, reason: str) -> None:
        for version, digest in self.stored():
            if version > highest and keep != {"version": version, "digest": digest}:
                logger.warning("removed bundle v%d (%s): %s", version, _short(digest), reason)
                self._remove_version(version, digest)

    def _remove_version(self, version: int, digest: str) -> None:
        (self._bundles / f"{_stem(version, digest)}.hbn").unlink(missing_ok=True)
        self._dropped(1)

    def _check_app(self, bundle: Bundle) -> None:
        if bundle.app_id != self.app_id:
            raise WrongApp(f"bundle is for app {bundle.app_id!r}; this store holds {self.app_id!r}",
                           expected=self.app_id, got=bundle.app_id)

    def _flush_later(self, files: list[str]) -> None:
        self.worker.flush_later(files)  # the worker of now: a forked child gets one of its own

    def check_writable(self) -> None:
        """Refuse (``store_unsafe``) to write a store that holds a symbolic link or a foreign file
        where habanero writes: found at open, or planted since (a few ``lstat`` calls)."""
        problems = self.unsafe or unsafe_layout(self.path, shards=False)
        if problems:
            raise self._unsafe_error(problems[0])

    def _unsafe_error(self, problem: str) -> StoreError:
        active = f"v{self.active.version}" if self.active is not None else "the code on disk"
        return StoreError(
            f"the habanero store {self.path} is not safe to write: {problem}. habanero never writes through a "
            "symbolic link or into a file it did not create in its store (whoever placed it could choose what "
            f"runs or what gets overwritten); nothing changed and {active} still serves: check who put it "
            "there, remove it, and restart the app", code="store_unsafe", path=str(self.path))

    def _io(self, what: str) -> AbstractContextManager[None]:
        """Turn an OSError (disk full, permissions) into a StoreError that says what to do."""
        return fs.os_errors_as_store_errors(self.path, what)

    # ---------------------------------------------------------------------------- retention

    def prune(self) -> None:
        """Keep the last ``keep`` bundles plus the active one and the one before it; drop the rest.

        Also drops staged bundles that can no longer be committed; the objects of dropped versions
        go at a later sweep (on the worker thread).
        """
        with self._lock:
            state, _ = self._read_state()
            self._prune(on_disk=state["active"] if state is not None else None)

    def _retain(self) -> None:
        """Retention after a commit, on the worker: only when there is something to drop."""
        if len(self.stored()) > self.keep:
            self.prune()

    def _prune(self, *, on_disk: Pointer | None, stored: list[tuple[int, str]] | None = None) -> None:
        """``prune()`` under the lock, given the active pointer on disk (just written by a commit)."""
        with self._lock, self._io("prune old versions"):
            self.check_writable()
            stored = self.stored() if stored is None else stored  # a commit just listed them
            kept = set(stored[-self.keep:]) if self.keep else set()
            for p in filter(None, (pointer_to(self.active), on_disk)):
                kept.add((p["version"], p["digest"]))  # ours, and the one on disk if another's
                kept.update([s for s in stored if s[0] < p["version"]][-1:])
            for version, digest in [s for s in stored if s not in kept]:
                logger.info("retention: removing v%d (%s)", version, _short(digest))
                self._remove_version(version, digest)
            committed = {_stem(p["version"], p["digest"]) for p in filter(None, (on_disk,))}
            for name in os.listdir(self._staged):  # stale: can never be committed as a push
                if (m := _NAME.match(name)) and int(m[1]) <= self.highest and name[:-4] not in committed:
                    (self._staged / name).unlink(missing_ok=True)

    def _dropped(self, count: int) -> None:
        """Retention dropped ``count`` versions: sweep their objects once enough have gone."""
        self._dropped_since_sweep += count
        if self._dropped_since_sweep >= SWEEP_EVERY:
            self._dropped_since_sweep = 0
            self.later(self._sweep_objects)

    def _sweep_objects(self) -> None:
        """Delete the objects that no stored or staged bundle, nor the active one, refers to."""
        active = self.active
        self.check_writable()
        self.objects.sweep(self._bundle_files, keep=active.by_hash if active is not None else ())

    def _bundle_files(self) -> list[str]:
        return [os.path.join(d, n) for d in (self._bundles_dir, self._staged_dir) for n in os.listdir(d)
                if n.endswith(".hbn")]

    # ---------------------------------------------------------------------------- the process's view

    def object(self, sha256: str) -> bytes | None:
        """An entry body this store holds (for delta bundles), or None. Its hash is checked by the reader."""
        return self.objects.get(sha256)

    def later(self, task: Task) -> None:
        """Run ``task`` on the store's worker thread, after the current push has answered."""
        self.worker.later(task)

    def settle(self) -> None:
        """Wait until background work is done (tests, shutdown). Never call it holding the lock."""
        self.worker.settle()

    @property
    def cache_dir(self) -> Path | None:
        """Where the finder keeps compiled code (``<store>/pycache``), created on demand; None (code
        is cached in memory only) when something else than a directory of ours is in its place."""
        path = self.path / "pycache"
        problem = fs.unsafe_entry(path, directory=True)
        if problem is None:
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
            problem = fs.unsafe_entry(path, directory=True)
        if problem is not None:
            logger.error("habanero store %s: %s; compiled code is not written there (habanero never writes "
                         "through a symbolic link in its store): remove it", self.path, problem)
            return None
        return path

    def close(self) -> None:
        """Finish background clean-up and release the lock file; this Store must not write afterwards."""
        self.worker.stop()
        self._lock.close()
        self._deploy_lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
