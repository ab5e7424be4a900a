"""This process as the other processes of its store see it: a Unix socket that takes part in deploys.

The process that receives a push (over HTTP, or ``ov.apply``) drives it (``overlay.deploy``) and
talks to every other live process through its socket, one connection per deploy::

    coordinator                              this process
    prepare {action, version, digest} + wire ──►  verify with its own trusted keys, plan, compile
                                         ◄──  ready | refused {code, message}
    apply                                ──►  apply in place, holding the import lock
                                         ◄──  applied | failed {traceback}   (a failure is undone here)
    commit | revert                      ──►  keep it, or undo it; the import lock is released
                                         ◄──  done

A ``status`` connection asks what this process runs. The coordinator commits the store between
``applied`` from everyone and ``commit``; so when it disappears between the two (killed, crashed),
this process decides by the store itself: the version the state file names is kept, any other is
undone. While the coordinator lives, this process waits for its word however long it takes: a
decision made alone could differ from the one the coordinator writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from overlay.bundle import Bundle, open_bundle
from overlay.cluster import messages
from overlay.cluster.messages import Gone
from overlay.cluster.registry import WorkerEntry, process_start
from overlay.errors import HabaneroError, StoreError
from overlay.upgrade import ApplyFailed, Change, Clock, Host

__all__ = ["Member"]

logger = logging.getLogger("overlay.cluster")

#: How long one message may take to arrive once it started arriving.
MESSAGE_TIMEOUT = 30.0


class Member:
    """Serves this process's socket (see the module docstring) on a daemon thread."""

    def __init__(self, host: Host, entry: WorkerEntry, *, status: Callable[[], dict[str, Any]]) -> None:
        self.host, self.entry, self._status = host, entry, status
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
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
        self._thread = threading.Thread(target=self._accept, args=(server,), name="habanero-member", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.entry.socket)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's socket and thread are the parent's; drop them unused."""
        server, self._server, self._thread = self._server, None, None
        if server is not None:
            with contextlib.suppress(OSError):
                os.close(server.detach())
        self.busy = threading.Lock()

    # ------------------------------------------------------------------------------ serving

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed by stop()
            try:
                if messages.peer_uid(conn) not in (os.getuid(), 0):
                    conn.close()  # only this user's processes (and root) may drive our deploys
                    continue
            except OSError:
                conn.close()
                continue
            threading.Thread(target=self._converse, args=(conn,), name="habanero-member-conversation",
                             daemon=True).start()

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
        coordinator = header.get("coordinator")
        if not self.busy.acquire(blocking=False):
            messages.send(conn, _refusal("deploy_in_progress", "this process is busy with another change"))
            return
        try:
            clock = Clock()
            try:
                bundle = self._target(header, payload)
                change = Change(self.host, bundle, str(header["action"]), clock)
                change.prepare()
            except HabaneroError as exc:
                self.host.note(str(header.get("action")), header.get("version"), "refused", exc.code, exc.message)
                messages.send(conn, _refusal(exc.code, exc.message))
                return
            messages.send(conn, {"ok": True, "pid": os.getpid(), "ms": clock.elapsed(),
                                 "running": change.current.version if change.current else None})
            step, _ = self._next(conn, coordinator)
            if step.get("op") != "apply":
                self.host.note(change.action, bundle.version, "aborted")
                return  # aborted: nothing was applied here
            try:
                change.apply()
            except ApplyFailed as failed:
                self.host.note(change.action, bundle.version, "failed", "activation_failed", str(failed))
                messages.send(conn, {"ok": False, "pid": os.getpid(), "code": "activation_failed",
                                     "message": str(failed), "traceback": failed.remote_traceback})
                return
            try:
                messages.send(conn, {"ok": True, "pid": os.getpid(), "ms": clock.elapsed()})
                verdict, _ = self._next(conn, coordinator)
                keep = verdict.get("op") == "commit"
            except Gone:
                keep = self._committed(bundle)  # the coordinator is gone: the store decides
                logger.warning("habanero: the process that drove v%d went away; the store says it %s",
                               bundle.version, "was committed" if keep else "was not committed")
            if keep:
                change.commit()
            else:
                change.revert()
                self.host.note(change.action, bundle.version, "reverted")
            with contextlib.suppress(Gone):
                messages.send(conn, {"ok": True, "pid": os.getpid(), "ms": clock.elapsed(),
                                     "version": bundle.version if keep else None})
        finally:
            self.busy.release()

    def _target(self, header: dict[str, Any], payload: bytes) -> Bundle:
        """The bundle of this deploy, verified here with this process's own trusted keys."""
        host, store = self.host, self.host.store
        version, digest = header.get("version"), header.get("digest")
        if type(version) is not int or not isinstance(digest, str):
            raise StoreError("a deploy message without a version and digest", code="bad_request")
        bundle: Bundle | None = None
        if header.get("action") == "push":
            active = host.active
            try:
                bundle = open_bundle(payload, host.trusted, app_id=host.app_id, limits=host.limits,
                                     content=store.objects.get, base=active,
                                     base_manifest=lambda d: active.manifest_bytes
                                     if active is not None and active.digest == d else None)
            except HabaneroError as exc:
                if exc.code != "parent_missing":
                    raise
                # Packed against a version this process does not run: the whole bundle is staged.
                staged = store.read_bundle(version, digest)
                if staged is None:
                    raise
                bundle = open_bundle(staged, host.trusted, app_id=host.app_id, limits=host.limits,
                                     content=store.objects.get, base=active)
            store.check_fresh(bundle)
        else:
            bundle = store.load(version)
        if (bundle.version, bundle.digest) != (version, digest):
            raise StoreError(f"the deploy names v{version} ({digest[:12]}) but its bundle is v{bundle.version} "
                             f"({bundle.digest[:12]})", code="bad_request")
        return bundle

    def _next(self, conn: socket.socket, coordinator: object) -> messages.Message:
        """The coordinator's next word; waits while it lives. Gone when it closed or died."""
        while True:
            ready, _, _ = select.select([conn], [], [], 1.0)
            if ready:
                return messages.receive(conn, time.monotonic() + MESSAGE_TIMEOUT)
            if type(coordinator) is int and process_start(coordinator) is None:
                raise Gone(f"process {coordinator}, which drove this deploy, has stopped")

    def _committed(self, bundle: Bundle) -> bool:
        """Whether the store names ``bundle`` active (read under its lock: after any commit that
        was under way)."""
        try:
            with self.host.store._lock:
                pointer, _ = self.host.store.pointer()
        except (OSError, HabaneroError):
            return False
        return pointer is not None and pointer["digest"] == bundle.digest


def _refusal(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "pid": os.getpid(), "code": code, "message": message}
