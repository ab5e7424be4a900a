"""The transaction of one process: a new version planned, applied in place, then kept or undone.

A push or rollback reaches every process of the app (see ``overlay.deploy``); in each one it is a
:class:`Change` that goes through the same steps, each of which the deploy waits for in every
process before any of them takes the next:

1. ``prepare()``: diff the target bundle against what this process runs (one pass over the entries,
   often none: opening the bundle knew), build the finder's index for it, and compile every module
   that will run again. A ``SyntaxError`` anywhere refuses the bundle; nothing ran, nothing changed.
2. ``apply()``: holding the interpreter's import lock, rewrite this process's source tree where it
   differs, re-point the changed modules, re-run what changed and patch live functions and classes
   in place. Every mutation (tree files, module dicts, function attributes, class dicts,
   ``sys.modules``, modules first imported meanwhile, the finder's index, ``__spec__``/``__file__``)
   is recorded in a journal.
3. ``commit()`` or ``revert()``: keep it, or replay the journal backwards, leaving the process
   exactly as before (the same objects, ``is``-identical). Either releases the import lock.

A push costs what it changed: the plan, the index, the tree and the re-pointing look only at the
entries that differ. What the store records (staging, the active pointer, history) is the deploy's
job, done once for all the processes.

What other threads of this process can observe while a change applies:

* **Imports of modules not yet imported wait.** From the index swap until the commit (or the undo)
  the applying thread holds the import lock, so another thread that starts such an import (a module
  the push adds, a module not yet used, a third-party module) blocks, then sees the committed new
  version, or the old one after an undo; never a half-applied tree.
* **Modules already imported do not wait.** ``import m`` of a module in ``sys.modules``, and every
  call into it, goes on. Such a thread sees each change as it lands: a function's code swap is one
  atomic store, a class is patched attribute by attribute, so it may run a mix of old and new
  functions during the apply, and the new ones before the push is committed (undone again if it
  fails). So a push first drains the request gate (``overlay.transaction.gate``, :meth:`Change.drain`):
  requests in flight finish, new ones wait until the commit or the undo, and no request observes
  two versions. Code outside the gate (a thread the app started, a long-lived request) may still
  see the mix.
* **Running frames keep their code.** A call, generator or coroutine that started before the push
  finishes on the code it started with; its next call runs the new code.
* **Imports in flight finish on their own terms.** A changed module that another thread is still
  importing has run only part of its old source: the push is refused (undone) and can be repeated.
  An unchanged one keeps its spec until its import is done (other importers keep waiting for it).
* **Known hazard:** if another thread is importing some module X (holding X's module lock) and
  needs the import lock for a nested import while the new code of this push imports X too, both
  threads wait for each other: a deadlock the import system cannot detect. It needs an import of
  the same not-yet-imported module racing the apply step.
* The import lock is held until every process has applied and the store has committed (a rename;
  an fsync with ``sync="commit"``), so first imports elsewhere wait for that too; a ``fork()`` waits
  as well (the interpreter takes the import lock to fork), so a child never starts half-applied.
"""

from __future__ import annotations

import _imp
import concurrent.futures
import contextlib
import gc
import logging
import os
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from overlay.bundle import Bundle, Limits, open_bundle
from overlay.errors import ActivationFailed
from overlay.finder import BundleIndex, OverlayFinder
from overlay.format import delta
from overlay.integrations import hooks
from overlay.keys import TrustedKeys
from overlay.rebinding.journal import MISSING, Journal
from overlay.storage.tree import SourceTree
from overlay.store import Store
from overlay.transaction.gate import Gate
from overlay.transaction.outside import capture

if TYPE_CHECKING:
    from overlay.rebind import ModuleReport
    from overlay.transaction.diff import EntryDiff
    from overlay.transaction.plan import Plan

__all__ = ["Change", "Host", "UpgradeReport", "on_app_loop", "paused_gc"]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds a change waits for another thread's import of a module it changes (see ``apply``).
IMPORT_WAIT = 10.0


