"""Deploying to a running app: ``--push``, ``status``, ``history`` and ``rollback``.

A push asks the app for its highest accepted version and active bundle, builds version
``highest + 1`` on top of the active one, signs and sends it, then reads the status back and fails
loudly unless the active bundle is the one it pushed: a "200 OK" that hides a failed deploy (TUF's
indefinite freeze) does not pass unnoticed. Watch mode asks neither before nor after: the app's
answer to each push, sent after its commit, says which bundle its imports serve and where the next
push starts (see :func:`push_once`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cli import APP_ID, CA_FILE, JSON, KEY, PROJECT, arg, command

if TYPE_CHECKING:  # the client pulls in cryptography: imported when a command runs, not at start-up
    from overlay.bundle import ParentManifest
    from overlay.errors import HabaneroError

    from .build import BuiltBundle
    from .client import Remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tip:
    """Where the app stands: the highest version it accepted and the digest of the bundle it runs.

    The next push is version ``highest + 1`` on top of ``active``. Read from the app's status, or
    from the answer to this side's last push (which the app sends after its commit).
    """

    highest: int
    active: str | None

    @classmethod
    def of(cls, status: dict[str, Any]) -> Tip:
        return cls(int(status.get("highest") or 0), (status.get("active") or {}).get("digest"))


@dataclass
class PushResult:
    version: int
    digest: str
    url: str
    response: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    delta: bool = False

    @property
    def report(self) -> dict[str, Any]:
        return self.response["report"]

    @property
    def tip(self) -> Tip:
        """Where the app stands after this push: what the next one builds on."""
        return Tip(self.version, self.digest)


#: Built bundle and wire bytes for ``(version, parent, base)``; the wire form is packed against base.
Make = Callable[[int, "str | None", "ParentManifest | None"], "tuple[BuiltBundle, bytes]"]
#: Refusals that say the tip a push was built on is out of date: another push, a rollback, a reset store.
_OUTDATED = frozenset({"stale_version", "parent_missing"})


def _target(args: argparse.Namespace) -> tuple[Any, str]:
    """The project config and the URL to talk to, or a ConfigError that says what is missing."""
    from overlay.errors import ConfigError

    from .cli import _load_config

    url_flag = getattr(args, "url", None) or (getattr(args, "push", None) or None)
    args.push = url_flag
    config = _load_config(args)
    url = url_flag or config.url
    if not url:
        raise ConfigError("no URL: pass it (habanero-pack --push http://127.0.0.1:8765), set HABANERO_URL, "
                          "or `url` in [tool.habanero]")
    return config, url


def _remote(config: Any, url: str, args: argparse.Namespace, *, signed: bool = True) -> Remote:
    from overlay.keys import load_signing_key

    from .client import Remote

    key = load_signing_key(config.require_key()) if signed else None
    ca_file = str(config.ca_file) if config.ca_file is not None else None
    return Remote(url, app_id=config.app_id, key=key, ca_file=ca_file)


class BaseCache:
    """Manifests of bundles this project pushed, so the next push can be a delta against them.

    Kept in memory (the newest, parsed at its first ``get``: the watch asks right after a push, while
    it waits for the next save) and in ``<project>/.habanero/pushed/``, keyed by digest: written at
    each ``put``, or with ``write_through=False`` (watch mode, where a push must not wait for the
    disk) only the newest, at :meth:`save`. Only manifests this side built are cached, so their
    content is trusted here.
    """

    KEEP = 8

    def __init__(self, root: Any | None, *, write_through: bool = True) -> None:
        from pathlib import Path

        self._memory: dict[str, ParentManifest | bytes] = {}
        self._dir = Path(root) / ".habanero" / "pushed" if root is not None else None
        self._write_through = write_through

    def get(self, digest: str | None) -> ParentManifest | None:
        from overlay.bundle import ParentManifest

        if not digest:
            return None
        manifest = self._memory.get(digest)
        if isinstance(manifest, ParentManifest):
            return manifest
        if manifest is None and self._dir is not None:
            try:
                manifest = (self._dir / f"{digest}.json").read_bytes()
            except OSError:
                return None
        if manifest is None:
            return None
        try:
            base = ParentManifest.from_manifest(manifest)
        except (ValueError, KeyError, TypeError):
            return None
        if base.digest != digest:
            return None
        self._memory = {digest: base}
        return base

    def put(self, digest: str, manifest_bytes: bytes) -> None:
        """Remember a pushed manifest (parsed at the first ``get``)."""
        self._memory = {digest: manifest_bytes}  # the newest is the one the server runs
        if self._write_through:
            self._write(digest, manifest_bytes)

    def save(self) -> None:
        """Write the newest manifest to disk, for the next session or one-off push."""
        for digest, manifest in self._memory.items():
            self._write(digest, manifest.manifest_bytes if not isinstance(manifest, bytes) else manifest)

    def _write(self, digest: str, manifest_bytes: bytes) -> None:
        if self._dir is None:
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = self._dir / f".{digest}.tmp"
            tmp.write_bytes(manifest_bytes)
            tmp.replace(self._dir / f"{digest}.json")
            for old in sorted(self._dir.glob("*.json"), key=lambda p: p.stat().st_mtime)[: -self.KEEP]:
                old.unlink(missing_ok=True)
        except OSError:
            pass  # a cache: the next push is a full one


def push_once(remote: Remote, config: Any, *, snapshot: Any = None, level: int = 3,
              bases: BaseCache | None = None, builder: Any = None, tip: Tip | None = None,
              make: Make | None = None, read_back: bool = True) -> PushResult:
    """Build the next version on top of what the app runs, push it, and confirm it is live.

    Without ``tip`` the app is asked for its status first. With the ``tip`` of this side's last
    push (watch mode) nothing is asked: should the app refuse because it moved on meanwhile
    (``parent_missing``: another bundle is active, pushed or rolled back to by someone else, or the
    app lost its store; ``stale_version``: the version was taken), its status is read once and the
    push built again on it.

    When ``bases`` holds the manifest of the app's active bundle, the push is a packed delta (only
    changed entries, manifest compressed against the active one); a server that lacks that parent
    answers ``parent_missing`` and the push is repeated in full. Then the app's active bundle must be
    the one pushed, or this fails loudly (``not_confirmed``): the status is read back for that
    (``read_back``, as a one-off push does), or the push answer's word is taken (watch mode: the
    app sends it after its commit, naming the bundle its imports serve, so a save costs one request).
    ``make`` builds (the watch passes its warm builder); by default ``build`` does, from ``snapshot``.
    """
    from .client import RemoteError

    make = make or _make_afresh(config, remote.key, snapshot=snapshot, level=level, builder=builder)
    clock = _Clock()
    guessed = tip is not None
    if tip is None:
        with clock("status"):
            tip = Tip.of(remote.status())
    try:
        built, wire, response = _send(remote, make, tip, bases, clock, full_retry=not guessed)
    except RemoteError as exc:
        if not guessed or exc.code not in _OUTDATED:
            raise
        log.info("the app moved on since the last push (%s); reading its status and pushing again", exc.code)
        with clock("status"):
            tip = Tip.of(remote.status())
        built, wire, response = _send(remote, make, tip, bases, clock, full_retry=True)
    with clock("confirm"):
        active = response["active"] if not read_back and "active" in response else _active_of(remote)
    live = (active or {}).get("digest")
    if live != built.digest:
        raise RemoteError(
            f"the server answered OK to version {built.version} but its active bundle is "
            f"{(active or {}).get('version', 'none')} ({(live or 'none')[:12]}); the push did "
            "not take effect — check the app's log", code="not_confirmed")
    if bases is not None:
        bases.put(built.digest, built.manifest_bytes)
    server_ms = float(response.get("server_ms", 0.0))
    timings = {"status": clock.ms["status"], "build": clock.ms["build"],
               "transfer": max(0.0, clock.ms["push"] - server_ms), "server": server_ms,
               "confirm": clock.ms["confirm"], "total": clock.total()}
    return PushResult(built.version, built.digest, str(remote.endpoint), response,
                      {k: round(v, 2) for k, v in timings.items()}, len(wire), delta=wire is not built.data)


def _send(remote: Remote, make: Make, tip: Tip, bases: BaseCache | None, clock: _Clock, *,
          full_retry: bool) -> tuple[BuiltBundle, bytes, dict[str, Any]]:
    """Build version ``tip.highest + 1`` on the active bundle and push it; in full if need be."""
    from .client import RemoteError

    version, parent = tip.highest + 1, tip.active
    base = bases.get(parent) if bases is not None else None
    with clock("build"):
        built, wire = make(version, parent, base)
    try:
        with clock("push"):
            return built, wire, remote.push(wire)
    except RemoteError as exc:
        if exc.code != "parent_missing" or base is None or not full_retry:
            raise
    with clock("build"):
        built, wire = make(version, parent, None)
    with clock("push"):
        return built, wire, remote.push(wire)


def _make_afresh(config: Any, signer: Any, *, snapshot: Any, level: int, builder: Any) -> Make:
    """``build`` and ``pack``, from scratch each time: a one-off push builds once per process."""
    from overlay.bundle import pack

    from .build import build

    def make(version: int, parent: str | None, base: ParentManifest | None) -> tuple[BuiltBundle, bytes]:
        nonlocal builder
        built = build(config, version=version, signer=signer, parent=parent, snapshot=snapshot, level=level,
                      base=base, builder=builder)
        builder = built.manifest["builder"]  # a rebuild (in full) takes git's answer again for free
        return built, (pack(built.data, base, [signer]) if base is not None else built.data)

    return make


def _active_of(remote: Remote) -> dict[str, Any] | None:
    """The app's active bundle from its status: for an app whose push answer does not name it."""
    return remote.status().get("active")


