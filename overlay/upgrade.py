"""The push transaction: verify, stage, plan, apply in place, then commit or undo everything.

One deploy runs at a time (a second gets ``DeployInProgress``). While the apply step runs, the
deploying thread holds the interpreter's import lock, so no other thread can *start* an import
and see a half-applied module tree. Threads that are already running keep running: a function call
that began before the push finishes on the code it started with, and its next call runs the new
code (functions are patched in place, so a running frame's code object never changes under it).

Every mutation of the apply step (module dicts, function attributes, class dicts, ``sys.modules``,
the finder's index) is recorded in a journal; on any exception the journal is replayed backwards,
leaving the process exactly as before (the same objects, ``is``-identical), and the error is
re-raised as ``ActivationFailed`` carrying the traceback text. Only after a clean apply is the
store's active pointer flipped, so a crash mid-apply boots the previous version.
"""

from __future__ import annotations

import _imp
import contextlib
import logging
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ._journal import Journal
from ._plan import Plan, make_plan
from .bundle import Bundle, Limits, open_bundle
from .errors import ActivationFailed, ControlRejected, DeployInProgress, HabaneroError
from .finder import BundleIndex  # noqa: F401  (type of the index)
from .keys import TrustedKeys
from .rebind import ModuleReport, one_heap_pass, update_module

log = logging.getLogger(__name__)


class _Host(Protocol):
    """What the transaction needs from the ``Overlay`` handle."""

    app_id: str
    store: Any
    finder: Any
    trusted: TrustedKeys
    limits: Limits
    deploy_lock: threading.Lock


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
    if not host.deploy_lock.acquire(blocking=False):
        raise DeployInProgress("another deploy is in progress; wait for it to finish and push again")
    try:
        yield
    finally:
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
            bundle = open_bundle(data, host.trusted, app_id=host.app_id, limits=host.limits,
                                 content=_content_lookup(host), base_manifest=_base_manifest(host))
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


def _content_lookup(host: _Host) -> Callable[[str], bytes | None]:
    """Entry bodies by sha256: from the active bundle in memory, else from the store's objects."""
    active = host.store.active
    by_hash = {e.sha256: e for e in active.entries.values()} if active is not None else {}

    def lookup(sha256: str) -> bytes | None:
        entry = by_hash.get(sha256)
        if entry is not None:
            return active.payload[entry.offset : entry.offset + entry.size]  # type: ignore[union-attr]
        return host.store.object(sha256)

    return lookup


def _base_manifest(host: _Host) -> Callable[[str], bytes | None]:
    """A packed push must be packed against the active bundle's manifest (the CLI asks for it)."""
    active = host.store.active
    return lambda digest: active.manifest_bytes if active is not None and active.digest == digest else None


def _transition(host: _Host, bundle: Bundle, action: str, clock: _Clock) -> UpgradeReport:
    store, finder = host.store, host.finder
    current: Bundle | None = store.active
    try:
        # Plan against the paths the version will have, before writing anything: a bundle that
        # does not compile leaves nothing behind but its history entry.
        index = finder.index_for(bundle, store.tree_path(bundle))
        plan = make_plan(current, bundle, live=_live_modules(index),
                         old_source_of=lambda module: _old_source(module, finder.disk_sources),
                         filename_of=index.filename, compile_module=finder.code_cache.compile_module)
        clock.lap("plan")
        store.stage(bundle)
        store.tree(bundle)
        clock.lap("stage")
    except HabaneroError as exc:
        _record(host, action, bundle, exc)
        raise
    report = UpgradeReport(action, bundle.version, current.version if current else None, bundle.digest,
                           **plan.summary())
    journal = Journal()
    try:
        with _import_lock():
            _apply_plan(plan, index, finder, journal, report, bundle.version)
        clock.lap("apply")
        # Inside the undo scope: if the store cannot record the new version (another process
        # pushed first, a full disk), the process must not run code the disk does not call active.
        store.commit(bundle, action=action)
        clock.lap("commit")
    except BaseException as exc:
        tb = traceback.format_exc()
        try:
            journal.undo()
        finally:
            failure = ActivationFailed(
                f"version {bundle.version} failed while running: {type(exc).__name__}: {exc}; every change "
                f"was undone and version {report.previous_version or 'on disk'} is still serving",
                remote_traceback=tb, version=bundle.version)
            _record(host, action, bundle, failure)
            _discard(store, bundle)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise failure from exc
    report.timings_ms = clock.done()
    log.info("%s to version %s: %d changed, %d added, %d removed in %.1f ms", action, bundle.version,
             len(plan.changed), len(plan.added), len(plan.removed), report.timings_ms["total"])
    return report


def _discard(store: Any, bundle: Bundle) -> None:
    try:
        store.discard(bundle)
    except Exception:  # the undo already happened; a leftover file is cleaned at the next open
        log.exception("could not discard the staged files of failed version %s", bundle.version)


def _apply_plan(plan: Plan, index: BundleIndex, finder: Any, journal: Journal, report: UpgradeReport,
                version: int) -> None:
    previous = finder.set_index(index)
    journal.call(lambda: None, lambda: finder.set_index(previous))
    for name in plan.removed:
        module = sys.modules.get(name)
        if module is not None:
            journal.delitem(sys.modules, name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                journal.delattr(sys.modules[parent], child)
    with one_heap_pass(journal):  # closures made from changed code: one heap scan for the whole push
        for change in plan.rerun:
            module = sys.modules[change.name]
            _retarget(module, index, journal)
            report.modules.append(update_module(
                module, change.new_source, filename=change.filename, old_source=change.old_source,
                journal=journal, version=version, code=change.code))


def _retarget(module: types.ModuleType, index: BundleIndex, journal: Journal) -> None:
    """Point a live module's ``__spec__``, ``__loader__`` and ``__file__`` at the new version."""
    spec = index.spec(module.__name__)
    namespace = module.__dict__
    for key, value in (("__spec__", spec), ("__loader__", spec.loader), ("__file__", spec.origin),
                       ("__cached__", spec.cached)):
        journal.setitem(namespace, key, value)
    if spec.submodule_search_locations is not None:
        journal.setitem(namespace, "__path__", list(spec.submodule_search_locations))


def _live_modules(index: BundleIndex) -> dict[str, types.ModuleType]:
    return {name: sys.modules[name] for name in index.module_names() if name in sys.modules}


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
