"""The store: every accepted version of an app's code, on disk, surviving ``kill -9``.

``Store`` is the face; each part of the store lives in a module of ``overlay.storage``, named here.
Layout (the directory is created with mode 0700: whoever can write it decides what code runs)::

    <store>/
      state.json      the pointer, the single source of truth, replaced atomically (storage.state):
                      {"format": 1, "app_id": "shop", "active": {"version": 7, "digest": "<sha256>"}
                       | null, "highest": 9}
                      (while the active version is on probation, also "permanent": the last
                      permanent version, which a restart boots; see storage.probation)
      bundles/        0000000007-<digest>.hbn: accepted bundles, byte for byte, read-only (storage.bundles)
      staged/         0000000008-<digest>.hbn: written by stage(), moved to bundles/ by commit()
      objects/        ab/<sha256>: every stored version's file bodies by content, read-only (storage.objects)
      deploy.lock     flock()ed by the process that runs a deploy, for the whole of it
      pycache/        compiled code, owned by the finder
      history.jsonl   one JSON object per push, rollback, revert, verdict, failure or reset; append-only
                      (storage.history)
      requests.jsonl  the nonces of signed control requests within their window (storage.requests)
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
a worker thread (``overlay.storage.worker``) fsyncs every file and directory it wrote right after the
answer; a power cut in those milliseconds may boot the previous version (the store falls back to the
newest bundle that verifies) and forget that the newest version was accepted. ``"commit"`` fsyncs
before the push answers (a few fsyncs, about 3 ms a push here): an acknowledged push survives a power cut.

Nothing on disk is trusted (``overlay.storage.opening``): ``open()`` removes what a crash left (temp
files; staged bundles the state file does not name, such as an older habanero's, promoted before its
pointer flip, whose version is above ``highest``), re-verifies the active bundle against the current
trusted keys and, when it fails, serves the newest earlier bundle that verifies, down to none (the
code on disk). A fallback is reported, not written: the pointer changes only through ``commit()``.

Who can write this directory decides what code runs: a local user with write access can replace
the state file, the trusted keys' effect (by planting a bundle signed by a key they also add to the
trusted-keys file, if they can write that too) or the objects. What habanero does about it: every
bundle is verified against the trusted keys at every open; a symbolic link or a foreign file where
the store keeps its own opens the store read-only (``store_unsafe``: it serves the newest version
that verifies and refuses pushes), and nothing is ever written through a link or outside the store.
See ``docs/threat-model.md``.

Shared by processes: every process of an app opens the same store. Each change re-reads the state
file under the lock and derives from what is on disk, never from what this process last saw: the
highest accepted version never goes down, whichever process writes (``overlay.storage.freshness``).
One deploy runs at a time (``deploying()``). The files each process serves are its own (its source
tree, see ``overlay.storage.tree`` and ``overlay.storage.mirror``), laid out from the objects here.
Retention (``overlay.storage.retention``) keeps the last ``keep`` versions, the active one and the one
before it, and sweeps the objects only dropped versions used, on the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

from overlay.bundle import DEFAULT_LIMITS, Bundle, Limits
from overlay.errors import DeployInProgress, HabaneroError, StoreError, WrongApp
from overlay.keys import TrustedKeys
from overlay.storage import freshness, fs, opening
from overlay.storage.bundles import BundleFiles, short, stem
from overlay.storage.history import ACTIONS, History
from overlay.storage.mirror import Mirror, homes_of
from overlay.storage.objects import ObjectStore
from overlay.storage.probation import Probation
from overlay.storage.requests import SeenRequests
from overlay.storage.retention import Retention
from overlay.storage.state import Pointer, State, StateFile, pointer_to
from overlay.storage.tree import SourceTree
from overlay.storage.worker import Task, Worker

__all__ = ["SYNC_MODES", "Store", "write_atomic"]

logger = logging.getLogger(__name__)

SYNC_MODES = ("background", "commit")
#: Dropped versions between two object sweeps: a sweep reads every stored manifest (milliseconds
#: of a worker thread), and what waits for it is only disk space.
SWEEP_EVERY = 10
#: Replace a file atomically: the one helper every writer of habanero uses (see ``overlay.storage.fs``).
write_atomic = fs.write_atomic


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
        self._state = StateFile(os.path.join(path, "state.json"), app_id)
        self._history = History(os.path.join(path, "history.jsonl"))
        self.objects = ObjectStore(os.fspath(path / "objects"), lock)
        self._files = BundleFiles(path, self.objects, trusted=trusted, app_id=app_id, limits=limits)
        #: What makes the store unsafe to write, found when it was opened: it is then only read.
        self.unsafe: list[str] = list(unsafe)
        self._deploy_lock = opening.deploy_lock(path, self.unsafe)
        if self.unsafe:
            self.objects.refuse = self._unsafe_error
        self.worker = Worker(str(path))
        self._written: list[str] = []  # files a staged push wrote, to flush once it commits
        #: The nonces of the control requests any process of the app took, until they expire.
        self.requests = SeenRequests(path / "requests.jsonl", lock, self._flush_later,
                                     sync=sync == "commit", writable=self.check_writable)
        self._retention = Retention(self._files, lock, sweep_every=SWEEP_EVERY, active=lambda: self.active,
                                    writable=self.check_writable, later=self.later)
        self._probation = Probation(self._files, self._state, self._history, lock, unsafe=self.unsafe,
                                    writable=self.check_writable, active=lambda: self.active)
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
        lock, unsafe = opening.prepare(root, lock_timeout=lock_timeout)
        store = cls(root, trusted=trusted, app_id=app_id, limits=limits, keep=keep,
                    max_version_jump=max_version_jump, lock=lock, sync=sync, unsafe=unsafe)
        try:
            with store._io("repair the store"):
                opened = opening.recover(store._files, store._state, store._history, store._retention, store.worker,
                                         deploy_lock=store._deploy_lock, lock=lock, unsafe=store.unsafe)
        except BaseException:
            lock.close()
            raise
        store.active, store.highest = opened.active, opened.highest
        store.startup_problems.extend(opened.problems)
        return store

    # ---------------------------------------------------------------------------- reading

    def _read_state(self) -> tuple[State | None, str]:
        """The state file as on disk now (another process may have committed), or None and why."""
        return self._state.read()

    def stored(self) -> list[tuple[int, str]]:
        """``(version, digest)`` of every stored bundle, ascending."""
        return self._files.stored()

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
            bundle, why = self._files.verify(pointer["version"], pointer["digest"])
            if bundle is None:
                logger.error("habanero store %s: active bundle v%d cannot be served: %s", self.path,
                             pointer["version"], why)
            else:
                self.active = bundle
        return self.active

    def read_bundle(self, version: int, digest: str) -> bytes | None:
        """The bytes of a staged or stored bundle (unverified: open them with ``open_bundle``)."""
        return self._files.read(version, digest)

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
        self._files.release(bundle)

    def load(self, version: int) -> Bundle:
        """The stored, verified bundle of ``version``; ``StoreError(code="unknown_version")`` if none."""
        if self.active is not None and self.active.version == version:
            return self.active
        bundle, skipped = self._files.newest_verifying(lambda v: v == version)
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
        bundle, skipped = self._files.newest_verifying(lambda v: v < active)
        for why in skipped:
            logger.warning("rollback candidate skipped: %s", why)
        return bundle

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """History entries, oldest first (only the last ``limit``); a torn line is skipped."""
        return self._history.read(limit)

    def check_fresh(self, bundle: Bundle) -> None:
        """Refuse a replayed or old version, and an absurd jump forward (SECURITY.md fast-forward)."""
        freshness.check_version(bundle.version, self._current_highest(), self.max_version_jump)

    def check_parent(self, bundle: Bundle, running: Bundle | None) -> None:
        """Refuse a push built on another version than the one ``running`` (``stale_parent``).

        A bundle's signed ``parent`` names the version it was built on. Naming one that is not
        active means someone pushed or rolled back since: taking it would silently replace their
        version. A bundle with no parent claims no base (the first push, ``habanero-pack push
        --force``, a bundle file built alone) and replaces whatever runs, deliberately.
        """
        freshness.check_parent(bundle, running, self.stored)

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
        name = f"{stem(bundle.version, bundle.digest)}.hbn"
        final, staged = os.path.join(self._files.bundles_dir, name), os.path.join(self._files.staged_dir, name)
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
        name = f"{stem(bundle.version, bundle.digest)}.hbn"
        final, staged = os.path.join(self._files.bundles_dir, name), os.path.join(self._files.staged_dir, name)
        with self._lock:
            with self._io(f"commit v{bundle.version}"):
                self.check_writable()
                # Under the lock, self.highest is re-read from disk (another process may have written).
                if action == "push":
                    self.check_fresh(bundle)
                elif not os.path.exists(final):
                    raise StoreError(f"rollback target v{bundle.version} ({short(bundle.digest)}) is not "
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
                        fs.fsync_dir(self._files.staged_dir)
                highest = max(self.highest, bundle.version)
                retired: list[str] | None = None if commit_sync else []  # the old state file, freed later
                # A push on probation keeps the last permanent version; any other commit is permanent.
                probation = self._probation.permanent_before_push() if action == "push" and self.probation else None
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
                self._history.append(action, bundle.version, bundle.digest, bundle.key_ids, "ok", None, "",
                                     sync=commit_sync)
                written.append(self._history.path)
            except (OSError, HabaneroError):
                logger.exception("v%d is committed, but its history entry failed", bundle.version)
            if not commit_sync:
                self.worker.flush_later(written, retired or ())
            self.later(self._retain)

    # ---------------------------------------------------------------------------- probation

    def on_probation(self) -> tuple[bool, Pointer | None]:
        """Whether the active version (as on disk now) is on probation, and the last permanent one."""
        return self._probation.status()

    def make_permanent(self, digest: str, reason: str = "") -> bool:
        """The probation of the active version ``digest`` passed: it becomes permanent (a restart
        boots it). False when it is no longer the active version on probation."""
        return self._probation.make_permanent(digest, reason)

    def record_verdict(self, version: int, digest: str, outcome: str, reason: str) -> None:
        """Append probation's verdict on ``version`` (``reverted``, with why) to the history."""
        self._probation.record_verdict(version, digest, outcome, reason)

    def boot_permanent(self) -> Bundle | None:
        """At a start of the app (no other process of it runs) during a probation: go back to the
        last permanent version, which becomes active again (the probationary one stays stored: it
        can be pushed or rolled back to again; the highest version never goes down). Returns the
        bundle to serve (None: the code on disk); does nothing outside a probation."""
        with self._lock:
            self.active = self._probation.boot_permanent()
            return self.active

    # ---------------------------------------------------------------------------- committing

    def _names_now(self, bundle: Bundle) -> bool:
        """Whether the state file on disk names ``bundle`` active (a write that raised may have
        replaced it before raising: its commit point then passed)."""
        with contextlib.suppress(HabaneroError):
            state, _ = self._read_state()
            return state is not None and state["active"] == pointer_to(bundle)
        return False

    def _promote(self, staged: str, final: str, bundle: Bundle, *, sync: bool) -> None:
        """Move a committed bundle from staged/ to bundles/. Never raises for the disk: until it
        moves, the state file's bundle is read from staged/ (``BundleFiles.verify``), and ``open()``
        finishes the move."""
        self._files.promote(staged, final, bundle, sync=sync)

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
        name = f"{stem(bundle.version, bundle.digest)}.hbn"
        with self._lock, self._io(f"discard v{bundle.version}"):
            self._written = []
            self.check_writable()
            if not (self._files.bundles / name).exists():  # a stored version (a rollback target) stays
                (self._files.staged / name).unlink(missing_ok=True)

    def record_failure(self, *, action: str, version: int | None, digest: str | None,
                       key_ids: Sequence[str], code: str, reason: str) -> None:
        """Append a failed push or rollback to the history; nothing else changes."""
        with self._lock, self._io("record a failure in the history"):
            self.check_writable()
            self._history.append(action, version, digest, key_ids, "failed", code, reason)

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
            self._retention.drop_above(value, keep=pointer, reason=f"highest was reset to {value}")
            self._history.append("reset_highest", value, None, (), "ok", None, f"highest {old} -> {value}")

    def _check_app(self, bundle: Bundle) -> None:
        if bundle.app_id != self.app_id:
            raise WrongApp(f"bundle is for app {bundle.app_id!r}; this store holds {self.app_id!r}",
                           expected=self.app_id, got=bundle.app_id)

    def _flush_later(self, files: list[str]) -> None:
        self.worker.flush_later(files)  # the worker of now: a forked child gets one of its own

    def check_writable(self) -> None:
        """Refuse (``store_unsafe``) to write a store that holds a symbolic link or a foreign file
        where habanero writes: found at open, or planted since (a few ``lstat`` calls)."""
        problems = self.unsafe or opening.unsafe_layout(self.path, shards=False)
        if problems:
            raise self._unsafe_error(problems[0])

    def _unsafe_error(self, problem: str) -> StoreError:
        return opening.unsafe_error(self.path, problem, self.active)

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
            self._retention.prune(keep=self.keep, on_disk=state["active"] if state is not None else None,
                                  highest=self.highest)

    def _retain(self) -> None:
        """Retention after a commit, on the worker: only when there is something to drop."""
        if len(self.stored()) > self.keep:
            self.prune()

    def _sweep_objects(self) -> None:
        """Delete the objects that no stored or staged bundle, nor the active one, refers to."""
        self._retention.sweep()

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
        return opening.cache_dir(self.path)

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
