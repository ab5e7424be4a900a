"""``overlay.install()``: the one call an app makes, and the :class:`Overlay` handle it returns.

``install()`` resolves its settings (see ``overlay.runtime.settings`` for the argument → environment →
default order), opens the store, and puts an :class:`~overlay.finder.OverlayFinder` first on
``sys.meta_path``. When the store has an active bundle, the finder serves it from the first import,
so hot changes survive a restart. One overlay per process: a second call is refused.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay.runtime import settings
from overlay.importing.codecache import CodeCache
from overlay.bundle import DEFAULT_LIMITS, Bundle, Limits
from overlay.errors import ConfigError
from overlay.finder import BundleLoader, OverlayFinder, check_packages
from overlay.keys import TrustedKeys
from overlay.store import Store

if TYPE_CHECKING:
    from overlay.upgrade import UpgradeReport

logger = logging.getLogger(__name__)

__all__ = ["Overlay", "install"]

_lock = threading.Lock()
_current: Overlay | None = None


class Overlay:
    """What ``install()`` set up: the store, the finder, the trust, and a lock for deploys.

    ``version``, ``status()`` and ``history()`` say what is live. The upgrade transaction works on
    the same attributes: it holds ``deploy_lock``, verifies with ``trusted``/``app_id``/``limits``,
    builds an index with ``finder.index_for(bundle, store.tree_root)``, swaps it in with
    ``finder.set_index`` and commits to ``store``. A disabled overlay has no store and no finder.
    """

    def __init__(self, *, app_id: str, packages: tuple[str, ...], store_path: Path, store: Store | None,
                 finder: OverlayFinder | None, trusted: TrustedKeys | None, limits: Limits,
                 listen: str | None = None, app: Any = None, disabled: bool = False,
                 warnings: Iterable[str] = (), preimported: Iterable[str] = ()) -> None:
        self.app_id = app_id
        self.packages = packages
        self.store_path = store_path
        self.store = store
        self.finder = finder
        self.trusted = trusted
        self.limits = limits
        self.listen = listen
        self.app = app
        self.disabled = disabled
        self.warnings = list(warnings)
        self.preimported = tuple(preimported)  # modules that were imported from disk before install()
        self.deploy_lock = threading.Lock()  # one deploy at a time; a second gets DeployInProgress
        self.last_failure: dict[str, Any] | None = None  # set by the upgrade transaction
        self.retargeted = False  # set by the first push: every live module uses the finder's paths
        self.started = time.time()
        self.control: dict[str, Any] = {}  # control-plane options (TLS, public status, upload deadline)
        self.server: Any = None            # the standalone control server, when listen= is used
        self.address: tuple[str, int] | None = None  # where the standalone server actually listens

    def apply(self, bundle: bytes) -> UpgradeReport:
        """Verify a signed bundle and make it the running version, as one transaction.

        Either every changed module is re-run and every live function and class patched in place,
        or nothing changes and ``ActivationFailed`` (or the ``BundleRejected`` that says why) is
        raised. This is what ``POST /_habanero/push`` calls.

        Example::

            report = ov.apply(Path("shop-v8.hbn").read_bytes())
            report.changed, report.timings_ms["total"]
        """
        from overlay import upgrade

        self._require_enabled()
        return upgrade.apply(self, bundle)

    def rollback(self, to: int | None = None, *, expect: int | None = None) -> UpgradeReport:
        """Return to the previous stored version (or version ``to``), with a push's guarantees.

        ``expect`` names the version the caller believes is active; a mismatch refuses the rollback.
        """
        from overlay import upgrade

        self._require_enabled()
        return upgrade.rollback(self, to, expect=expect)

    def _require_enabled(self) -> None:
        if self.disabled:
            raise ConfigError("habanero is disabled by HABANERO_DISABLE: this process accepts no deploys",
                              code="disabled")

    @property
    def active(self) -> Bundle | None:
        """The bundle the finder serves now, or None (the code on disk)."""
        index = self.finder.index if self.finder is not None else None
        return index.bundle if index is not None else None

    @property
    def version(self) -> int | None:
        active = self.active
        return active.version if active is not None else None

    def status(self) -> dict[str, Any]:
        """A JSON-ready picture of what runs: app, packages, active bundle, store, problems."""
        active = self.active
        return {
            "app_id": self.app_id,
            "packages": list(self.packages),
            "disabled": self.disabled,
            "pid": os.getpid(),
            "version": active.version if active is not None else None,
            "active": active.summary() if active is not None else None,
            "highest": self.store.highest if self.store is not None else None,
            "store": str(self.store_path),
            "startup_problems": list(self.store.startup_problems) if self.store is not None else [],
            "warnings": list(self.warnings),
            "preimported": list(self.preimported),
            "listen": self.listen,
            "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "last_failure": self.last_failure,
            "uptime_s": round(time.time() - self.started, 3),
            "history": self.history(10),
        }

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The store's deploy history, oldest first, the last ``limit`` entries (empty when disabled)."""
        return self.store.history(limit) if self.store is not None else []

    def uninstall(self) -> None:
        """Remove the finder and close the store so ``install()`` may run again (for tests).

        Modules already imported stay in ``sys.modules``, running the code they were loaded with.
        """
        global _current
        with _lock:
            if self.finder is not None and self.finder in sys.meta_path:
                sys.meta_path.remove(self.finder)
            if self.server is not None:
                self.server.stop()
                self.server = None
            if self.store is not None:
                self.store.close()
            if _current is self:
                _current = None

    def __repr__(self) -> str:
        state = "disabled" if self.disabled else f"v{self.version}"
        return f"<Overlay {self.app_id} {state} packages={list(self.packages)}>"