@dataclass(eq=False)
class Host:
    """What a change works on in this process: the store, the finder, this process's source tree,
    and the trust to verify with. ``overlay.Overlay`` holds one (a disabled overlay has none)."""

    app_id: str
    store: Store
    finder: OverlayFinder
    tree: SourceTree
    trusted: TrustedKeys
    limits: Limits
    #: Set by the first change: every live module of the app uses the finder's loader and paths.
    retargeted: bool = False
    #: What this process last did: ``{"action", "version", "outcome", "code", "message", "time"}``.
    last_outcome: dict[str, Any] | None = None
    #: The last refusal or failure, as status pages show it.
    last_failure: dict[str, Any] | None = None
    #: The request gate every change drains before it applies.
    gate: Gate = field(default_factory=Gate)
    #: The app's event loop (an ASGI or aiohttp app's), once known: a change runs the app's module
    #: code there, where the app's own module code runs. None: on the thread that applies.
    loop: Any = None

    @property
    def active(self) -> Bundle | None:
        """The bundle this process serves now (None: the code on disk)."""
        index = self.finder.index
        return index.bundle if index is not None else None

    def open_push(self, data: bytes) -> Bundle:
        """Verify pushed bundle bytes with this process's own trusted keys, app id and limits.

        A delta packed against the active bundle is opened against it: the entries the push shares
        with it are taken from there unhashed; anything else (the store's objects) is hashed.
        """
        active = self.active
        return open_bundle(data, self.trusted, app_id=self.app_id, limits=self.limits,
                           content=self.store.objects.get, base=active,
                           base_manifest=lambda d: active.manifest_bytes
                           if active is not None and active.digest == d else None)

    def note(self, action: str, version: int | None, outcome: str, code: str | None = None,
             message: str = "") -> None:
        self.last_outcome = {"action": action, "version": version, "outcome": outcome, "code": code,
                             "message": message, "time": time.time()}
        if outcome != "ok":
            self.last_failure = {"action": action, "code": code, "message": message, "version": version,
                                 "time": self.last_outcome["time"]}


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
    #: One line per process of the app: ``{"pid", "version", "outcome", "ms"}`` (see ``overlay.deploy``).
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: What did not take effect live, and what to do: ``{"source", "what", "fix"}`` each, reported
    #: by the hooks (``overlay.integrations``) and the rebinding.
    not_live: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def patched(self) -> int:
        return sum(len(m.patched) for m in self.modules)

    @property
    def replaced(self) -> int:
        return sum(len(m.replaced) for m in self.modules)


class Clock:
    """Milliseconds per phase of a change, and in all."""

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

    def elapsed(self) -> float:
        return round((time.perf_counter() - self._start) * 1000, 3)


class ApplyFailed(Exception):
    """The new code raised while this process applied it; everything was undone here already."""

    def __init__(self, error: BaseException, remote_traceback: str, leftovers: list[str] | None = None) -> None:
        message = f"{type(error).__name__}: {error}"
        if leftovers:
            message += f" (the undo could not put back everything: {'; '.join(leftovers)})"
        super().__init__(message)
        self.error = error
        self.remote_traceback = remote_traceback
        self.leftovers = leftovers or []


