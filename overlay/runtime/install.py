"""``overlay.install()``: the one call an app makes, returning the :class:`Overlay` handle.

``install()`` resolves its settings (see ``overlay.runtime.settings`` for the argument → environment
→ default order), opens the store, joins the app's other processes (``overlay.deploy``), lays out
this process's source tree and puts an :class:`~overlay.finder.OverlayFinder` first on
``sys.meta_path``. When the store has an active bundle, the finder serves it from the first import,
so hot changes survive a restart. One overlay per process: a second call is refused.

A process forked after ``install()`` (gunicorn ``--preload``, a ``multiprocessing`` fork pool) is a
process of the app of its own: right after the fork it gets its own source tree, joins the others
and catches up with the active version on a thread; ``Overlay.ready()`` (which the WSGI and ASGI
wrappers call before a request) waits for that.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from overlay import deploy
from overlay.bundle import DEFAULT_LIMITS, Bundle, Limits
from overlay.channel import ChannelURL
from overlay.cluster.registry import Registry
from overlay.control import PREFIX
from overlay.errors import ConfigError, HabaneroError
from overlay.finder import BundleLoader, OverlayFinder, check_packages
from overlay.importing.codecache import CodeCache
from overlay.integrations import hooks
from overlay.keys import TrustedKeys
from overlay.runtime import handle, settings
from overlay.runtime.handle import Overlay
from overlay.runtime.probation import Health, Probation, resolve_health
from overlay.serving.connections import ControlLimits
from overlay.storage.tree import SourceTree
from overlay.storage.worker import Worker
from overlay.store import Store
from overlay.transaction.gate import DRAIN_TIMEOUT, Gate
from overlay.upgrade import Host, move_tree

logger = logging.getLogger("overlay.runtime")

__all__ = ["Overlay", "install"]



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
    control_limits: ControlLimits | None = None,
    channel: str | None = None,
    gate: bool | None = None,
    drain_timeout: float | None = None,
    health: Health | None = None,
    probation: float | None = None,
) -> Overlay:
    """Serve ``packages`` from the store's active bundle, and return the handle that reports on it.

    Call it at the top of the app's entry point, before the app imports its own packages. Every
    keyword has an environment twin (``HABANERO_PACKAGES``, ``HABANERO_TRUSTED_KEYS``,
    ``HABANERO_STORE``, ``HABANERO_LISTEN``, ``HABANERO_APP_ID``, ``HABANERO_CODE_CACHE``,
    ``HABANERO_SYNC``, and ``HABANERO_MAX_CONNECTIONS``, ``HABANERO_REQUEST_TIMEOUT``,
    ``HABANERO_IDLE_TIMEOUT`` for ``control_limits``, the standalone server's bounds on its
    connections: see ``overlay.serving.connections``; ``HABANERO_CHANNEL`` for ``channel``, a Redis URL through
    which the process joins its fleet: see ``overlay.serving.channel``); ``HABANERO_DISABLE=1`` turns the call into a
    no-op that boots the code on disk.

    ``gate`` (``HABANERO_GATE``, on) puts every request through the request gate, so that a push
    waits for the requests in flight, within ``drain_timeout`` seconds (``HABANERO_DRAIN_TIMEOUT``,
    5), and no request sees two versions (``overlay.transaction.gate``). ``probation`` seconds
    (``HABANERO_PROBATION``, 0: off) keep each push on trial, judged by ``health`` (a callable or a
    URL path of the app's) and its requests' failure rate, and revert it by itself when it fails
    (``overlay.runtime.probation``). For a WSGI or ASGI app, wrap it with the handle's ``wsgi()``
    or ``asgi()``: the control routes are then on the app's own port, in every worker.

    Example::

        import overlay
        ov = overlay.install(packages=["myapp"], trusted_keys="deploy/trusted_keys")
        from myapp.web import app  # from the active bundle when there is one, else from disk
        application = ov.wsgi(app)
    """
    with handle.install_lock():
        existing = handle.current()
        if existing is not None:
            raise ConfigError(
                f"overlay.install() was already called in this process (serving "
                f"{', '.join(existing.packages) or 'nothing'}); call it once, at start-up, and keep the "
                "handle it returns", code="already_installed")
        if settings.disabled():
            disabled = _disabled(packages, store, app_id)
            handle.make_current(disabled)
            return disabled
        names = check_packages(settings.resolve_packages(packages))
        resolved_app_id = settings.resolve_app_id(app_id, names)
        resolved_listen = settings.resolve_listen(listen)
        resolved_channel = settings.resolve_channel(channel)
        _check_app(app, resolved_listen)
        trusted = settings.resolve_trusted_keys(trusted_keys)
        request_gate, watch = _rollout(gate, drain_timeout, health, probation, fleet=resolved_channel is not None)
        store_path = settings.resolve_store(store)
        limits = limits or DEFAULT_LIMITS
        extra = {k: v for k, v in (("keep", keep), ("max_version_jump", max_version_jump)) if v is not None}
        opened = Store.open(store_path, trusted=trusted, app_id=resolved_app_id, limits=limits,
                            sync=settings.resolve_sync(sync), **extra)
        try:
            finder = OverlayFinder(names, code_cache=CodeCache(
                opened.cache_dir if settings.resolve_flag(code_cache, "HABANERO_CODE_CACHE", True) else None))
            registry = Registry(store_path)
            with deploy.joining(opened, registry, {"listen": resolved_listen}) as entry:
                # Under the deploy lock: the version read now is the one every other process runs.
                active = _starting_version(opened, registry, entry.id, probation=watch is not None)
                # Found before the app imports them: where its paths derived from __file__ lead.
                tree = opened.source_tree(entry.tree, mirror=opened.mirror(names))
                if active is not None and _laid_out(tree, active, opened):
                    finder.set_index(finder.index_for(active, tree.root))
                    opened.release(active)
                host = Host(resolved_app_id, opened, finder, tree, trusted, limits,
                            gate=request_gate)
                node = deploy.Node(host, registry, entry, info={"listen": resolved_listen})
                preimported = _preimported(names)
                _record_preimported(preimported, finder)
                warnings = [_preimported_warning(preimported, finder)] if preimported else []
                overlay = Overlay(app_id=resolved_app_id, packages=names, store_path=store_path, limits=limits,
                                  node=node, listen=resolved_listen, app=app, warnings=warnings,
                                  preimported=preimported, control={
                                      "tls_cert": _text(tls_cert) or settings.env("HABANERO_TLS_CERT"),
                                      "tls_key": _text(tls_key) or settings.env("HABANERO_TLS_KEY"),
                                      "public_status": settings.resolve_flag(public_status,
                                                                             "HABANERO_PUBLIC_STATUS", False),
                                      "upload_timeout": upload_timeout,
                                      "limits": settings.resolve_control_limits(control_limits)})
                overlay.probation = watch(overlay) if watch is not None else None
                deploy.start(node, overlay.worker_status)
                node.joined.set()
        except BaseException:
            opened.close()
            raise
        _log_startup(store_path, [*opened.startup_problems], warnings)
        _arm_integrations(finder)
        sys.meta_path.insert(0, finder)
        handle.make_current(overlay)
    try:
        _start_control_plane(overlay, resolved_channel)
    except BaseException:
        overlay.uninstall()
        raise
    logger.info("habanero serving %s from %s", ", ".join(names),
                f"bundle v{overlay.version}" if overlay.version is not None else "disk (no bundle pushed yet)")
    return overlay


def _rollout(gate: bool | None, drain_timeout: float | None, health: Health | None,
             probation: float | None, *, fleet: bool) -> tuple[Gate, Callable[[Overlay], Probation] | None]:
    """The request gate, and what makes the watch over pushes when ``probation`` is on."""
    enabled = settings.resolve_flag(gate, "HABANERO_GATE", True)
    drain = settings.resolve_seconds(drain_timeout, "HABANERO_DRAIN_TIMEOUT", DRAIN_TIMEOUT, "drain_timeout")
    window = settings.resolve_seconds(probation, "HABANERO_PROBATION", 0.0, "probation", zero=True)
    if window > 0 and fleet:
        raise ConfigError("probation= cannot be combined with channel= yet: a fleet's versions are decided by "
                          "the whole fleet, and one process's probation would revert or keep them for its store "
                          "alone; leave probation off for a fleet (HABANERO_PROBATION=0), or push to this app over "
                          "HTTP", code="bad_config")
    checked = resolve_health(health if health is not None else settings.env("HABANERO_HEALTH"))
    watch = (lambda overlay: Probation(overlay, checked, window)) if window > 0 else None
    return Gate(deadline=drain, enabled=enabled), watch


def _starting_version(store: Store, registry: Registry, entry: str, *, probation: bool) -> Bundle | None:
    """The version this process starts on (hold the deploy lock): the store's active one, but when
    the app itself starts (no other process of it runs) during a probation, the last permanent one
    (see ``overlay.runtime.probation``)."""
    store.probation = probation
    if not registry.live(skip=entry):
        store.boot_permanent()
    return store.sync_active()


def _laid_out(tree: SourceTree, active: Bundle, store: Store) -> bool:
    """Lay out this process's tree for the version it starts on; False (the code on disk runs, and
    the problem is reported) when the tree cannot hold it: the app always starts."""
    try:
        tree.lay_out(active)
    except HabaneroError as exc:
        problem = (f"v{active.version} cannot be laid out in this process's source tree ({exc}); serving the code "
                   "on disk")
        logger.error("habanero: %s", problem)
        store.startup_problems.append(problem)
        return False
    return True


def _log_startup(store_path: object, problems: list[str], warnings: list[str]) -> None:
    for problem in problems:
        logger.warning("store %s: %s", store_path, problem)
    for text in warnings:
        logger.warning("%s", text)


def _arm_integrations(finder: OverlayFinder) -> None:
    """Framework integrations load with their framework: now for one imported already, else before
    the next module of the app runs (the one that registers routes with it)."""
    hooks.arm()
    finder.before_exec = hooks.arm


def _text(path: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(path) if path is not None else None


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
                   packages=names, store_path=settings.resolve_store(store), limits=DEFAULT_LIMITS, node=None,
                   warnings=["habanero is disabled by HABANERO_DISABLE"])


def _check_app(app: Any, listen: str | None) -> None:
    if app is None:
        return
    if listen is not None:
        raise ConfigError("pass either listen= (habanero's own server) or app= (mount into your aiohttp "
                          "app), not both", code="bad_config")
    from aiohttp import web  # only apps that pass app= pay for importing aiohttp here

    if not isinstance(app, web.Application):
        raise ConfigError(f"app= mounts the routes into an aiohttp.web.Application, got {type(app).__name__}; "
                          f"{_wrap_instead(app)}", code="bad_config")


def _wrap_instead(app: Any) -> str:
    """What to write instead of ``app=`` for an app that is not aiohttp's: the routes go on its own port."""
    call = getattr(type(app), "__call__", None)  # noqa: B004  (the class's: is calling an instance async?)
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call):
        return ("for an ASGI app (FastAPI, Starlette...) leave app= out and wrap it: app = ov.asgi(app), which "
                "serves habanero's routes on the app's own port (no second port)")
    return ("for a WSGI app leave app= out and wrap it: application = ov.wsgi(application) (Flask: "
            "app.wsgi_app = ov.wsgi(app.wsgi_app)), which serves habanero's routes on the app's own port")