def install(
    packages: str | Iterable[str] | None = None,
    trusted_keys: TrustedKeys | str | os.PathLike[str] | Iterable[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    listen: str | None = None,
    app: Any = None,
    *,
    app_id: str | None = None,
    limits: Limits | None = None,
    keep: int | None = None,
    max_version_jump: int | None = None,
    code_cache: bool | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    public_status: bool | None = None,
    upload_timeout: float = 30.0,
    sync: str | None = None,
) -> Overlay:
    """Serve ``packages`` from the store's active bundle, and return the handle that reports on it.

    Call it at the top of the app's entry point, before the app imports its own packages. Every
    keyword has an environment twin (``HABANERO_PACKAGES``, ``HABANERO_TRUSTED_KEYS``,
    ``HABANERO_STORE``, ``HABANERO_LISTEN``, ``HABANERO_APP_ID``, ``HABANERO_CODE_CACHE``,
    ``HABANERO_SYNC``);
    ``HABANERO_DISABLE=1`` turns the call into a no-op that boots the code on disk.

    Example::

        import overlay
        ov = overlay.install(packages=["myapp"], trusted_keys="deploy/trusted_keys", store=".habanero")
        import myapp  # from the active bundle when there is one, else from disk
    """
    global _current
    with _lock:
        if _current is not None:
            raise ConfigError(
                f"overlay.install() was already called in this process (serving "
                f"{', '.join(_current.packages) or 'nothing'}); call it once, at start-up, and keep the "
                "handle it returns", code="already_installed")
        if settings.disabled():
            _current = _disabled(packages, store, app_id)
            return _current
        names = check_packages(settings.resolve_packages(packages))
        resolved_app_id = settings.resolve_app_id(app_id, names)
        resolved_listen = settings.resolve_listen(listen)
        _check_app(app, resolved_listen)
        trusted = settings.resolve_trusted_keys(trusted_keys)
        store_path = settings.resolve_store(store)
        limits = limits or DEFAULT_LIMITS
        extra = {k: v for k, v in (("keep", keep), ("max_version_jump", max_version_jump)) if v is not None}
        opened = Store.open(store_path, trusted=trusted, app_id=resolved_app_id, limits=limits,
                            sync=settings.resolve_sync(sync), **extra)
        try:
            use_disk = settings.resolve_flag(code_cache, "HABANERO_CODE_CACHE", True)
            finder = OverlayFinder(names, code_cache=CodeCache(opened.cache_dir if use_disk else None))
            if opened.active is not None:
                finder.set_index(finder.index_for(opened.active, opened.tree_root))
        except BaseException:
            opened.close()
            raise
        preimported = _preimported(names)
        _record_preimported(preimported, finder)
        warnings = [_preimported_warning(preimported, finder)] if preimported else []
        for problem in opened.startup_problems:
            logger.warning("store %s: %s", store_path, problem)
        for text in warnings:
            logger.warning("%s", text)
        sys.meta_path.insert(0, finder)
        _current = Overlay(app_id=resolved_app_id, packages=names, store_path=store_path, store=opened,
                           finder=finder, trusted=trusted, limits=limits, listen=resolved_listen, app=app,
                           warnings=warnings, preimported=preimported)
        _current.control = {
            "tls_cert": tls_cert or settings.env("HABANERO_TLS_CERT"),
            "tls_key": tls_key or settings.env("HABANERO_TLS_KEY"),
            "public_status": settings.resolve_flag(public_status, "HABANERO_PUBLIC_STATUS", False),
            "upload_timeout": upload_timeout,
        }
    version = _current.version
    logger.info("habanero serving %s from %s", ", ".join(names),
                f"bundle v{version}" if version is not None else "disk (no bundle pushed yet)")
    _start_control_plane(_current)
    return _current


def _disabled(packages: str | Iterable[str] | None, store: str | os.PathLike[str] | None,
              app_id: str | None) -> Overlay:
    """The escape hatch: no finder, no store opened; the code on disk runs."""
    try:
        names = tuple(settings.resolve_packages(packages))
    except ConfigError:
        names = ()
    logger.warning("HABANERO_DISABLE is set: habanero is off, the app runs the code on disk and accepts "
                   "no deploys; unset HABANERO_DISABLE to serve the active bundle again")
    return Overlay(app_id=app_id or settings.env("HABANERO_APP_ID") or (names[0] if names else ""),
                   packages=names, store_path=settings.resolve_store(store), store=None, finder=None,
                   trusted=None, limits=DEFAULT_LIMITS, disabled=True, warnings=["habanero is disabled "
                   "by HABANERO_DISABLE"])


def _check_app(app: Any, listen: str | None) -> None:
    if app is None:
        return
    if listen is not None:
        raise ConfigError("pass either listen= (habanero's own server) or app= (mount into your aiohttp "
                          "app), not both", code="bad_config")
    from aiohttp import web  # only apps that pass app= pay for importing aiohttp here

    if not isinstance(app, web.Application):
        raise ConfigError(f"app= must be an aiohttp.web.Application, got {type(app).__name__}",
                          code="bad_config")


def _preimported(packages: tuple[str, ...]) -> list[str]:
    """Modules of the declared packages that are already in ``sys.modules``, not from a bundle."""
    found = []
    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] in packages and module is not None:
            if not isinstance(getattr(getattr(module, "__spec__", None), "loader", None), BundleLoader):
                found.append(name)
    return sorted(found)


