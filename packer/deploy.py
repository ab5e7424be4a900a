"""Deploying to a running app: one push, built on what the app runs, sent, and confirmed.

A push asks the app for its highest accepted version and active bundle, builds version
``highest + 1`` on top of the active one, signs and sends it, then reads the status back and fails
loudly unless the active bundle is the one it pushed: a "200 OK" that hides a failed deploy (TUF's
indefinite freeze) does not pass unnoticed. Watch mode asks neither before nor after: the app's
answer to each push, sent after its commit, says which bundle its imports serve and where the next
push starts (see :func:`push_once`). A push of the code the app runs already sends nothing and
spends no version number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay.errors import RemoteError

if TYPE_CHECKING:  # the builder pulls in zstandard and cryptography: imported when a push runs
    from overlay.bundle import ParentManifest
    from overlay.keys import SigningKey

    from .build import BuiltBundle
    from .channel import ChannelRemote
    from .client import Remote
    from .collect import SourceSnapshot
    from .config import ProjectConfig

__all__ = ["BaseCache", "PushResult", "Tip", "push_once"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tip:
    """Where the app stands: the highest version it accepted and the digest of the bundle it runs.

    The next push is version ``highest + 1`` on top of ``active``. Read from the app's status, or
    from the answer to this side's last push (which the app sends after its commit).
    """

    highest: int
    active: str | None
    version: int | None = None  # the active bundle's version
    sources: str | None = None  # the active bundle's sources digest, when its builder recorded one

    @classmethod
    def of(cls, status: dict[str, Any]) -> Tip:
        active = status.get("active") or {}
        return cls(int(status.get("highest") or 0), active.get("digest"), active.get("version"),
                   (active.get("builder") or {}).get("sources"))


@dataclass
class PushResult:
    version: int
    digest: str
    url: str
    response: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    delta: bool = False
    pushed: bool = True  # False: the app runs this code already; nothing was sent
    sources: str | None = None  # of the code now live

    @property
    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = self.response["report"]
        return report

    @property
    def tip(self) -> Tip:
        """Where the app stands after this push: what the next one builds on."""
        return Tip(self.version, self.digest, self.version, self.sources)


#: Built bundle and wire bytes for ``(version, parent, base)``; the wire form is packed against base.
Make = Callable[[int, "str | None", "ParentManifest | None"], "tuple[BuiltBundle, bytes]"]
#: Refusals that say the tip a push was built on is out of date: another push, a rollback, a reset store.
_OUTDATED = frozenset({"stale_version", "parent_missing", "stale_parent"})
#: Of those, the ones that say the app runs another version than the push was built on: a push
#: that read the app's status refuses them (someone else's version would be silently replaced);
#: watch mode, which guesses the tip from its own last push, reads the status and follows the app.
_MOVED = frozenset({"parent_missing", "stale_parent"})


class BaseCache:
    """Manifests of bundles this project pushed, so the next push can be a delta against them.

    Kept in memory (the newest, parsed at its first ``get``: the watch asks right after a push, while
    it waits for the next save) and in ``<project>/.habanero/pushed/``, keyed by digest: written at
    each ``put``, or with ``write_through=False`` (watch mode, where a push must not wait for the
    disk) only the newest, at :meth:`save`. Only manifests this side built are cached, so their
    content is trusted here.
    """

    KEEP = 8

    def __init__(self, root: str | Path | None, *, write_through: bool = True) -> None:
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

    def sources(self, digest: str | None) -> str | None:
        """The sources digest of a bundle this project pushed (for bundles whose builder has none)."""
        from .build import sources_of_manifest

        if not digest:
            return None
        held = self._memory.get(digest)
        manifest = held.manifest_bytes if held is not None and not isinstance(held, bytes) else held
        if manifest is None and self._dir is not None:
            try:
                manifest = (self._dir / f"{digest}.json").read_bytes()
            except OSError:
                return None
        try:
            return sources_of_manifest(manifest) if manifest is not None else None
        except (ValueError, KeyError, TypeError):
            return None

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
        from overlay.storage.fs import write_atomic  # not the store: its import costs 2.6 ms

        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self._dir / f"{digest}.json", manifest_bytes, mode=0o644, sync=False, sync_dir=False)
            for old in sorted(self._dir.glob("*.json"), key=lambda p: p.stat().st_mtime)[: -self.KEEP]:
                old.unlink(missing_ok=True)
        except OSError:
            pass  # a cache: the next push is a full one


def push_once(remote: Remote | ChannelRemote, config: ProjectConfig, *, snapshot: SourceSnapshot | None = None,
              level: int = 3,
              bases: BaseCache | None = None, builder: dict[str, Any] | None = None, tip: Tip | None = None,
              make: Make | None = None, read_back: bool = True, force: bool = False) -> PushResult:
    """Build the next version on top of what the app runs, push it, and confirm it is live.

    Without ``tip`` the app is asked for its status first. With the ``tip`` of this side's last
    push (watch mode) nothing is asked. Should the app refuse because it moved on meanwhile
    (``parent_missing``: another bundle is active, pushed or rolled back to by someone else, or the
    app lost its store; ``stale_version``: another push took the version), its status is read once
    more and the push built again on it.

    When ``bases`` holds the manifest of the app's active bundle, the push is a packed delta (only
    changed entries, manifest compressed against the active one); a server that lacks that parent
    answers ``parent_missing`` and the push is repeated in full. Then the app's active bundle must be
    the one pushed, or this fails loudly (``not_confirmed``): the status is read back for that
    (``read_back``, as a one-off push does), or the push answer's word is taken (watch mode: the
    app sends it after its commit, naming the bundle its imports serve, so a save costs one request).
    ``make`` builds (the watch passes its warm builder); by default ``build`` does, from ``snapshot``.

    A build whose sources are the ones the app runs is not sent: the result says ``pushed=False``
    and no version number is spent.

    The bundle names the active bundle as its ``parent``, and the app refuses it (``stale_parent``)
    if another one is active when it arrives. ``force`` builds it with no parent (signed: the
    manifest says so), so it replaces whatever the app runs; it is sent in full.
    """
    assert remote.key is not None, "a push is signed: the remote needs the signing key"
    make = make or _make_afresh(config, remote.key, snapshot=snapshot, level=level, builder=builder)
    clock = _Clock()
    guessed = tip is not None
    if tip is None:
        with clock("status"):
            tip = Tip.of(remote.status())
    try:
        sent = _send(remote, make, tip, bases, clock, full_retry=not guessed, force=force)
    except RemoteError as exc:
        if exc.code not in _OUTDATED or (exc.code in _MOVED and not guessed):
            raise
        log.info("the app moved on since this push was built (%s); reading its status and pushing again",
                 exc.code)
        with clock("status"):
            tip = Tip.of(remote.status())
        sent = _send(remote, make, tip, bases, clock, full_retry=True, force=force)
    if sent is None:  # the app runs this code already
        return PushResult(tip.version or 0, tip.active or "", str(remote.endpoint), {}, clock.rounded(),
                          pushed=False, sources=tip.sources)
    built, wire, response = sent
    with clock("confirm"):
        status = {"active": response.get("active")} if not read_back and "active" in response else remote.status()
    _confirm(status, built)
    if bases is not None:
        bases.put(built.digest, built.manifest_bytes)
    server_ms = float(response.get("server_ms", 0.0))
    clock.ms["transfer"] = max(0.0, clock.ms["push"] - server_ms)
    clock.ms["server"] = server_ms
    return PushResult(built.version, built.digest, str(remote.endpoint), response, clock.rounded(), len(wire),
                      delta=wire is not built.data, sources=built.sources)


def _runs_already(tip: Tip, built: BuiltBundle, bases: BaseCache | None) -> bool:
    """Whether the app's active bundle has the sources ``built`` has (then there is nothing to push)."""
    if tip.active is None:
        return False
    runs = tip.sources or (bases.sources(tip.active) if bases is not None else None)
    return runs is not None and runs == built.sources