def _preimported(packages: tuple[str, ...]) -> list[str]:
    """Modules of the declared packages that are already in ``sys.modules``, not from a bundle."""
    return sorted(name for name, module in list(sys.modules.items())
                  if name.partition(".")[0] in packages and module is not None
                  and not isinstance(getattr(getattr(module, "__spec__", None), "loader", None), BundleLoader))


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


def _start_control_plane(overlay: Overlay, channel: ChannelURL | None) -> None:
    """Mount the routes into ``app=``, or serve them on habanero's own server at ``listen=``; and
    subscribe to the fleet's ``channel``."""
    if channel is not None:
        _join_fleet(overlay, channel)
    plane = overlay.plane()
    if plane is None or (overlay.listen is None and overlay.app is None):
        return
    options = overlay.control
    if overlay.app is not None:
        if options.get("tls_cert") or options.get("tls_key"):
            logger.warning("tls_cert/tls_key are ignored with app=: the app's own server terminates TLS")
        from overlay.http import mount

        mount(overlay.app, plane)
        logger.info("habanero endpoint mounted at %s in the app", PREFIX)
        return
    assert overlay.listen is not None and overlay.node is not None
    node = overlay.node
    host, port = settings.parse_address(overlay.listen)

    def ours() -> bool:
        """Whether another live process of this store listens at this address already."""
        return any((listen := entry.info().get("listen")) and settings.parse_address(listen) == (host, port)
                   for entry in node.others())

    from overlay.http import standalone

    server = overlay.server = standalone(plane, host, port, ours=ours, tls_cert=options.get("tls_cert"),
                                         tls_key=options.get("tls_key"), limits=options["limits"])
    logger.info("habanero endpoint listening on %s://%s:%d%s", "https" if options.get("tls_cert") else "http",
                server.address[0], server.address[1], PREFIX)


