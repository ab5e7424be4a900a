"""One push, every process of the app, or none: the deploy across the processes of one store.

Real apps run as several processes (gunicorn and uvicorn workers, a fork pool), all with the same
store. Whichever process receives a push drives it, holding the store's deploy lock from start to
end, and takes every other live process (found in the registry, see ``overlay.cluster``) through
the same steps as itself:

1. **verify** the bundle and **plan** it here: diff, compile, plan (``overlay.upgrade.Change``);
2. **stage** it in the store, once (the others may read it from there: a delta packed against a
   version one of them does not run);
3. every other process **verifies** it against its own trusted keys and **plans** its own change;
   if one refuses, everyone is told to drop it (``abort``) and nothing was applied anywhere;
4. only if every process is ready: **apply** everywhere, each under its own import lock;
5. only if every process applied cleanly: **commit** the store (the state file's atomic replace is
   the commit point), then tell everyone to keep it. Otherwise everyone **reverts**.

A process that refuses, fails, dies or stops answering makes the whole deploy fail, naming it and
its reason; the others never applied it, or undo it. If the driving process dies, each other
process keeps or undoes the change by what the store says (see ``overlay.cluster.member``): every
survivor ends on one version, and the store agrees.

A process that joins later (started, restarted, recycled, or forked from a process that installed
the overlay) registers under the same deploy lock and starts on the store's active version, so no
deploy slips between its reading the store and its taking part.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from overlay.bundle import Bundle
from overlay.cluster.member import Member
from overlay.cluster.registry import Registry, WorkerEntry
from overlay.cluster.rounds import Peer, Round
from overlay.errors import ControlRejected, DeployInProgress, HabaneroError, WorkerRefused
from overlay.store import Store
from overlay.upgrade import ApplyFailed, Change, Clock, Host, UpgradeReport, failure, paused_gc

__all__ = ["Gate", "Node", "catch_up", "joining", "push", "rollback", "start", "workers"]

log = logging.getLogger(__name__)

#: Seconds a deploy waits for another one (elsewhere) to finish before it says deploy_in_progress.
DEPLOY_WAIT = 10.0
#: Seconds a process joining the app waits for a deploy under way.
JOIN_WAIT = 60.0
#: Seconds every process has to verify and plan, then to apply, then to acknowledge the verdict.
PREPARE_TIMEOUT, APPLY_TIMEOUT, FINISH_TIMEOUT = 30.0, 60.0, 5.0
#: Seconds a status question waits for each process.
STATUS_TIMEOUT = 2.0


class Gate(Protocol):
    """A word from outside this store between the steps of a deploy (a fleet's, through a channel:
    ``overlay.serving.channel``). Each method gets one line per process so far and returns to go on,
    or raises a ``HabaneroError`` to stop: every process here then drops or undoes the change."""


    def prepared(self, bundle: Bundle, lines: list[dict[str, Any]]) -> None: ...
    def applied(self, bundle: Bundle, lines: list[dict[str, Any]]) -> None: ...


@dataclass(eq=False)
class Node:
    """This process among the processes of its store: what it runs (``host``), where the others are
    (``registry``), its own entry and the member that answers them."""

    host: Host
    registry: Registry
    entry: WorkerEntry
    member: Member | None = None
    #: Set once this process takes part in deploys (at once, or after a fork once it caught up).
    joined: threading.Event = field(default_factory=threading.Event)
    #: What this process says of itself besides its version (its listen address, its role).
    info: dict[str, Any] = field(default_factory=dict)

    def others(self) -> list[WorkerEntry]:
        return self.registry.live(skip=self.entry.id)


# --------------------------------------------------------------------------------------- joining


@contextlib.contextmanager
def joining(store: Store, registry: Registry, info: dict[str, Any]) -> Iterator[WorkerEntry]:
    """Register this process, holding the deploy lock until the block has set it up: no deploy
    runs between its reading the store's active version and its answering deploys."""
    with store.deploying(JOIN_WAIT):
        entry = registry.create(info)
        try:
            yield entry
        except BaseException:
            registry.remove(entry)
            raise


def start(node: Node, status: Callable[[], dict[str, Any]]) -> None:
    """Answer the other processes from now on (call it inside :func:`joining`, then set
    ``node.joined`` once this process runs the app's active version)."""
    node.member = Member(node.host, node.entry, status=status)
    node.member.start()


def catch_up(node: Node) -> UpgradeReport | None:
    """Run the store's active version if this process runs another (a child forked before a deploy
    its parent took part in, or a process that missed one). Hold the deploy lock to call it."""
    host = node.host
    pointer, _ = host.store.pointer()
    running = host.active
    if pointer is None or (running is not None and running.digest == pointer["digest"]):
        return None
    target = host.store.load(pointer["version"])
    change = Change(host, target, "catch_up")
    change.prepare()
    try:
        change.apply()
    except ApplyFailed as failed:
        host.note("catch_up", target.version, "failed", "activation_failed", str(failed))
        raise failure(target, running.version if running else None, failed, " in a process catching up") from None
    log.info("caught up with the app: v%s", target.version)
    return change.commit()


