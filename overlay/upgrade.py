"""The push transaction: verify, stage, plan, apply in place, then commit or undo everything.

One deploy runs at a time (a second gets ``DeployInProgress``). A push costs what it changed: one
pass over the entries finds what differs (often none: opening the bundle knew), and the plan, the
finder's index, the store's objects and tree, and the re-pointing of live modules look only at that.
Every mutation of the apply step (the files of the store's tree, module dicts, function attributes,
class dicts, ``sys.modules``, the app's modules first imported during the apply, the finder's
index, live modules' ``__spec__``/``__file__``) is recorded in a journal; on any exception, or if
the store cannot commit, the journal is replayed backwards, leaving the process exactly as before
(the same objects, ``is``-identical), and the error is re-raised as ``ActivationFailed`` carrying
the traceback text. The store's active pointer flips only after a clean apply, so a crash
mid-apply boots the previous version.

What other threads can observe while a push applies:

* **Imports of modules not yet imported wait.** From the index swap until the commit (or the undo)
  the deploying thread holds the interpreter's import lock, so another thread that starts such an
  import (a module the push adds, a module not yet used, a third-party module) blocks, then sees the
  committed new version, or the old one after an undo; never a half-applied tree.
* **Modules already imported do not wait.** ``import m`` of a module in ``sys.modules``, and every
  call into it, goes on. Such a thread sees each change as it lands: a function's code swap is one
  atomic store, a class is patched attribute by attribute, so it may run a mix of old and new
  functions during the apply, and the new ones before the push is committed (undone again if it
  fails). Draining requests around the apply is the caller's job.
* **Running frames keep their code.** A call, generator or coroutine that started before the push
  finishes on the code it started with; its next call runs the new code.
* **Imports in flight finish on their own terms.** A changed module that another thread is still
  importing has run only part of its old source: the push is refused (undone) and can be repeated.
  An unchanged one keeps its spec until its import is done (other importers keep waiting for it).
* **Known hazard:** if another thread is importing some module X (holding X's module lock) and
  needs the import lock for a nested import while the new code of this push imports X too, both
  threads wait for each other: a deadlock the import system cannot detect. It needs an import of
  the same not-yet-imported module racing the apply step.
* The import lock is also held while the store commits (a rename; an fsync with ``sync="commit"``;
  the store's file lock if another process is writing), so first imports elsewhere wait for that too.
"""

from __future__ import annotations

import _imp
import contextlib
import gc
import logging
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from overlay.format import delta
from overlay.transaction.diff import entry_diff
from overlay.rebinding.journal import MISSING, Journal
from overlay.transaction.plan import Plan, make_plan
from overlay.bundle import Bundle, Limits, open_bundle
from overlay.errors import ActivationFailed, ControlRejected, DeployInProgress, HabaneroError
from overlay.finder import BundleIndex  # noqa: F401  (type of the index)
from overlay.keys import TrustedKeys
from overlay.rebind import ModuleReport, check_update, one_heap_pass, update_module

log = logging.getLogger(__name__)


class _Host(Protocol):
    """What the transaction needs from the ``Overlay`` handle."""

    app_id: str
    store: Any
    finder: Any
    trusted: TrustedKeys
    limits: Limits
    deploy_lock: threading.Lock
    retargeted: bool


@dataclass
class UpgradeReport:
    action: str                     # "push" or "rollback"
    version: int
    previous_version: int | None
    digest: str
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    data_changed: list[str] = field(default_factory=list)
    modules: list[ModuleReport] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def patched(self) -> int:
        return sum(len(m.patched) for m in self.modules)

    @property
    def replaced(self) -> int:
        return sum(len(m.replaced) for m in self.modules)


class _Clock:
    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.marks[phase] = round((now - self._last) * 1000, 3)
        self._last = now

    def done(self) -> dict[str, float]:
        self.marks["total"] = round((time.perf_counter() - self._start) * 1000, 3)
        return self.marks


