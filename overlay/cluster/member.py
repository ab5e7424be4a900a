"""This process as the other processes of its store see it: a Unix socket that takes part in deploys.

The process that receives a push (over HTTP, or ``ov.apply``) drives it (``overlay.deploy``) and
talks to every other live process through its socket, one connection per deploy::

    coordinator                              this process
    prepare {action, version, digest} + wire ──►  verify with its own trusted keys, plan, compile
                                         ◄──  ready | refused {code, message}
    abort   (someone refused)            ──►  drop the plan; nothing was applied
    apply                                ──►  apply in place, holding the import lock
                                         ◄──  applied | failed {traceback}   (a failure is undone here)
    commit | revert                      ──►  keep it, or undo it; the import lock is released
                                         ◄──  done

A ``status`` connection asks what this process runs. The coordinator commits the store between
``applied`` from everyone and ``commit``; so when its word does not come (it was killed, it
crashed, it gave up on this process), this process decides by the store itself, once the
coordinator's deploy is over (it holds the store's deploy lock from first step to last): the
version the state file names is kept, any other is undone. Until then it waits, however long it
takes: a decision made alone, earlier, could differ from the one the coordinator writes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from overlay.bundle import Bundle
from overlay.cluster import messages
from overlay.cluster.messages import Gone
from overlay.cluster.registry import WorkerEntry
from overlay.errors import ControlRejected, HabaneroError
from overlay.upgrade import ApplyFailed, Change, Clock, Host, on_app_loop, paused_gc

__all__ = ["Member"]

logger = logging.getLogger("overlay.cluster")

#: How long one message may take to arrive once it started arriving.
MESSAGE_TIMEOUT = 30.0


class Member:
    """Serves this process's socket (see the module docstring) on a daemon thread."""

    def __init__(self, host: Host, entry: WorkerEntry, *, status: Callable[[], dict[str, Any]]) -> None:
        self.host, self.entry, self._status = host, entry, status
        self._server: socket.socket | None = None
        #: One change at a time in this process, whoever asks for it.
        self.busy = threading.Lock()

    def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(os.fspath(self.entry.socket))
            os.chmod(self.entry.socket, 0o600)
            server.listen(16)
        except BaseException:
            server.close()
            raise
        self._server = server
        threading.Thread(target=self._accept, args=(server,), name="habanero-member", daemon=True).start()

    def stop(self, *, unlink: bool = True) -> None:
        """Stop answering; ``unlink=False`` when the slot was given back already (its socket path
        may be another process's by now)."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.entry.socket)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's socket and thread are the parent's; drop them unused."""
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                os.close(server.detach())

    # ------------------------------------------------------------------------------ serving

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                conn, _ = server.accept()
            except OSError as exc:
                if self._server is not server:
                    return  # closed by stop()
                # Out of file descriptors or buffers for a moment: a member that stopped accepting
                # would fail every later deploy of the app, so it waits and accepts again.
                logger.warning("habanero: this process's deploy socket cannot accept (%s); retrying", exc)
                time.sleep(0.5)
                continue
            try:
                if messages.peer_uid(conn) not in (os.getuid(), 0):
                    conn.close()  # only this user's processes (and root) may drive our deploys
                    continue
                threading.Thread(target=self._converse, args=(conn,), name="habanero-member-conversation",
                                 daemon=True).start()
            except (OSError, RuntimeError) as exc:  # no thread to be had: this deploy cannot be served
                logger.warning("habanero: a deploy conversation could not start (%s)", exc)
                conn.close()

    def _converse(self, conn: socket.socket) -> None:
        with conn:
            try:
                header, payload = messages.receive(conn, time.monotonic() + MESSAGE_TIMEOUT)
                if header.get("op") == "status":
                    messages.send(conn, {"ok": True, "worker": self._status()})
                elif header.get("op") == "prepare":
                    self._take_part(conn, header, payload)
                else:
                    messages.send(conn, {"ok": False, "code": "bad_request", "message": "unknown operation"})
            except Gone as exc:
                logger.debug("a deploy conversation ended: %s", exc)
            except Exception:  # never let a conversation kill the member
                logger.exception("habanero: a deploy conversation failed")

    def _take_part(self, conn: socket.socket, header: dict[str, Any], payload: bytes) -> None:
        """Our part of one deploy: prepare, then apply and commit or revert as the coordinator says."""
        if not self.busy.acquire(blocking=False):
            messages.send(conn, _refusal("deploy_in_progress", "this process is busy with another change"))
            return
        try:
            clock = Clock()
            try:
                with paused_gc():  # as in the process that drives the deploy (not while waiting for it)
                    bundle = self._target(header, payload)
                    change = Change(self.host, bundle, str(header["action"]), clock)
                    change.prepare()
                change.drain()  # all or none: a process whose requests do not drain in time refuses
            except HabaneroError as exc:
                self.host.note(str(header.get("action")), header.get("version"), "refused", exc.code, exc.message)
                messages.send(conn, _refusal(exc.code, exc.message))
                return
            try:
                messages.send(conn, {"ok": True, "pid": os.getpid(), "ms": clock.elapsed(),
                                     "running": change.current.version if change.current else None})
                step, _ = self._next(conn)
                if step.get("op") != "apply":
                    change.revert()  # lets this process's requests go
                    self.host.note(change.action, bundle.version, "aborted")
                    return  # aborted: nothing was applied here
                on_app_loop(self.host.loop, lambda: self._apply_and_settle(conn, change, bundle, clock))
            except BaseException:
                # The coordinator vanished (or anything else failed) before this process settled:
                # never leave its request gate closed or a change half-held.
                if change.pending:
                    change.revert()
                    self.host.note(change.action, bundle.version, "aborted")
                raise
        finally:
            self.busy.release()

    def _apply_and_settle(self, conn: socket.socket, change: Change, bundle: Bundle, clock: Clock) -> None:
        """Apply, then keep or undo as the coordinator (or the store) says: on the app's event loop
        when it has one (where its module code runs), else on this thread."""
        try:
            with paused_gc():
                change.apply()
        except ApplyFailed as failed:
            self.host.note(change.action, bundle.version, "failed", "activation_failed", str(failed))
            messages.send(conn, {"ok": False, "pid": os.getpid(), "code": "activation_failed",
                                 "message": str(failed), "traceback": failed.remote_traceback})
            return
        # Applied and holding the import lock: from here on this process keeps the change or
        # undoes it whatever happens, and it decides as the store does.
        keep = False
        try:
            try:
                messages.send(conn, {"ok": True, "pid": os.getpid(), "ms": clock.elapsed()})
                verdict, _ = self._next(conn)
                keep = verdict.get("op") == "commit"
            except BaseException as exc:
                keep = self._committed(bundle)  # the coordinator is gone, or this thread failed
                logger.warning("habanero: the deploy of v%d ended without its last word (%s); the store "
                               "says it %s", bundle.version, exc or type(exc).__name__,
                               "was committed" if keep else "was not committed")
                if not isinstance(exc, Exception):
                    raise
        finally:
            if keep:
                change.commit()
            else:
                change.revert()
                self.host.note(change.action, bundle.version, "reverted")
        with contextlib.suppress(Gone):
            messages.send(conn, {"ok": True, "pid": os.getpid(), "ms": clock.elapsed(),
                                 "version": bundle.version if keep else None,
                                 "not_live": change.report.not_live if keep and change.report else []})

    def _target(self, header: dict[str, Any], payload: bytes) -> Bundle:
        """The bundle of this deploy, verified here with this process's own trusted keys."""
        host, store = self.host, self.host.store
        version, digest = header.get("version"), header.get("digest")
        if type(version) is not int or not isinstance(digest, str):
            raise ControlRejected("a deploy message without a version and digest", code="bad_request")
        bundle: Bundle | None = None
        if header.get("action") == "push":
            try:
                bundle = host.open_push(payload)
            except HabaneroError as exc:
                if exc.code != "parent_missing":
                    raise
                # Packed against a version this process does not run: the whole bundle is staged.
                staged = store.read_bundle(version, digest)
                if staged is None:
                    raise
                bundle = host.open_push(staged)
            store.check_fresh(bundle)
        else:
            bundle = store.load(version)
        if (bundle.version, bundle.digest) != (version, digest):
            raise ControlRejected(f"the deploy names v{version} ({digest[:12]}) but its bundle is v{bundle.version} "
                                  f"({bundle.digest[:12]})", code="bad_request")
        return bundle

    def _next(self, conn: socket.socket) -> messages.Message:
        """The coordinator's next word; waits while its deploy runs. Gone when it closed the
        connection, or its deploy is over without a word (it died; a process it forked meanwhile
        may still hold the connection open).

        The coordinator holds the store's deploy lock from the first step to the last, so the lock,
        not its pid, says whether it still runs: a pid may be another namespace's, or reused.
        """
        with selectors.DefaultSelector() as selector:  # select() fails on descriptors past 1023
            selector.register(conn, selectors.EVENT_READ)
            while True:
                if selector.select(1.0) or not self.host.store.deploy_running():
                    if not selector.select(0):  # the last word may have come just before the lock went
                        raise Gone("the deploy ended without a word to this process")
                    return messages.receive(conn, time.monotonic() + MESSAGE_TIMEOUT)

    def _committed(self, bundle: Bundle) -> bool:
        """Whether the store names ``bundle`` active, once the deploy is over.

        Read after the coordinator let go of the deploy lock (it commits under it) and under the
        store's lock: the answer is the store's last word on this deploy, the one every other
        process of the app gets too. A store that cannot be read now is asked again.
        """
        store = self.host.store
        for attempt in itertools.count(1):
            try:
                if not store.deploy_running():
                    return store.names_active(bundle.digest)
            except (OSError, HabaneroError) as exc:
                logger.warning("habanero: cannot read the store to settle v%d yet (%s)", bundle.version, exc)
            time.sleep(0.2)
            if attempt % 150 == 0:
                logger.warning("habanero: v%d waits for the deploy that drove it to end (%d s)",
                               bundle.version, attempt // 5)
        raise AssertionError("unreachable")  # for the type checker: the loop above never ends


def _refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "pid": os.getpid(), "code": code, "message": message}