# --------------------------------------------------------------------------------------- deploys


@contextlib.contextmanager
def _deploying(node: Node) -> Iterator[None]:
    """The store's deploy lock, this process's own, and the cyclic garbage collector paused (see
    ``overlay.upgrade.paused_gc``)."""
    with node.host.store.deploying(DEPLOY_WAIT):
        member = node.member
        if member is not None and not member.busy.acquire(blocking=False):
            raise DeployInProgress("this process is busy with another change; push again")
        try:
            with paused_gc():
                yield
        finally:
            if member is not None:
                member.busy.release()


def push(node: Node, data: bytes, *, gate: Gate | None = None, parent: bool = True) -> UpgradeReport:
    """Verify a pushed bundle and make it the running version of every process, or of none.

    ``gate`` waits for a fleet's word between the steps; ``parent=False`` skips the parent check
    (a store catching up with its fleet runs the fleet's version, whatever it ran before)."""
    host = node.host
    with _deploying(node):
        clock = Clock()
        try:
            bundle = host.open_push(data)
        except HabaneroError as exc:
            if not exc.unverified:  # anyone's bytes: the control plane counts them (see overlay.serving.guard)
                _record(node, "push", None, exc)
            raise
        try:
            host.store.check_fresh(bundle)
            if parent:
                host.store.check_parent(bundle, host.active)
        except HabaneroError as exc:
            # Signed, but stale: whoever holds an old bundle may send it again and again. Each is
            # refused; the history keeps the first of each (bundle, reason), not every replay.
            if _first_time(node, bundle, exc):
                _record(node, "push", bundle, exc)
            raise
        clock.lap("verify")
        return _everywhere(node, bundle, "push", clock, wire=data, gate=gate)


def rollback(node: Node, to: int | None = None, *, expect: int | None = None,
             action: str = "rollback", gate: Gate | None = None) -> UpgradeReport:
    """Return every process to the previous stored version (or version ``to``), as a push would.

    ``expect`` is the version the caller believes is active; a mismatch refuses the rollback, so a
    replayed request does nothing harmful. Both are judged by the store, whichever process asks.
    ``action="revert"``: probation's own rollback to the last permanent version.
    """
    store = node.host.store
    with _deploying(node):
        clock = Clock()
        pointer, _ = store.pointer()
        active = pointer["version"] if pointer is not None else None
        if expect is not None and active != expect:
            raise ControlRejected(
                f"rollback expected version {expect} to be active, but it is "
                f"{active if active is not None else 'none (code on disk)'}; check `habanero-pack status`",
                code="version_mismatch")
        if to is None:
            target = store.previous(below=active) if active is not None else None
            if target is None:
                raise ControlRejected("there is no earlier stored version to roll back to",
                                      code="nothing_to_roll_back")
        else:
            if to == active:
                raise ControlRejected(f"version {to} is already active", code="nothing_to_roll_back")
            target = store.load(to)
        clock.lap("verify")
        return _everywhere(node, target, action, clock, gate=gate)


def _everywhere(node: Node, bundle: Bundle, action: str, clock: Clock, *, wire: bytes = b"",
                gate: Gate | None = None) -> UpgradeReport:
    host, store = node.host, node.host.store
    change = Change(host, bundle, action, clock)
    try:
        change.prepare()
        assert change.diff is not None
        store.stage(bundle, known=change.current, names=(*change.diff.added, *change.diff.changed))
        clock.lap("stage")
    except HabaneroError as exc:
        _record(node, action, bundle, exc)
        raise
    _drain(node, change, bundle, action)
    try:
        return _drained(node, change, bundle, action, clock, wire=wire, gate=gate)
    except BaseException:
        # Whatever failed before this process settled (a peer's socket, the registry, the fleet's
        # word): the request gate opens again and the change is undone; never left held.
        if change.pending:
            change.revert()
            _discard(store, bundle)
        raise


