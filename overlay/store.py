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
      history.jsonl   one JSON object per push, rollback, failure or reset; append-only
      lock            flock()ed by writers only; readers never wait
      .tmp-*          (anywhere above) what an interrupted write left; open() removes it

Crash safety: every file is written to a temp name and renamed into place (``overlay.storage.fs``).
``commit()`` puts the bundle in ``bundles/`` *before* it replaces ``state.json``, and that replace
is the commit point: a ``kill -9`` at any moment leaves the old pointer or the new one.

Power cuts: ``sync`` says when a commit reaches the disk itself. ``"background"`` (the default) has
the page cache hold it when the push answers (a ``kill -9`` or a crash of the app loses nothing) and
a worker thread fsyncs every file and directory it wrote right after the answer; a power cut in
those milliseconds may boot the previous version (the store falls back to the newest bundle that
verifies) and forget that the newest version was accepted. ``"commit"`` fsyncs before the push
answers (a few fsyncs, about 3 ms a push here): an acknowledged push survives a power cut.

What a crash can leave is recognisable and removed by ``open()``: temp files, staged bundles, a
bundle promoted by a commit that died before its pointer flip (its version is above ``highest``,
which no committed bundle's is: ``reset_highest`` drops those).

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
from overlay.storage.state import Pointer, State, StateFile, pointer_to
from overlay.storage.tree import SourceTree, foreign_files
from overlay.storage.worker import Task, Worker

__all__ = ["SYNC_MODES", "Store", "write_atomic"]

logger = logging.getLogger(__name__)

ACTIONS = ("push", "rollback")
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


class Store:
    """The versions of one app's code on disk; the module docstring has the layout and guarantees.

    Example::

        store = Store.open(".habanero/store", trusted=load_trusted_keys("trusted_keys"), app_id="shop")
        store.check_fresh(bundle); store.stage(bundle); ...; store.commit(bundle)
    """

    def __init__(self, path: Path, *, trusted: TrustedKeys, app_id: str, limits: Limits, keep: int,
                 max_version_jump: int, lock: fs.FileLock, sync: str = "background") -> None:
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
        self._deploy_lock = fs.FileLock(path / "deploy.lock", timeout=60.0)
        self.worker = Worker(str(path))
        self._written: list[str] = []  # files a staged push wrote, to flush once it commits
        self._dropped_since_sweep = 0

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
            fs.make_dirs((root, *(root / d for d in ("bundles", "staged", "objects"))), mode=0o700)
            lock = fs.FileLock(root / "lock", timeout=lock_timeout)
        except OSError as exc:
            raise StoreError(f"cannot use {root} as the habanero store ({exc.strerror or exc}); point "
                             "it at a directory this process can create and write", path=str(root)) from None
        if root.stat().st_mode & 0o022:
            logger.warning("store %s is writable by other users, who could change what code runs: "
                           "chmod 700 it", root)
        store = cls(root, trusted=trusted, app_id=app_id, limits=limits, keep=keep,
                    max_version_jump=max_version_jump, lock=lock, sync=sync)
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
        with self._deploy_lock.attempt() as no_deploy, self._lock.attempt() as free:
            idle = no_deploy and free
            if idle:
                objects_dir = Path(self.objects.root)
                objects = [d for d in objects_dir.iterdir() if d.is_dir()]
                dirs = [self.path, self._bundles, self._staged, objects_dir, *objects]
                for path in fs.remove_orphans(dirs):
                    logger.warning("removed %s, left by an interrupted write", path)
                for name in os.listdir(self._staged):
                    logger.info("removed staged bundle %s: its push never committed", name)
                    (self._staged / name).unlink()
                for legacy in ("trees", "tree"):  # the shared trees of an older habanero
                    if (self.path / legacy).is_dir():
                        self._remove_legacy(self.path / legacy)
            state, why = self._read_state()
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
        path = self._bundles / f"{_stem(version, digest)}.hbn"
        try:
            if path.stat().st_size > self.limits.max_bundle_bytes:  # never read a planted huge file
                return None, f"{path.name} is larger than any bundle may be"
            bundle = open_bundle(path.read_bytes(), self.trusted, app_id=self.app_id, limits=self.limits,
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
        found = (_NAME.match(name) for name in os.listdir(self._bundles) if name.endswith(".hbn"))
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
                if not os.path.exists(final):  # bundle before pointer
                    try:
                        os.replace(staged, final)
                    except FileNotFoundError:  # another process's open() cleared staged/ meanwhile
                        fs.write_atomic(final, bundle.raw, mode=0o444, sync=commit_sync, sync_dir=False)
                    written.append(final)
                    if commit_sync:
                        fs.fsync_dir(self._bundles_dir)
                highest = max(self.highest, bundle.version)
                retired: list[str] | None = None if commit_sync else []  # the old state file, freed later
                self._state.write(pointer_to(bundle), highest, sync=commit_sync, retire=retired)  # the commit point
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
            if not (self._bundles / name).exists():  # a stored version (a rollback target) stays
                (self._staged / name).unlink(missing_ok=True)

    def record_failure(self, *, action: str, version: int | None, digest: str | None,
                       key_ids: Sequence[str], code: str, reason: str) -> None:
        """Append a failed push or rollback to the history; nothing else changes."""
        with self._lock, self._io("record a failure in the history"):
            self._append_history(action, version, digest, key_ids, "failed", code, reason)

    def reset_highest(self, value: int) -> None:
        """Set the highest accepted version: a local admin action, never reachable over HTTP.

        Used after a mistaken jump forward. It cannot go below the active version; stored bundles
        above the new mark are removed (they could never be pushed again).
        """
        if type(value) is not int or value < 0:
            raise StoreError(f"highest must be a non-negative integer, not {value!r}", code="bad_highest")
        with self._lock, self._io("reset the highest version"):
            state, _ = self._read_state()
            pointer = state["active"] if state is not None else pointer_to(self.active)
            if pointer and value < pointer["version"]:
                raise StoreError(f"cannot set highest to {value}: active version {pointer['version']} is "
                                 "above it; roll back first", code="bad_highest")
            old = state["highest"] if state is not None else self.highest
            self._state.write(pointer, value)
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
            stored = self.stored() if stored is None else stored  # a commit just listed them
            kept = set(stored[-self.keep:]) if self.keep else set()
            for p in filter(None, (pointer_to(self.active), on_disk)):
                kept.add((p["version"], p["digest"]))  # ours, and the one on disk if another's
                kept.update([s for s in stored if s[0] < p["version"]][-1:])
            for version, digest in [s for s in stored if s not in kept]:
                logger.info("retention: removing v%d (%s)", version, _short(digest))
                self._remove_version(version, digest)
            for name in os.listdir(self._staged):  # stale: can never be committed as a push
                if (m := _NAME.match(name)) and int(m[1]) <= self.highest:
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
    def cache_dir(self) -> Path:
        """Where the finder keeps compiled code (``<store>/pycache``), created on demand."""
        path = self.path / "pycache"
        path.mkdir(mode=0o700, exist_ok=True)
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