def _join_fleet(overlay: Overlay, url: ChannelURL) -> None:
    """Subscribe to the app's deploy channel (``overlay.serving.channel``), catching up first."""
    from overlay.serving.channel import Fleet

    assert overlay.node is not None
    fleet = overlay.fleet = Fleet(overlay.node, url, app_id=overlay.app_id, status=overlay.status,
                                  history=overlay.history)
    fleet.start()
    logger.info("habanero subscribed to %s", url)


# ------------------------------------------------------------------------------------- fork


def _after_fork_in_child() -> None:
    """A child forked from a process with the overlay installed: make it a process of the app."""
    handle.reset_lock_after_fork()
    overlay = handle.current()
    if overlay is None or overlay.node is None:
        return
    node = overlay.node
    node.joined.clear()
    node.registry.forget_after_fork()
    if node.member is not None:
        node.member.forget_after_fork()
        node.member = None
    store = node.host.store
    store.worker = Worker(str(store.path))  # the parent's worker thread did not come along
    overlay.server = None  # the parent serves listen=: its port is its own
    if overlay.fleet is not None:
        overlay.fleet.forget_after_fork()  # joins again, as itself, once this process has joined the app
    threading.Thread(target=_rejoin, args=(overlay, node), name="habanero-join", daemon=True).start()