class Change:
    """This process's part of one push or rollback to ``bundle`` (see the module docstring).

    Example (what ``overlay.deploy`` does in every process)::

        change = Change(host, bundle, "push")
        change.prepare()
        change.apply()      # raises ApplyFailed, undone, if the new code raised
        report = change.commit()
    """

    def __init__(self, host: Host, bundle: Bundle, action: str, clock: Clock | None = None) -> None:
        self.host, self.bundle, self.action = host, bundle, action
        self.clock = clock or Clock()
        self.current = host.active
        self.diff: EntryDiff | None = None
        self.plan: Plan | None = None
        self.index: BundleIndex | None = None
        self.report: UpgradeReport | None = None
        self._journal: Journal | None = None
        self._locked = False
        self._held = False

    def prepare(self) -> UpgradeReport:
        """Diff, index and plan; compile what will run. Raises ``CompileFailed`` (or another
        ``BundleRejected``) and changes nothing."""
        # Imported at the first push, not at start-up: a worker that is never pushed to never
        # loads the planner and the rebinder (a tenth of habanero's start-up time).
        from overlay.rebind import check_update
        from overlay.transaction.diff import entry_diff
        from overlay.transaction.plan import make_plan

        finder, current, bundle = self.host.finder, self.current, self.bundle
        # Everything below looks only at what differs: one pass over the entries finds it.
        diff = self.diff = entry_diff(current, bundle)
        previous = finder.index
        derive = current is not None and previous is not None and previous.bundle is current
        index = self.index = finder.index_for(bundle, self.host.tree.root, changed=diff.names if derive else None)
        modules = index.modules
        self.plan = make_plan(current, bundle, diff,
                              live=lambda name: sys.modules.get(name) if name in modules else None,
                              old_source_of=lambda module: _old_source(module, finder.disk_sources),
                              filename_of=index.filename, compile_module=finder.code_cache.compile_module,
                              check_update=check_update)
        self.clock.lap("plan")
        self.report = UpgradeReport(self.action, bundle.version, current.version if current else None,
                                    bundle.digest, **self.plan.summary())
        return self.report

    def drain(self) -> None:
        """Close this process's request gate and wait for the requests in flight (see
        ``overlay.transaction.gate``); it opens again at :meth:`commit` or :meth:`revert`. Raises
        ``DeployInProgress`` (``drain_timeout``), holding nothing, when a request outlasts the
        deadline. Call it after :meth:`prepare` and before :meth:`apply`, off the event loop the
        requests run on."""
        if not self._held:
            self.host.gate.hold()
            self._held = True

    def apply(self) -> None:
        """Run the new version in this process, holding the import lock until commit or revert.

        A changed module that another thread is still importing (a worker starting up) is waited
        for, up to ``IMPORT_WAIT`` seconds, then refused. Raises :class:`ApplyFailed` when the new
        code raised: every change was undone and the lock released already.
        """
        assert self.plan is not None and self.index is not None and self.diff is not None and self.report
        journal = self._journal = Journal()
        _wait_for_imports(self.plan, IMPORT_WAIT)
        # The import lock is held until the deploy says which version is live (or the undo is
        # done): a thread waiting to import sees the committed new version or the old one.
        _imp.acquire_lock()
        self._locked = True
        leftovers: list[str] = []
        try:
            # First in the journal, so undone last: what the new code did outside the app.
            outside = capture(self.host.finder.packages, _live_modules(self.plan), _code_of(self.plan))
            journal.call(lambda: None, lambda: leftovers.extend(outside.restore()))
            with outside.watching(), hooks.applying(journal):  # what this thread does, told from others
                journal.call(lambda: None, self.host.tree.update(self.current, self.bundle, self.diff.names))
                everything = not self.host.retargeted or self.current is None
                _apply_plan(self.plan, self.index, self.host.finder, journal, self.report, self.bundle.version,
                            retarget=None if everything else (*self.plan.added, *self.plan.changed),
                            action=self.action)
            self.clock.lap("apply")
        except BaseException as exc:
            tb = _app_traceback(exc)
            self.revert()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ApplyFailed(exc, tb, leftovers) from exc

    def commit(self) -> UpgradeReport:
        """Keep the new version: the journal is dropped and the import lock released."""
        assert self.report is not None
        self.host.retargeted = True  # every live module of the app now has the finder's loader and paths
        self.host.store.active = self.bundle
        self.host.store.release(self.bundle)  # committed: the store holds its bodies now
        self._journal = None  # kept: nothing can undo it any more (a later revert() does nothing)
        self._release()
        self.report.timings_ms = self.clock.done()
        self.host.note(self.action, self.bundle.version, "ok")
        bundle = self.bundle
        self.host.store.later(lambda: _prepare_next(bundle))
        log.info("%s to version %s: %d changed, %d added, %d removed in %.1f ms", self.action, bundle.version,
                 len(self.report.changed), len(self.report.added), len(self.report.removed),
                 self.report.timings_ms["total"])
        return self.report

    def revert(self) -> None:
        """Undo everything ``apply()`` did (if it started) and release the import lock."""
        journal, self._journal = self._journal, None
        try:
            if journal is not None:
                journal.undo()
        finally:
            self._release()

    @property
    def pending(self) -> bool:
        """Whether this change still holds something (the request gate, the import lock, an undo
        journal): it must end with :meth:`commit` or :meth:`revert`, whatever else fails."""
        return self._held or self._locked or self._journal is not None

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            _imp.release_lock()
        if self._held:  # after the import lock: a request let in imports the committed version
            self._held = False
            self.host.gate.release()