@contextlib.contextmanager
def _deploying(host: _Host) -> Iterator[None]:
    """One deploy at a time, with the cyclic garbage collector paused while it runs.

    A push allocates a few thousand objects (the manifest's entries), enough to trigger collections
    mid-push; a full one walks the whole heap, tens of milliseconds in a process holding millions
    of objects. What the push allocates is bounded, so collecting after it answers costs nothing
    and keeps its time flat in heap size.
    """
    if not host.deploy_lock.acquire(blocking=False):
        raise DeployInProgress("another deploy is in progress; wait for it to finish and push again")
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()
        host.deploy_lock.release()


@contextlib.contextmanager
def _import_lock() -> Iterator[None]:
    """Hold the global import lock: other threads cannot start an import until we are done."""
    _imp.acquire_lock()
    try:
        yield
    finally:
        _imp.release_lock()


def apply(host: _Host, data: bytes) -> UpgradeReport:
    """Verify a pushed bundle and make it the running version, or leave everything as it was."""
    with _deploying(host):
        clock = _Clock()
        try:
            # The active bundle's bodies are verified and in memory: entries a push shares with it
            # are taken from there unhashed; anything else (the store's objects) is hashed.
            bundle = open_bundle(data, host.trusted, app_id=host.app_id, limits=host.limits,
                                 content=host.store.object, base_manifest=_base_manifest(host),
                                 base=host.store.active)
            host.store.check_fresh(bundle)
        except HabaneroError as exc:
            _record(host, "push", None, exc)
            raise
        clock.lap("verify")
        return _transition(host, bundle, "push", clock)


def rollback(host: _Host, to: int | None = None, *, expect: int | None = None) -> UpgradeReport:
    """Return to the previous stored version (or version ``to``) with the same guarantees as a push.

    ``expect`` is the version the caller believes is active; a mismatch refuses the rollback, so a
    replayed request does nothing harmful.
    """
    with _deploying(host):
        clock = _Clock()
        active = host.store.active
        if expect is not None and (active.version if active else None) != expect:
            raise ControlRejected(
                f"rollback expected version {expect} to be active, but it is "
                f"{active.version if active else 'none (code on disk)'}; check `habanero-pack status`",
                code="version_mismatch")
        if to is None:
            target = host.store.previous()
            if target is None:
                raise ControlRejected("there is no earlier stored version to roll back to",
                                      code="nothing_to_roll_back")
        else:
            if active is not None and to == active.version:
                raise ControlRejected(f"version {to} is already active", code="nothing_to_roll_back")
            target = host.store.load(to)
        clock.lap("verify")
        return _transition(host, target, "rollback", clock)


def _base_manifest(host: _Host) -> Callable[[str], bytes | None]:
    """A packed push must be packed against the active bundle's manifest (the CLI asks for it)."""
    active = host.store.active
    return lambda digest: active.manifest_bytes if active is not None and active.digest == digest else None