def _drained(node: Node, change: Change, bundle: Bundle, action: str, clock: Clock, *, wire: bytes,
             gate: Gate | None) -> UpgradeReport:
    """The rest of :func:`_everywhere`, once this process's requests drained."""
    round_ = Round(node.others())
    try:
        header = {"op": "prepare", "txn": os.urandom(8).hex(), "action": action, "version": bundle.version,
                  "digest": bundle.digest, "coordinator": os.getpid()}
        refused = round_.ask(header, wire, PREPARE_TIMEOUT)
        clock.lap("prepare")
        if refused:
            round_.tell({"op": "abort"}, FINISH_TIMEOUT)
            change.revert()  # nothing applied: lets this process's requests go
            _give_up(node, change, bundle, action, round_, applied=False)
        if gate is not None:
            _wait_for(gate.prepared, node, change, bundle, action, round_, applied=False)
        # Every process applies at the same time: the step goes out to all, ours runs, then we wait.
        round_.send({"op": "apply"})
        local: ApplyFailed | None = None
        try:
            change.apply()
        except ApplyFailed as exc:
            local = exc
        failed = round_.collect(APPLY_TIMEOUT)
        if local is not None or failed:
            round_.tell({"op": "revert"}, FINISH_TIMEOUT)
            if local is None:
                change.revert()
            _give_up(node, change, bundle, action, round_, applied=True, local=local)
        if gate is not None:
            _wait_for(gate.applied, node, change, bundle, action, round_, applied=True)
        interrupted = _commit_store(node, change, bundle, action, round_)
        clock.lap("commit")
        try:
            round_.ask({"op": "commit"}, b"", FINISH_TIMEOUT)
        except Exception:  # past the commit point: each process settles by the store's word anyway
            log.exception("could not tell every process that v%s was committed; they ask the store",
                          bundle.version)
    finally:
        round_.close()
    report = change.commit()
    report.workers = _lines(node, round_, report)
    _gather_not_live(report, round_)
    if interrupted is not None:
        raise interrupted
    return report


def _drain(node: Node, change: Change, bundle: Bundle, action: str) -> None:
    """This process's requests in flight finish; new ones wait (``overlay.transaction.gate``)."""
    try:
        change.drain()
    except HabaneroError as exc:
        _record(node, action, bundle, exc)
        _discard(node.host.store, bundle)
        raise
    change.clock.lap("drain")


def _wait_for(step: Callable[[Bundle, list[dict[str, Any]]], None], node: Node, change: Change, bundle: Bundle,
              action: str, round_: Round, *, applied: bool) -> None:
    """The gate's word after every process here prepared (or applied): go on, or stop, every process
    here dropping (or undoing) the change, and raise the gate's reason with one line per process."""
    outcome = "applied" if applied else "ready"
    own = {"pid": os.getpid(), "version": bundle.version, "outcome": outcome, "ms": change.clock.elapsed()}
    lines = [own, *(_peer_line(p, outcome) for p in round_.peers)]
    try:
        step(bundle, lines)
    except HabaneroError as exc:
        round_.tell({"op": "revert" if applied else "abort"}, FINISH_TIMEOUT)
        if applied:
            change.revert()
        previous = change.current.version if change.current else None
        exc.details["workers"] = [{**line, "version": previous, "outcome": "reverted" if applied else "aborted"}
                                  for line in lines]
        _record(node, action, bundle, exc)
        _discard(node.host.store, bundle)
        raise


def _commit_store(node: Node, change: Change, bundle: Bundle, action: str, round_: Round) -> BaseException | None:
    """The commit point: the store names ``bundle`` active. Raises (every process reverted) if the
    store could not record it; returns a ``KeyboardInterrupt``/``SystemExit`` that landed after the
    commit point, to re-raise once every process kept the change."""
    store = node.host.store
    try:
        # Inside the undo scope: if the store cannot record the new version (another process
        # pushed first, a full disk), no process may run code the disk does not call active.
        store.commit(bundle, action=action)
    except BaseException as exc:
        if not _names(store, bundle):
            round_.tell({"op": "revert"}, FINISH_TIMEOUT)
            change.revert()
            previous = change.current.version if change.current else None
            error = failure(bundle, previous, ApplyFailed(exc, ""), " (the store could not record it)")
            _record(node, action, bundle, error)
            _discard(store, bundle)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise error from exc
        # Past the commit point (a directory fsync failed, a signal landed): the disk calls the new
        # version active, so every process keeps it, as a process that lost us would decide.
        log.warning("v%d is committed, but the store raised after its commit point: %r", bundle.version, exc)
        return None if isinstance(exc, Exception) else exc
    return None


def _names(store: Store, bundle: Bundle) -> bool:
    """Whether the store's state file names ``bundle`` active, read under the store's lock."""
    try:
        return store.names_active(bundle.digest)
    except (OSError, HabaneroError):
        return False