def on_app_loop(loop: Any, work: Callable[[], T]) -> T:
    """Run ``work`` on the app's event loop ``loop`` and wait for it (a push's module code runs
    where the app's own module code runs: ``install(app=...)``'s and an ASGI app's loop); on this
    thread when there is no such loop, it is not running, or this thread runs it already."""
    if loop is None or loop.is_closed() or not loop.is_running():
        return work()
    import asyncio  # loaded already by any app that has a loop

    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        return work()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(work())
            except BaseException as exc:  # handed to the waiting thread, which raises it
                done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done.result()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for the block, in whichever process takes part in a deploy.

    A push allocates a few thousand objects (the manifest's entries), enough to trigger collections
    mid-push; a full one walks the whole heap, tens of milliseconds in a process holding millions
    of objects. What the push allocates is bounded, so collecting after it answers costs nothing
    and keeps its time flat in heap size.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def failure(bundle: Bundle, previous: int | None, error: ApplyFailed, where: str = "") -> ActivationFailed:
    """The refusal a failed apply becomes: what raised, and that the old version still serves."""
    return ActivationFailed(
        f"version {bundle.version} failed while running{where}: {error}; every change was undone and "
        f"version {previous or 'on disk'} is still serving",
        remote_traceback=error.remote_traceback, version=bundle.version)


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


def _apply_plan(plan: Plan, index: BundleIndex, finder: Any, journal: Journal, report: UpgradeReport,
                version: int, *, retarget: Iterable[str] | None, action: str = "push") -> None:
    from overlay.rebind import one_heap_pass, update_module  # loaded by prepare() already
    from overlay.transaction.follow import run_plan

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
    moved = _retarget(index.modules if retarget is None else retarget, index, journal)
    push = hooks.Push(action, version, report.previous_version, tuple(plan.added), tuple(plan.changed),
                      tuple(plan.removed), tuple(plan.data_changed), tuple(c.name for c in plan.rerun),
                      moved=moved, _journal=journal)
    report.not_live = push.notices
    hooks.run("before", push)
    with one_heap_pass(journal):  # closures made from changed code: one heap scan for the whole push
        report.modules.extend(run_plan(plan, lambda change, dirty: update_module(
            sys.modules[change.name], change.new_source, filename=change.filename,
            old_source=change.old_source, journal=journal, version=version, code=change.code,
            diff=change.checked, dirty=dirty, migrate=change.checked is not None or change.code is not None),
            live=lambda name: sys.modules.get(name) if name in index.modules else None,
            filename_of=index.filename))
    push.modules = report.modules
    # Modules that ran again to follow what they import (overlay.transaction.follow) count too.
    push.reran = tuple(dict.fromkeys((*push.reran, *(r.module for r in report.modules))))
    hooks.run("after", push)


def _live_modules(plan: Plan) -> list[types.ModuleType]:
    return [m for m in (sys.modules.get(c.name) for c in plan.rerun) if m is not None]


def _code_of(plan: Plan) -> Iterator[types.CodeType]:
    """The code a push will run: each changed module's, or its changed statements'."""
    for change in plan.rerun:
        if change.code is not None:
            yield change.code
        elif change.checked is not None:
            yield from change.checked.compiled.values()


def _half_imported(plan: Plan) -> list[str]:
    return [c.name for c in plan.rerun
            if getattr(getattr(sys.modules.get(c.name), "__spec__", None), "_initializing", False)]


def _wait_for_imports(plan: Plan, timeout: float) -> None:
    """Let imports of changed modules that other threads are running finish first (a worker that
    is still starting up imports the app): up to ``timeout`` seconds, without the import lock,
    which those imports need."""
    deadline = time.monotonic() + timeout
    while _half_imported(plan) and time.monotonic() < deadline:
        time.sleep(0.005)


def _refuse_half_imported(plan: Plan) -> None:
    """A module another thread is still importing has run only part of its old source: re-running
    the changed statements now would be overwritten by the rest of the old import."""
    busy = _half_imported(plan)
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


def _retarget(names: Iterable[str], index: BundleIndex, journal: Journal) -> dict[str, str]:
    """Point the live modules ``names`` at the new version: ``__spec__``, ``__loader__``,
    ``__file__``, ``__cached__`` (a package's ``__path__``).

    Paths and the loader are the same in every version, so a push re-points only the modules it
    adds or changes (a changed module's compiled-code path moves with its content). The first push
    of a process re-points every live module: those imported from disk before it. One journal
    entry for them all. Returns the package directories that moved, ``{old: new}``.
    """
    moved: dict[str, str] = {}
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
            before, after = saved[-1][1][4], namespace["__path__"]
            if isinstance(before, list) and before and after and before[0] != after[0]:
                moved[os.path.abspath(before[0])] = after[0]
    return moved


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


def move_tree(host: Host, tree: SourceTree) -> None:
    """Serve this process's version from ``tree`` from now on: lay it out, and re-point every live
    module at it. For a forked child, whose modules still name its parent's tree. The ``after``
    hooks are told what moved (a framework that keeps a package's directory re-points it)."""
    active = host.active
    if active is not None:
        tree.lay_out(active)
    host.tree = tree
    if active is None:
        return
    index = host.finder.index_for(active, tree.root)  # built afresh: every path is new
    _imp.acquire_lock()
    try:
        host.finder.set_index(index)
        moved = _retarget(index.modules, index, Journal())
        if moved:
            hooks.run("after", hooks.Push("move", active.version, active.version, (), (), (), (), (), moved=moved))
    finally:
        _imp.release_lock()