def _transition(host: _Host, bundle: Bundle, action: str, clock: _Clock) -> UpgradeReport:
    store, finder = host.store, host.finder
    current: Bundle | None = store.active
    try:
        # Everything below looks only at what differs: one pass over the entries finds it.
        diff = entry_diff(current, bundle)
        # Plan before writing anything: a bundle that does not compile leaves nothing behind but
        # its history entry. Paths are the same in every version (the store's tree).
        previous = finder.index
        derive = current is not None and previous is not None and previous.bundle is current
        index = finder.index_for(bundle, store.tree_root, changed=diff.names if derive else None)
        modules = index.modules
        plan = make_plan(current, bundle, diff,
                         live=lambda name: sys.modules.get(name) if name in modules else None,
                         old_source_of=lambda module: _old_source(module, finder.disk_sources),
                         filename_of=index.filename, compile_module=finder.code_cache.compile_module,
                         check_update=check_update)
        clock.lap("plan")
        store.stage(bundle, known=current, names=(*diff.added, *diff.changed))
        clock.lap("stage")
    except HabaneroError as exc:
        _record(host, action, bundle, exc)
        raise
    report = UpgradeReport(action, bundle.version, current.version if current else None, bundle.digest,
                           **plan.summary())
    journal = Journal()
    # The import lock is held until the store says which version is live (or the undo is done): a
    # thread waiting to import sees the committed new version or the old one, never a mix.
    with _import_lock():
        try:
            journal.call(lambda: None, store.update_tree(current, bundle, diff.names))
            everything = not host.retargeted or current is None
            _apply_plan(plan, index, finder, journal, report, bundle.version,
                        retarget=None if everything else (*plan.added, *plan.changed))
            clock.lap("apply")
            # Inside the undo scope: if the store cannot record the new version (another process
            # pushed first, a full disk), the process must not run code the disk does not call active.
            store.commit(bundle, action=action)
            clock.lap("commit")
        except BaseException as exc:
            tb = _app_traceback(exc)
            try:
                journal.undo()
            finally:
                failure = ActivationFailed(
                    f"version {bundle.version} failed while running: {type(exc).__name__}: {exc}; every "
                    f"change was undone and version {report.previous_version or 'on disk'} is still serving",
                    remote_traceback=tb, version=bundle.version)
                _record(host, action, bundle, failure)
                _discard(store, bundle)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise failure from exc
    host.retargeted = True  # every live module of the app now has the finder's loader and paths
    report.timings_ms = clock.done()
    store.later(lambda: _prepare_next(bundle))
    log.info("%s to version %s: %d changed, %d added, %d removed in %.1f ms", action, bundle.version,
             len(plan.changed), len(plan.added), len(plan.removed), report.timings_ms["total"])
    return report


def _prepare_next(bundle: Bundle) -> None:
    """What the next push, opened against ``bundle``, needs from it: built on the store's worker
    once this push has answered (see ``overlay.format.proof`` and ``overlay.format.delta``)."""
    bundle.spans  # noqa: B018  (worked out once and kept: the proof's index of its manifest)
    delta.prepare(bundle.digest, bundle.manifest_bytes)


_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _app_traceback(exc: BaseException) -> str:
    """The traceback a developer needs: the app's frames, without habanero's own machinery.

    If every frame is habanero's (a bug of ours, not of the pushed code), all of them are kept.
    """
    te = traceback.TracebackException.from_exception(exc)
    frames = [f for f in te.stack if not os.path.abspath(f.filename).startswith(_OWN_DIR)]
    if frames and len(frames) < len(te.stack):
        te.stack = traceback.StackSummary.from_list(frames)
    return "".join(te.format())


def _discard(store: Any, bundle: Bundle) -> None:
    try:
        store.discard(bundle)
    except Exception:  # the undo already happened; a leftover file is cleaned at the next open
        log.exception("could not discard the staged files of failed version %s", bundle.version)