def _record_preimported(names: list[str], finder: OverlayFinder) -> None:
    """Best effort: the source of modules imported before install(), read now (they ran it moments ago)."""
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path and path.endswith(".py"):
            try:
                with open(path, "rb") as fh:
                    finder.disk_sources[name] = fh.read()
            except OSError:
                pass


def _preimported_warning(names: list[str], finder: OverlayFinder) -> str:
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    index = finder.index
    if index is None:
        now = "no bundle is active yet, so everything still runs from disk; the first push updates them"
    else:
        now = (f"they keep running the code on disk, while modules imported from now on come from "
               f"bundle v{index.version}: the process mixes two versions until the next push or restart")
    return (f"overlay.install() was called after {shown} had been imported from disk; {now}. Call "
            "install() before the app imports its own packages.")


def _start_control_plane(overlay: Overlay) -> None:
    """Mount the endpoint into ``app``, or serve it on its own thread at ``listen``."""
    if overlay.disabled or (overlay.listen is None and overlay.app is None):
        return
    from overlay import http
    from overlay import upgrade  # noqa: F401  (imported now, so the first push does not pay for it)

    options = overlay.control
    tls = http.ssl_context(options.get("tls_cert"), options.get("tls_key"))
    served = {"public_status": options.get("public_status", False),
                "upload_timeout": options.get("upload_timeout", 30.0)}
    if overlay.app is not None:
        if tls is not None:
            logger.warning("tls_cert/tls_key are ignored with app=: the app's own server terminates TLS")
        http.mount(overlay.app, overlay, **served)
        logger.info("habanero endpoint mounted at %s in the app", http.PREFIX)
        return
    host, port = settings.parse_address(overlay.listen)
    overlay.server = http.StandaloneServer(overlay, host, port, tls=tls, **served)
    overlay.address = overlay.server.start()
    logger.info("habanero endpoint listening on %s://%s:%d%s", "https" if tls else "http",
                overlay.address[0], overlay.address[1], http.PREFIX)
