"""The :class:`Overlay` handle that ``install()`` returns: what runs, deploys, and the app's wiring.

One handle per process. Its deploys reach every process of the app (``overlay.deploy``); its
``wsgi()`` and ``asgi()`` put the control routes in front of a web app; its ``status()`` describes
every live process. A disabled overlay (``HABANERO_DISABLE=1``) answers the same questions and
refuses every deploy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay import deploy
from overlay.bundle import Bundle, Limits
from overlay.errors import BadSignature, ConfigError, HabaneroError, UnknownFormat, UntrustedKey, WrongApp
from overlay.finder import OverlayFinder
from overlay.keys import TrustedKeys
from overlay.store import Store
from overlay.upgrade import UpgradeReport

if TYPE_CHECKING:  # the serving layer is loaded by the first overlay that serves routes
    from overlay.http import ControlPlane
    from overlay.runtime.probation import Probation
    from overlay.serving.asgi import ASGIApp, ASGIWrapper
    from overlay.serving.wsgi import WSGIApp, WSGIWrapper
    from overlay.transaction.gate import Gate, Pass

__all__ = ["Overlay"]

logger = logging.getLogger("overlay.runtime")

#: Seconds a request in a freshly forked worker waits for it to catch up with the app.
READY_WAIT = 60.0


class Overlay:
    """What ``install()`` set up (see the module docstring).

    ``version``, ``status()`` and ``history()`` say what is live; ``apply()`` and ``rollback()``
    deploy to every process of the app; ``wsgi(app)`` and ``asgi(app)`` serve the control routes
    on the app's own port.
    """

    def __init__(self, *, app_id: str, packages: tuple[str, ...], store_path: Path, limits: Limits,
                 node: deploy.Node | None, listen: str | None = None, app: Any = None,
                 warnings: Iterable[str] = (), preimported: Iterable[str] = (),
                 control: dict[str, Any] | None = None) -> None:
        self.app_id = app_id
        self.packages = packages
        self.store_path = store_path
        self.limits = limits
        self.node = node
        self.listen = listen
        self.app = app
        self.warnings = list(warnings)
        self.preimported = tuple(preimported)  # modules that were imported from disk before install()
        self.started = time.time()
        self.control = control or {}  # control-plane options (TLS, public status, upload deadline)
        self.server: Any = None  # the standalone control server, when listen= is used
        self.fleet: Any = None  # the fleet's channel, when channel= is used (overlay.serving.channel)
        self._plane: ControlPlane | None = None
        #: The watch over pushed versions (``install(probation=...)``); None: every push is permanent.
        self.probation: Probation | None = None

    # ------------------------------------------------------------------------------- what runs

    @property
    def disabled(self) -> bool:
        return self.node is None

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the standalone server (``listen=``) actually listens; None without one."""
        return self.server.address if self.server is not None else None

    @property
    def store(self) -> Store | None:
        return self.node.host.store if self.node is not None else None

    @property
    def finder(self) -> OverlayFinder | None:
        return self.node.host.finder if self.node is not None else None

    @property
    def trusted(self) -> TrustedKeys | None:
        return self.node.host.trusted if self.node is not None else None

    @property
    def tree_root(self) -> Path | None:
        """Where this process's files are: ``__file__`` of every module served is below it."""
        return self.node.host.tree.root if self.node is not None else None

    @property
    def last_failure(self) -> dict[str, Any] | None:
        return self.node.host.last_failure if self.node is not None else None

    @property
    def active(self) -> Bundle | None:
        """The bundle this process serves now, or None (the code on disk)."""
        return self.node.host.active if self.node is not None else None

    @property
    def version(self) -> int | None:
        active = self.active
        return active.version if active is not None else None

    # --------------------------------------------------------------------------------- deploys

    def apply(self, bundle: bytes) -> UpgradeReport:
        """Verify a signed bundle and make it the running version of every process, as one transaction.

        Either every process re-runs every changed module and patches every live function and class
        in place, or none does and ``ActivationFailed``, ``WorkerRefused`` (or the ``BundleRejected``
        that says why) is raised. This is what ``POST /_habanero/push`` calls.

        Example::

            report = ov.apply(Path("shop-v8.hbn").read_bytes())
            report.changed, report.timings_ms["total"], report.workers
        """
        report = deploy.push(self._node(), bundle)
        if self.probation is not None:
            self.probation.started(report)
        return report

    def verify(self, bundle: bytes) -> None:
        """Check a pushed bundle's signatures and app before anything else is done for it (the
        event-loop servers drain their requests only for a verified push). Raises only the
        refusals of unverified bytes; :meth:`apply` judges everything else, and records it."""
        try:
            self._node().host.open_push(bundle)
        except HabaneroError as exc:
            if exc.unverified or isinstance(exc, (BadSignature, UnknownFormat, UntrustedKey, WrongApp)):
                raise

    def rollback(self, to: int | None = None, *, expect: int | None = None) -> UpgradeReport:
        """Return every process to the previous stored version (or version ``to``), as a push would.

        ``expect`` names the version the caller believes is active; a mismatch refuses the rollback.
        """
        report = deploy.rollback(self._node(), to, expect=expect)
        if self.probation is not None:
            self.probation.ended()  # an operator chose this version: it is permanent
        return report

    # ------------------------------------------------------------------------- one version each

    @property
    def gate(self) -> Gate | None:
        """The request gate (``overlay.transaction.gate``) of this process; None when disabled."""
        return self.node.host.gate if self.node is not None else None

    def running(self) -> Any:
        """Mark a unit of work that is not a request (a job, a message, a game tick) as one version's:
        a push waits for it to finish (within the drain deadline) and holds the next one until it
        has applied. Works with ``with`` in a thread and ``async with`` in a coroutine.

        Example::

            while True:
                job = queue.get()
                with ov.running():          # the whole job runs on one version of the code
                    handle(job)
        """
        gate = self.gate
        return _Running(gate) if gate is not None else contextlib.nullcontext()

    def note_loop(self, loop: Any) -> None:
        """The app's event loop (seen by the ASGI wrapper or the aiohttp mount): pushes run the app's
        module code there, where its own module code runs."""
        if self.node is not None and self.node.host.loop is not loop:
            self.node.host.loop = loop

    @property
    def app_address(self) -> tuple[str, int] | None:
        """Where the app's own server answered habanero's routes (for a ``health`` URL path)."""
        return self._plane.address if self._plane is not None else None

    def _node(self) -> deploy.Node:
        if self.node is None:
            raise ConfigError("habanero is disabled by HABANERO_DISABLE: this process accepts no deploys",
                              code="disabled")
        return self.node

    # ---------------------------------------------------------------------------- web servers

    def wsgi(self, app: WSGIApp) -> WSGIApp | WSGIWrapper:
        """``app`` with the control routes in front of it, on its own port (any WSGI server).

        Example::

            application = ov.wsgi(flask_app)        # gunicorn myapp:application -w 4
        """
        from overlay.http import wsgi

        plane = self.plane()
        return app if plane is None or self.node is None else wsgi(app, plane, self.node.joined, self.ready)

    def asgi(self, app: ASGIApp) -> ASGIApp | ASGIWrapper:
        """``app`` with the control routes in front of it, on its own port (any ASGI server).

        Example::

            app = ov.asgi(FastAPI())                # uvicorn myapp:app --workers 4
        """
        from overlay.http import asgi

        plane = self.plane()
        return app if plane is None or self.node is None else asgi(app, plane, self.node.joined, self.ready)

    def plane(self) -> ControlPlane | None:
        """The control routes of this overlay (None when disabled: a wrapped app serves only itself)."""
        if self.node is None:
            return None
        if self._plane is None:
            from overlay.http import ControlPlane

            self._plane = ControlPlane(self, public_status=bool(self.control.get("public_status")),
                                       upload_timeout=float(self.control.get("upload_timeout", 30.0)),
                                       nonces=self.node.host.store.requests)
        return self._plane

    def ready(self) -> None:
        """Wait until this process takes part in deploys: at once, but for a worker forked after
        ``install()``, which first catches up with the app's active version."""
        if self.node is not None and not self.node.joined.wait(READY_WAIT):
            logger.error("habanero: this process has not caught up with the app within %g s; serving on", READY_WAIT)

    # ---------------------------------------------------------------------------------- status

    def worker_status(self) -> dict[str, Any]:
        """What this process runs, as one line of ``status()["workers"]``."""
        active = self.active
        host = self.node.host if self.node is not None else None
        return {"pid": os.getpid(), "version": active.version if active is not None else None,
                "digest": active.digest if active is not None else None, "started": self.started,
                "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
                "tree": str(self.tree_root) if self.tree_root is not None else None,
                "last_outcome": host.last_outcome if host is not None else None}

    def status(self) -> dict[str, Any]:
        """A JSON-ready picture of what runs: app, packages, active bundle, store, every live worker."""
        active = self.active
        store = self.store
        pointer, highest = store.pointer() if store is not None else (None, None)
        own = self.worker_status()
        return {
            "app_id": self.app_id,
            "packages": list(self.packages),
            "disabled": self.disabled,
            "pid": os.getpid(),
            "version": active.version if active is not None else None,
            "active": active.summary() if active is not None else None,
            "store_active": dict(pointer) if pointer is not None else None,
            "highest": highest,
            "store": str(self.store_path),
            "tree": own["tree"],
            "workers": deploy.workers(self.node, own) if self.node is not None else [own],
            "startup_problems": list(store.startup_problems) if store is not None else [],
            "warnings": list(self.warnings),
            "preimported": list(self.preimported),
            "listen": self.listen,
            "channel": self.fleet.describe() if self.fleet is not None else None,
            "address": own["address"],
            "last_failure": self.last_failure,
            # Requests refused before any trusted signature held: counted only (overlay.serving.guard).
            "refused_unverified": self._plane.refusals.total if self._plane is not None else 0,
            "uptime_s": round(time.time() - self.started, 3),
            "history": self.history(10),
            "gate": self._gate_status(),
            "probation": self._probation_status(),
        }

    def _gate_status(self) -> dict[str, Any] | None:
        gate = self.gate
        if gate is None:
            return None
        return {"enabled": gate.enabled, "running": gate.running, "held": gate.held,
                "drain_timeout_s": gate.deadline, "finished": gate.finished, "failed": gate.failed}

    def _probation_status(self) -> dict[str, Any] | None:
        """Where the active version stands, as the store says (any process of the app answers the
        same): ``{"version", "state": "probation" | "permanent" | "reverted" | "failed", "reason",
        "permanent", "window_s"}``; None before any push on probation."""
        store = self.store
        if store is None:
            return None
        window = self.probation.seconds if self.probation is not None else 0
        on, permanent = store.on_probation()
        pointer, _ = store.pointer()
        if on and pointer is not None:
            return {"version": pointer["version"], "state": "probation", "reason": "",
                    "permanent": permanent["version"] if permanent else None, "window_s": window}
        verdicts = [e for e in store.history(50) if e.get("action") == "probation"]
        if not verdicts:
            return None
        last = verdicts[-1]
        return {"version": last.get("version"), "state": last.get("outcome"), "reason": last.get("reason", ""),
                "permanent": pointer["version"] if pointer else None, "window_s": window}

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The store's deploy history, oldest first, the last ``limit`` entries (empty when disabled)."""
        store = self.store
        return store.history(limit) if store is not None else []

    # -------------------------------------------------------------------------------- lifetime

    def uninstall(self) -> None:
        """Stop serving: remove the finder, leave the app's processes, close the store, so that
        ``install()`` may run again (for tests). Imported modules keep the code they run."""
        forget(self)
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None
        if self.probation is not None:
            self.probation.stop()
        if self.server is not None:
            self.server.stop()
            self.server = None
        node = self.node
        if node is not None:
            if node.host.finder in sys.meta_path:
                sys.meta_path.remove(node.host.finder)
            if node.member is not None:
                node.member.stop()
            if node.entry.pid == os.getpid():  # a child forked before joining holds its parent's entry
                node.registry.remove(node.entry)
            node.host.store.close()

    def __repr__(self) -> str:
        state = "disabled" if self.disabled else f"v{self.version}"
        return f"<Overlay {self.app_id} {state} packages={list(self.packages)}>"


