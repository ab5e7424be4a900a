"""Deploy on save: ``habanero-pack push --watch [URL] [--check CMD] [--debounce MS]``.

A session keeps warm all a push needs: config, signing key, one keep-alive connection, the source
snapshot, the builder metadata, the last push's manifest (so the next one is a delta) and its
entries' hashes and JSON (:class:`~packer._warm.WarmBuilder`), and where the app stands. A save
then costs a re-read of the changed files and one :func:`~packer.deploy.push_once`, one request:
the app's answer to a push names its new active bundle, which confirms the push and is what the
next one builds on, so the status is read only at start, after a push that failed, and when the app
moved on meanwhile (a push or rollback by someone else, a restart on a fresh store). Nothing is
imported, loaded or forked per push. The builder metadata (user, host, git commit, dirty flag) is
taken once at start, so the ``git_dirty`` the app reports describes the tree when the watch began.

Three threads, one owner: watchfiles' loop posts batches of saves to a queue; a ``--check`` command
runs in its own process group, and a small thread posts its verdict to the same queue; the main
thread owns everything else. A save that arrives while a check runs kills the stale check's process
group and starts over on the newest state.

Each push prints one line: time, version, what changed, patched/replaced counts (the reason for
each replacement below it), milliseconds from the save to the app confirming the new version. A
refused push prints the app's reason and traceback (paths mapped to the project) once and the watch
goes on; an app that cannot be reached is retried with backoff, and what was saved meanwhile is
pushed when it answers. A file read empty (between an editor's truncate and its write) holds the
push until it has content again, or until no event came for 250 ms.

The builder metadata carries ``sources``, a digest of the entry table (names, kinds, sha256s): at
start the session pushes only if the active bundle's differs (for a bundle built without one, the
manifest this project pushed last, kept in ``.habanero/pushed/``, tells).
"""

from __future__ import annotations

import logging
import queue
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overlay.bundle import ParentManifest
from overlay.errors import HabaneroError, RemoteError

from ._warm import WarmBuilder
from ._watching import CheckRun, Event, FileEvents, stop_on_sigterm
from .build import BuiltBundle, builder_info
from .client import Remote
from .collect import SourceSnapshot
from .config import ProjectConfig
from .deploy import BaseCache, PushResult, Tip, push_once
from .output import describe_failure, printable

__all__ = ["DEBOUNCE_MS", "WatchSession"]

log = logging.getLogger(__name__)

#: Longest a burst of writes is grouped into one push. A lone save goes out after one or two steps.
DEBOUNCE_MS = 20
#: zstd level of watch pushes: a delta is a few hundred bytes, a full push goes over loopback.
LEVEL = 1
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 5.0
_TRANSIENT = frozenset({"unreachable", "deploy_in_progress"})  # worth retrying, not refusals
_CHECK_TAIL = 40  # lines of a failed check's output shown
#: How long a file that became empty waits for more events before it is pushed empty.
EMPTY_HOLD_MS = 250