def _give_up(node: Node, change: Change, bundle: Bundle, action: str, round_: Round, *, applied: bool,
             local: ApplyFailed | None = None) -> None:
    """Record and raise why the deploy stopped; every process is back on (or still on) the old version.

    The error names the process that refused or failed first, and carries one line per process."""
    store = node.host.store
    previous = change.current.version if change.current else None
    failed = [p for p in round_.peers if not p.ok]
    own = {"pid": os.getpid(), "version": previous, "ms": change.clock.elapsed(),
           "outcome": "failed" if local is not None else "reverted" if applied else "ready"}
    if local is not None:
        own["reason"] = f"process {own['pid']} {local}"
    lines = [own, *(_peer_line(p, "reverted" if applied else "ready") for p in round_.peers)]
    raised = [p for p in failed if not p.lost]
    if local is not None:  # this process's own apply failed (named when the app has others)
        error: HabaneroError = failure(bundle, previous, local, f" in process {os.getpid()}" if round_.peers else "")
    elif applied and raised:
        first = raised[0]
        error = failure(bundle, previous, ApplyFailed(RuntimeError(str(first.answer.get("message", ""))),
                                                      str(first.answer.get("traceback", ""))),
                        f" in process {first.pid}")
    else:
        code = "worker_lost" if any(p.lost for p in failed) and not raised else "worker_refused"
        outcome = (f"every process undid version {bundle.version}" if applied else
                   f"no process applied version {bundle.version}")
        error = WorkerRefused(f"{'; '.join(p.describe() for p in failed)}; {outcome}, and version "
                              f"{previous or 'on disk'} is still serving everywhere", code=code)
    error.details["workers"] = lines
    _record(node, action, bundle, error)
    _discard(store, bundle)
    raise error


def _lines(node: Node, round_: Round, report: UpgradeReport) -> list[dict[str, Any]]:
    """One line per process of a deploy that went through: this one first."""
    own = {"pid": os.getpid(), "version": report.version, "outcome": "applied",
           "ms": report.timings_ms.get("total", 0.0)}
    return [own, *(_peer_line(p, "applied") for p in round_.peers)]


def _gather_not_live(report: UpgradeReport, round_: Round) -> None:
    """Every process's hooks judge what could not take effect live in it (a worker may hold a
    framework table another does not): the report lists each notice once, whoever found it."""
    seen = {(n["source"], n["what"], n["fix"]) for n in report.not_live}
    for peer in round_.peers:
        notices = peer.answer.get("not_live") if peer.ok else None
        for notice in notices if isinstance(notices, list) else []:
            if isinstance(notice, dict) and all(isinstance(notice.get(k), str) for k in ("source", "what", "fix")):
                key = (notice["source"], notice["what"], notice["fix"])
                if key not in seen:
                    seen.add(key)
                    report.not_live.append({"source": key[0], "what": key[1], "fix": key[2]})


def _peer_line(peer: Peer, outcome: str) -> dict[str, Any]:
    if outcome == "applied" and peer.ok and "version" in peer.answer and peer.answer["version"] is None:
        outcome = "reverted"  # it settled alone, before our word, and the store did not name the version then
    line: dict[str, Any] = {"pid": peer.pid, "outcome": outcome if peer.ok else "lost" if peer.lost else
                            str(peer.answer.get("code", "refused")), "ms": peer.answer.get("ms")}
    if "version" in peer.answer:
        line["version"] = peer.answer["version"]
    if not peer.ok:
        line["reason"] = peer.describe()
    return line


#: Stale bundles refused lately, by (digest, code): a replay of one is refused without a record.
_REFUSED: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
_REFUSED_KEPT = 64


def _first_time(node: Node, bundle: Bundle, exc: HabaneroError) -> bool:
    key = (bundle.digest, exc.code)
    if key in _REFUSED:
        _REFUSED.move_to_end(key)
        return False
    _REFUSED[key] = None
    while len(_REFUSED) > _REFUSED_KEPT:
        _REFUSED.popitem(last=False)
    return True


def _record(node: Node, action: str, bundle: Bundle | None, exc: HabaneroError) -> None:
    version = bundle.version if bundle else None
    node.host.note(action, version, "failed", exc.code, exc.message)
    try:
        node.host.store.record_failure(action=action, version=version, digest=bundle.digest if bundle else None,
                                       key_ids=list(bundle.key_ids) if bundle else [], code=exc.code,
                                       reason=exc.message)
    except Exception:  # the failure itself must still reach the caller
        log.exception("could not record a failed %s in the store's history", action)


def _discard(store: Store, bundle: Bundle) -> None:
    try:
        store.discard(bundle)
    except Exception:  # the undo already happened; a leftover file is cleaned at the next open
        log.exception("could not discard the staged files of failed version %s", bundle.version)


# ---------------------------------------------------------------------------------------- status


def workers(node: Node, own: dict[str, Any]) -> list[dict[str, Any]]:
    """Every live process of the app, as it describes itself (``own`` is this one's description);
    a process that does not answer within ``STATUS_TIMEOUT`` (one deadline for all) is left out."""
    round_ = Round(node.others(), connect_timeout=STATUS_TIMEOUT)
    try:
        round_.ask({"op": "status"}, b"", STATUS_TIMEOUT)
    finally:
        round_.close()
    return [own, *(peer.answer["worker"] for peer in round_.peers
                   if peer.ok and isinstance(peer.answer.get("worker"), dict))]