class _Running:
    """``ov.running()``: one pass through the gate, for ``with`` or ``async with``."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._entered: list[Pass | None] = []  # a pass per nested ``with`` of this one object
        self._failed = False

    def __enter__(self) -> None:
        self._entered.append(self._gate.enter())

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if (entry := self._entered.pop()) is not None:
            self._gate.leave(failed=kind is not None, entry=entry)

    async def __aenter__(self) -> None:
        self._entered.append(await self._gate.enter_async())

    async def __aexit__(self, kind: object, exc: object, tb: object) -> None:
        if (entry := self._entered.pop()) is not None:
            self._gate.leave(failed=kind is not None, entry=entry)


class _Installed:
    """The process's one overlay, and the lock ``install()`` holds while setting it up."""

    lock = threading.Lock()
    overlay: Overlay | None = None


def install_lock() -> threading.Lock:
    return _Installed.lock


def current() -> Overlay | None:
    return _Installed.overlay


def make_current(overlay: Overlay | None) -> None:
    _Installed.overlay = overlay


def forget(overlay: Overlay) -> None:
    """Let ``install()`` run again in this process (``Overlay.uninstall()``)."""
    with _Installed.lock:
        if _Installed.overlay is overlay:
            _Installed.overlay = None


def reset_lock_after_fork() -> None:
    _Installed.lock = threading.Lock()  # a parent's thread may have held it at the fork