def _send(remote: Remote | ChannelRemote, make: Make, tip: Tip, bases: BaseCache | None, clock: _Clock, *,
          full_retry: bool, force: bool = False) -> tuple[BuiltBundle, bytes, dict[str, Any]] | None:
    """Build version ``tip.highest + 1`` on the active bundle (on none with ``force``) and push it,
    in full if need be; None when the app runs these sources already."""
    version, parent = tip.highest + 1, None if force else tip.active
    base = bases.get(parent) if bases is not None else None
    with clock("build"):
        built, wire = make(version, parent, base)
    if _runs_already(tip, built, bases):
        return None
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


def _make_afresh(config: ProjectConfig, signer: SigningKey, *, snapshot: SourceSnapshot | None, level: int,
                 builder: dict[str, Any] | None) -> Make:
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


def _confirm(status: dict[str, Any], built: BuiltBundle) -> None:
    """The app's status names ``built`` as what it serves, in every process it lists; else a loud
    ``not_confirmed`` (TUF's indefinite freeze: a "200 OK" that hides a failed deploy)."""
    active = status.get("active") or {}
    live = active.get("digest")
    if live != built.digest:
        raise RemoteError(
            f"the server answered OK to version {built.version} but its active bundle is "
            f"{active.get('version', 'none')} ({(live or 'none')[:12]}); the push did "
            "not take effect — check the app's log", code="not_confirmed")
    behind = [w for w in status.get("workers") or [] if isinstance(w, dict) and w.get("digest") != built.digest]
    if behind:
        shown = ", ".join(f"pid {w.get('pid')} on v{w.get('version')}" for w in behind)
        raise RemoteError(f"version {built.version} is live, but not in every process of the app: {shown}; "
                          "check the app's log", code="not_confirmed", body={"workers": behind})


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

    def rounded(self) -> dict[str, float]:
        """Every phase and the total, in milliseconds to two places (``transfer`` and ``server`` split
        ``push`` once the server said its share)."""
        out = {k: round(v, 2) for k, v in self.ms.items() if k != "push"}
        out.setdefault("transfer", round(self.ms["push"], 2))
        out.setdefault("server", 0.0)
        out["total"] = round(self.total(), 2)
        return out