class _Clock:
    """Milliseconds spent per phase of a push, and in all."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ms = dict.fromkeys(("status", "build", "push", "confirm"), 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[phase] += (time.perf_counter() - start) * 1000

    def total(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def describe_push(result: PushResult) -> str:
    """One readable summary of a push: version, what changed, what was patched, and timings."""
    r = result.report
    t = result.timings_ms
    kind = "delta" if result.delta else "full"
    lines = [f"pushed version {r['version']} to {result.url} ({result.digest[:12]}, {result.bytes_sent} bytes "
             f"{kind}) in "
             f"{t['total']:.0f} ms: build {t['build']:.0f}, transfer {t['transfer']:.0f}, server "
             f"{t['server']:.1f} (verify {r['timings_ms'].get('verify', 0):.1f}, apply "
             f"{r['timings_ms'].get('apply', 0):.1f})"]
    for label in ("changed", "added", "removed", "data_changed"):
        if r.get(label):
            lines.append(f"  {label.replace('_', ' ')}: {', '.join(r[label])}")
    for module in r.get("modules", []):
        if module.get("patched"):
            lines.append(f"  patched in {module['module']}: {', '.join(module['patched'])}")
        for name, reason in module.get("replaced", []):
            lines.append(f"  replaced {module['module']}.{name}: {reason}")
        for name in module.get("removed", []):
            lines.append(f"  removed {module['module']}.{name}")
        for note in module.get("notes", []):
            lines.append(f"  note ({module['module']}): {note}")
    if not any(r.get(k) for k in ("changed", "added", "removed", "data_changed")):
        lines.append("  nothing changed in the code; the version number moved on")
    return "\n".join(lines)


def push_json(result: PushResult) -> dict[str, Any]:
    """The push's result for scripts and benchmarks: client timings plus the server's report."""
    return {"ok": True, "version": result.version, "digest": result.digest, "url": result.url,
            "bytes": result.bytes_sent, "delta": result.delta, "timings_ms": result.timings_ms,
            "report": result.report}


def failure_json(exc: HabaneroError, project_root: str, store: str | None = None) -> dict[str, Any]:
    from .client import map_traceback

    return {"ok": False, "code": exc.code, "message": map_traceback(exc.message, project_root, store),
            "remote_traceback": map_traceback(getattr(exc, "remote_traceback", ""), project_root, store)}


def describe_failure(exc: HabaneroError, project_root: str, store: str | None = None) -> str:
    """The server's reason, and its traceback mapped onto the developer's files.

    ``store`` is the app's store directory (its status says it): paths in its tree are mapped.
    """
    from .client import map_traceback

    text = f"{exc.code}: {map_traceback(exc.message, project_root, store)}"
    remote_tb = getattr(exc, "remote_traceback", "")
    if remote_tb:
        text += "\n--- traceback in the app (paths mapped to this project) ---\n"
        text += map_traceback(remote_tb, project_root, store).rstrip()
    return text


def run_push(args: argparse.Namespace) -> int:
    """``habanero-pack --push [URL]``."""
    import sys

    from .cli import PROG
    from .client import RemoteError

    config, url = _target(args)
    with _remote(config, url, args) as remote:
        try:
            result = push_once(remote, config, bases=BaseCache(config.root))
        except RemoteError as exc:
            if not exc.status or exc.code == "not_habanero":  # one line from main()
                raise
            if args.json:
                print(json.dumps(failure_json(exc, str(config.root), remote.store), indent=2))
            print(f"{PROG}: push refused: {describe_failure(exc, str(config.root), remote.store)}",
                  file=sys.stderr)
            print(f"{PROG}: the app still serves its previous version", file=sys.stderr)
            return 1
    print(json.dumps(push_json(result), indent=2) if args.json else describe_push(result))
    return 0


URL = arg("url", nargs="?", metavar="URL", help="the app's URL (default: HABANERO_URL, [tool.habanero] url)")


@command("status", URL, CA_FILE, JSON, KEY, PROJECT, APP_ID, help="show the version a running app serves")
def _status(args: argparse.Namespace) -> int:
    config, url = _target(args)
    with _remote(config, url, args) as remote:
        status = remote.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    active = status.get("active") or {}
    print(f"app        {status.get('app_id')} at {url} (pid {status.get('pid')}, up "
          f"{status.get('uptime_s', 0):.0f} s)")
    if active:
        builder = active.get("builder") or {}
        print(f"active     version {active['version']} ({active['digest'][:12]}), {active['entries']} entries, "
              f"built {active['created']} by {builder.get('user', '?')}@{builder.get('host', '?')}")
    else:
        print("active     none: the app runs the code on disk")
    print(f"highest    {status.get('highest')}")
    failure = status.get("last_failure")
    if failure:
        print(f"last fail  {failure.get('action')} v{failure.get('version')}: {failure.get('code')}: "
              f"{failure.get('message')}")
    for problem in status.get("startup_problems") or []:
        print(f"problem    {problem}")
    return 0


@command("history", URL, CA_FILE, JSON, KEY, PROJECT, APP_ID,
         arg("--limit", type=int, default=20, help="how many entries (default 20)"),
         help="show a running app's deploy history")
def _history(args: argparse.Namespace) -> int:
    from .client import map_traceback

    config, url = _target(args)
    with _remote(config, url, args) as remote:
        entries = remote.history(args.limit)
        if not args.json and any(e.get("outcome") != "ok" for e in entries):
            remote.status()  # where the app's store is: reasons name files in its tree
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        reason = (f"  {e.get('code')}: {map_traceback(str(e.get('reason')), str(config.root), remote.store)}"
                  if e.get("outcome") != "ok" else "")
        print(f"{e.get('time', '?'):<27} {e.get('action', '?'):<9} v{e.get('version')!s:<5} "
              f"{e.get('outcome', '?'):<7} {(e.get('digest') or '')[:12]:<12}{reason}")
    if not entries:
        print("no deploys yet")
    return 0


@command("rollback", URL, CA_FILE, KEY, PROJECT, APP_ID,
         arg("--to", type=int, metavar="VERSION", help="roll back to this stored version (default: the "
             "one before the active version)"),
         help="return a running app to its previous version")
def _rollback(args: argparse.Namespace) -> int:
    config, url = _target(args)
    with _remote(config, url, args) as remote:
        before = remote.status()
        expect = (before.get("active") or {}).get("version")
        response = remote.rollback(args.to, expect=expect)
    r = response["report"]
    print(f"rolled back {url} from version {r['previous_version']} to {r['version']} in "
          f"{r['timings_ms'].get('total', 0):.1f} ms")
    return 0