def _apply_plan(plan: Plan, index: BundleIndex, finder: Any, journal: Journal, report: UpgradeReport,
                version: int, *, retarget: Iterable[str] | None) -> None:
    _refuse_half_imported(plan)
    _forget_new_imports(finder.packages, journal)
    previous = finder.set_index(index)
    journal.call(lambda: None, lambda: finder.set_index(previous))
    for name in plan.removed:
        module = sys.modules.get(name)
        if module is not None:
            journal.delitem(sys.modules, name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                journal.delattr(sys.modules[parent], child)
    _retarget(index.modules if retarget is None else retarget, index, journal)
    with one_heap_pass(journal):  # closures made from changed code: one heap scan for the whole push
        for change in plan.rerun:
            report.modules.append(update_module(
                sys.modules[change.name], change.new_source, filename=change.filename,
                old_source=change.old_source, journal=journal, version=version, code=change.code,
                diff=change.checked))


def _refuse_half_imported(plan: Plan) -> None:
    """A module another thread is still importing has run only part of its old source: re-running
    the changed statements now would be overwritten by the rest of the old import."""
    busy = [c.name for c in plan.rerun
            if getattr(getattr(sys.modules.get(c.name), "__spec__", None), "_initializing", False)]
    if busy:
        raise RuntimeError(f"{', '.join(busy)} {'is' if len(busy) == 1 else 'are'} being imported by another "
                           "thread right now; push again once that import has finished")


def _forget_new_imports(packages: Iterable[str], journal: Journal) -> None:
    """On undo, drop the app's modules first imported during the apply (a changed module's new
    ``import``), from ``sys.modules`` and from their parent package: they belong to the new version."""
    before = set(sys.modules)
    tops = frozenset(packages)

    def undo() -> None:
        for name in [n for n in sys.modules if n not in before and n.partition(".")[0] in tops]:
            module = sys.modules.pop(name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and sys.modules[parent].__dict__.get(child) is module:
                delattr(sys.modules[parent], child)

    journal.call(lambda: None, undo)


_SPEC_KEYS = ("__spec__", "__loader__", "__file__", "__cached__", "__path__")


def _retarget(names: Iterable[str], index: BundleIndex, journal: Journal) -> None:
    """Point the live modules ``names`` at the new version: ``__spec__``, ``__loader__``,
    ``__file__``, ``__cached__`` (a package's ``__path__``).

    Paths and the loader are the same in every version, so a push re-points only the modules it
    adds or changes (a changed module's compiled-code path moves with its content). The first push
    of a process re-points every live module: those imported from disk before it. One journal
    entry for them all.
    """
    saved: list[tuple[dict[str, Any], tuple[Any, ...]]] = []
    journal.call(lambda: None, lambda: _restore_specs(saved))  # first: covers a failure half-way
    spec_of = index.spec
    live = sys.modules
    for name in names:
        module = live.get(name)
        if module is None or name not in index.modules:
            continue
        namespace = module.__dict__
        get = namespace.get
        if getattr(get("__spec__"), "_initializing", False):
            continue  # another thread is still importing it: this spec tells the import system so
        spec = spec_of(module.__name__)
        saved.append((namespace, (get("__spec__", MISSING), get("__loader__", MISSING), get("__file__", MISSING),
                                  get("__cached__", MISSING), get("__path__", MISSING))))
        namespace["__spec__"] = spec
        namespace["__loader__"] = spec.loader
        namespace["__file__"] = spec.origin
        namespace["__cached__"] = spec.cached
        if spec.submodule_search_locations is not None:
            namespace["__path__"] = list(spec.submodule_search_locations)


def _restore_specs(saved: list[tuple[dict[str, Any], tuple[Any, ...]]]) -> None:
    for namespace, prior in reversed(saved):
        for key, value in zip(_SPEC_KEYS, prior):
            if value is MISSING:
                namespace.pop(key, None)
            else:
                namespace[key] = value


def _old_source(module: types.ModuleType, disk_sources: dict[str, bytes]) -> bytes | None:
    """The source a live module runs: as recorded when it was imported from disk, else its loader's."""
    recorded = disk_sources.get(module.__name__)
    if recorded is not None:
        return recorded
    loader = getattr(module, "__loader__", None)
    get_source = getattr(loader, "get_source", None)
    if get_source is None:
        return None
    try:
        source = get_source(module.__name__)
    except (ImportError, OSError):
        return None
    return source.encode("utf-8") if isinstance(source, str) else source


def _record(host: _Host, action: str, bundle: Bundle | None, exc: HabaneroError) -> None:
    host.last_failure = {"action": action, "code": exc.code, "message": exc.message,
                         "version": bundle.version if bundle else None, "time": time.time()}
    try:
        host.store.record_failure(action=action, version=bundle.version if bundle else None,
                                  digest=bundle.digest if bundle else None,
                                  key_ids=list(bundle.key_ids) if bundle else [], code=exc.code,
                                  reason=exc.message)
    except Exception:  # the failure itself must still reach the caller
        log.exception("could not record a failed %s in the store's history", action)