def _rejoin(overlay: Overlay, node: deploy.Node) -> None:
    store = node.host.store
    try:
        with deploy.joining(store, node.registry, node.info) as entry:
            node.entry = entry
            move_tree(node.host, store.source_tree(entry.tree, mirror=node.host.tree.mirror))
            deploy.start(node, overlay.worker_status)
            try:
                deploy.catch_up(node)
            except HabaneroError as exc:
                # It keeps its place (its slot, its tree): the next deploy takes it to that version
                # from the one it runs, and ``status`` shows it behind until then.
                logger.error("habanero: forked process %d could not catch up with the app (%s); it serves v%s "
                             "until the next push or rollback", os.getpid(), exc, overlay.version)
                return
        logger.info("habanero: forked process %d joined the app at v%s", os.getpid(), overlay.version)
    except (HabaneroError, OSError) as exc:
        if node.member is not None:  # its slot is given back: it must not answer for it
            node.member.stop(unlink=False)
            node.member = None
        logger.error("habanero: forked process %d could not join the app (%s); it serves v%s and takes no "
                     "part in deploys", os.getpid(), exc, overlay.version)
    finally:
        node.joined.set()
        if overlay.fleet is not None:
            overlay.fleet.start(wait=0)


os.register_at_fork(after_in_child=_after_fork_in_child)