class WatchSession:
    """One ``--watch`` run: the warm state, the counters, and the loop that reacts to events."""

    def __init__(self, remote: Remote, config: ProjectConfig, *, check: str | None = None,
                 debounce_ms: int = DEBOUNCE_MS, level: int = LEVEL,
                 out: Callable[[str], None] | None = None) -> None:
        self.remote, self.config, self.check_command = remote, config, check
        self.debounce_ms, self.level = debounce_ms, level
        self.out = out or (lambda line: print(printable(line), flush=True))
        self.snapshot = SourceSnapshot(config)
        self.snapshot.refresh()
        self.builder = builder_info(config.root)  # once: git is a subprocess
        self.bases = BaseCache(config.root, write_through=False)  # saved when the watch stops
        self.warm = WarmBuilder(config.app_id, remote.key, level=level)  # type: ignore[arg-type]
        self.events: queue.Queue[Event] = queue.Queue()
        self.pushes = self.failures = self.blocked = 0
        self.latencies_ms: list[float] = []
        self._tip: Tip | None = None  # where the app stands, as its answer to our last push said
        self._live: dict[str, Any] | None = None  # the entries the app runs, once we know them
        self._saved: float | None = None  # wall time of the earliest save that is not live yet
        self._check: CheckRun | None = None
        self._passed = check is None  # the check passed for the snapshot as it is now
        self._held: list[str] = []  # entries that just became empty: the rest of their save is due
        self._hold_ms = max(EMPTY_HOLD_MS, debounce_ms)
        self._down = False  # the app stopped answering: said once, until it answers again
        self._wake_at: float | None = None  # when to try again (the app was away) or end a hold
        self._backoff = BACKOFF_FIRST_S
        self._last_refusal: tuple[str, str] | None = None

    def run(self) -> int:
        """Watch until Ctrl-C (or SIGTERM), then print the summary; returns the exit status, 0."""
        watcher = FileEvents(self.snapshot.watch_paths(), self.events, self.debounce_ms)
        watcher.start()
        restore = stop_on_sigterm()
        try:
            self._start()
            checking = f", checking with {self.check_command!r}" if self.check_command else ""
            self.out(f"watching {', '.join(self.config.packages)} for {self.remote.endpoint}{checking}; "
                     "Ctrl-C to stop")
            while True:
                self._step()
        except KeyboardInterrupt:
            pass
        finally:
            watcher.stop.set()
            if self._check is not None:
                self._check.cancel()
            self.remote.close()
            self.bases.save()
            restore()
        self.out(self.summary())
        return 0

    def summary(self) -> str:
        median = (f"median save-to-live {statistics.median(self.latencies_ms):.0f} ms"
                  if self.latencies_ms else "no save went live")
        blocked = f", {self.blocked} stopped by the check" if self.check_command else ""
        return (f"stopped: {self.pushes} push{'es' * (self.pushes != 1)}, "
                f"{self.failures} failure{'s' * (self.failures != 1)}{blocked}, {median}")

    def _start(self) -> None:
        """Push first, unless the app already runs this code."""
        try:
            active = self.remote.status().get("active") or {}
        except RemoteError as exc:
            if exc.code not in _TRANSIENT:
                raise  # a wrong URL or an untrusted key: stop now, with its one-line reason
            self._unreachable(exc)
            return
        files = self.snapshot.files()
        runs = (active.get("builder") or {}).get("sources") or self.bases.sources(active.get("digest"))
        if runs is not None and runs == self.warm.sources(files):
            self._live = files
            self.out(f"{_now()}  v{active['version']} is live and runs this code; nothing to push")
        else:
            self._advance()

    def _step(self) -> None:
        """Wait for an event (or the timer), take everything queued with it, react."""
        waiting = self._wake_at is not None and self._check is None
        timeout = max(0.0, self._wake_at - time.monotonic()) if waiting else None  # type: ignore[operator]
        batch: list[Event] = []
        try:
            batch.append(self.events.get(timeout=timeout))
            while True:
                batch.append(self.events.get_nowait())
        except queue.Empty:
            pass
        saves = [e for e in batch if e[0] == "saved"]
        if saves:  # one refresh, one push for a burst
            self._saved_batch(set().union(*(e[1] for e in saves)), min(e[2] for e in saves))
        for event in batch:
            if event[0] == "checked" and event[1] is self._check:  # a cancelled check's verdict is moot
                self._checked(*event[2:])
            elif event[0] == "watch_failed":
                raise event[1]
        if not batch and waiting:
            self._wake_at = None
            self._advance()

    def _saved_batch(self, paths: set[Path], saved: float) -> None:
        try:
            changes = self.snapshot.refresh(paths)
        except (HabaneroError, OSError) as exc:  # a module defined twice, an unreadable file...
            self.out(f"{_now()}  cannot take this save: {getattr(exc, 'message', exc)}")
            return
        if not changes and not self._held:  # same bytes: a touch, or a save without edits
            root = self.config.root
            shown = sorted(str(p.relative_to(root) if p.is_relative_to(root) else p) for p in paths)
            log.info("saved, nothing changed: %s", ", ".join(shown))
            return
        log.debug("saved: %s", changes)
        if changes:
            self._passed = self.check_command is None
            if self._check is not None:  # its verdict would be about an older state
                self._check.cancel()
                self._check = None
        self._wake_at = None  # a fresh save is worth a try right away, even while the app is away
        files = self.snapshot.files()
        if files == self._live:
            self._saved, self._held = None, []
            self.out(f"{_now()}  back to the code the app runs; nothing to push")
            return
        self._saved = saved if self._saved is None else min(self._saved, saved)
        # Read between an editor's truncate and its write (VS Code saves in place)? Its write is
        # due any moment: hold the push until the files have content again, or until no event
        # came for a while (a file really emptied goes out then).
        emptied = sorted(n for n in {*self._held, *changes.modified} if n in files and not files[n][1])
        if emptied:
            if not self._held:
                log.info("%s became empty: holding the push up to %d ms for the rest of the save",
                         ", ".join(emptied), self._hold_ms)
            self._held, self._wake_at = emptied, time.monotonic() + self._hold_ms / 1000
            return
        self._advance()

    def _advance(self) -> None:
        """Push the snapshot once the check (if any) has passed for it."""
        self._held = []
        if self._passed:
            self._push()
        else:
            self._check = CheckRun(self.check_command or "", self.config.root, self.events)

    def _checked(self, status: int, output: str, elapsed_ms: float) -> None:
        self._check = None
        if status == 0:
            log.info("check passed in %.0f ms", elapsed_ms)
            self._passed = True
            self._push()
            return
        self.blocked += 1
        self._saved = None
        lines = output.rstrip().splitlines()
        cut = f" (last {_CHECK_TAIL} of {len(lines)} lines)" if len(lines) > _CHECK_TAIL else ""
        self.out(f"{_now()}  check failed (exit {status}) in {elapsed_ms:.0f} ms, not pushed: "
                 f"{self.check_command}{cut}")
        for line in lines[-_CHECK_TAIL:]:
            self.out(f"    {line}")

    def _push(self) -> None:
        files = self.snapshot.files()
        builder = {**self.builder, "sources": self.warm.sources(files)}

        def make(version: int, parent: str | None, base: ParentManifest | None) -> tuple[BuiltBundle, bytes]:
            return self.warm.make(files, builder, version=version, parent=parent, base=base)

        try:
            result = push_once(self.remote, self.config, bases=self.bases, tip=self._tip, make=make,
                               read_back=False)
        except HabaneroError as exc:  # refused by the app, or by the build (a name that cannot ship)
            self._tip = None  # the app may have restarted, or moved on: the next push asks first
            if isinstance(exc, RemoteError) and exc.code in _TRANSIENT:
                self._unreachable(exc)
            else:
                self._refused(exc)
            return
        live_at = time.time()
        self._answered()
        self._live, self._tip, self._last_refusal = files, result.tip, None
        self.pushes += 1
        ms = None if self._saved is None else (live_at - self._saved) * 1000
        self._saved = None
        self.latencies_ms += [ms] if ms is not None else []
        self.out(_push_line(result, ms))
        for module in result.report.get("modules", []):
            for name, reason in module.get("replaced", []):
                self.out(f"    replaced {module['module']}.{name}: {reason}")
        log.info("push v%d: %d bytes (%s), client %s, server %s", result.version, result.bytes_sent,
                 "delta" if result.delta else "full", result.timings_ms, result.report.get("timings_ms"))
        base = self.bases.get(result.digest)
        if base is not None:
            self.warm.prepare(base)  # while no save waits: the next push is packed against this one

    def _refused(self, exc: HabaneroError) -> None:
        self._answered()
        self.failures += 1
        self._saved = None
        if (exc.code, exc.message) == self._last_refusal:
            self.out(f"{_now()}  refused again, same reason: {exc.code}")
            return
        self._last_refusal = (exc.code, exc.message)
        self.out(f"{_now()}  refused: {describe_failure(exc, str(self.config.root), self.remote.store)}")
        if getattr(exc, "status", 0):
            self.out("    the app still serves its previous version")

    def _unreachable(self, exc: RemoteError) -> None:
        """Say once that the app is away; try again 0.2, 0.4, 0.8 ... up to 5 s apart."""
        if not self._down:
            self._down, self._backoff = True, BACKOFF_FIRST_S
            self.out(f"{_now()}  {exc.message.split(';')[0]}; retrying with backoff "
                     f"({BACKOFF_FIRST_S:g} s up to {BACKOFF_MAX_S:g} s), saves are kept")
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self._wake_at = time.monotonic() + self._backoff

    def _answered(self) -> None:
        if self._down:
            self._down = False
            self.out(f"{_now()}  {self.remote.endpoint} answers again")
        self._wake_at, self._backoff = None, BACKOFF_FIRST_S


def _push_line(result: PushResult, ms: float | None) -> str:
    r = result.report
    names = [*r.get("changed", []), *r.get("added", []), *r.get("removed", []), *r.get("data_changed", [])]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    patched = sum(len(m.get("patched", [])) for m in r.get("modules", []))
    replaced = sum(len(m.get("replaced", [])) for m in r.get("modules", []))
    timing = (f"save-to-live {ms:.0f} ms" if ms is not None
              else f"pushed at start in {result.timings_ms.get('total', 0):.0f} ms")
    return (f"{_now()}  v{result.version}  {shown or 'no code changes'}  patched {patched}, "
            f"replaced {replaced}  {timing}")


def _now() -> str:
    return time.strftime("%H:%M:%S")
