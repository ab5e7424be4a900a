"""The store's bundle files: ``bundles/`` (committed versions) and ``staged/`` (pushes not committed yet).

Each is ``<version:010d>-<sha256>.hbn``, the signed bundle byte for byte, read-only. A name is a
claim, never trusted: a bundle is served only once it verifies against the current trusted keys and
holds the version and digest its name says. Reading never follows a symbolic link, never opens a
FIFO or a device, and never reads more than a bundle may hold.

A committed bundle whose move out of ``staged/`` a crash cut short (see ``overlay.store``) is read
from there until ``open()`` moves it (:meth:`BundleFiles.clear_staged`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from overlay.bundle import Bundle, Entry, Limits, open_bundle
from overlay.errors import HabaneroError
from overlay.keys import TrustedKeys
from overlay.storage import fs
from overlay.storage.objects import ObjectStore
from overlay.storage.state import Pointer

__all__ = ["NAME", "BundleFiles", "short", "stem"]

logger = logging.getLogger("overlay.store")

NAME = re.compile(r"^(\d{1,30})-([0-9a-f]{64})(\.hbn)?$")  # bundles/ and staged/ files


def short(digest: str) -> str:
    return digest[:12] + "…"


def stem(version: int, digest: str) -> str:
    return f"{version:010d}-{digest}"


def _read_file(path: Path, limit: int) -> bytes:
    """A stored file's bytes: never through a symbolic link, never from a FIFO or a device (which
    would block or never end), never more than ``limit`` bytes. ``ValueError`` says what is wrong."""
    try:
        raw = fs.read_small(path, flags=os.O_NOFOLLOW | os.O_NONBLOCK, limit=limit + 1, regular=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("is a symbolic link, which habanero never follows in its store") from None
        raise
    if len(raw) > limit:
        raise ValueError("is larger than any bundle may be")
    return raw


class BundleFiles:
    """The bundle files under ``root`` (a store's directory), read and verified for ``app_id``.

    Callers that change them hold the store's writers' lock; reading needs none.
    """

    def __init__(self, root: Path, objects: ObjectStore, *, trusted: TrustedKeys, app_id: str,
                 limits: Limits) -> None:
        self.root, self.objects, self.trusted, self.app_id, self.limits = root, objects, trusted, app_id, limits
        self.bundles, self.staged = root / "bundles", root / "staged"
        # The same as strings, for what every push does (a pathlib join costs more than the system call).
        self.bundles_dir, self.staged_dir = os.fspath(self.bundles), os.fspath(self.staged)

    def stored(self) -> list[tuple[int, str]]:
        """``(version, digest)`` of every stored bundle, ascending."""
        try:
            names = os.listdir(self.bundles)
        except OSError:  # bundles/ is not a directory (reported at open)
            return []
        found = (NAME.match(name) for name in names if name.endswith(".hbn"))
        return sorted((int(m[1]), m[2]) for m in found if m)

    def paths(self) -> list[str]:
        """Every stored and staged bundle file (what the object sweep must keep the bodies of)."""
        return [os.path.join(d, n) for d in (self.bundles_dir, self.staged_dir) for n in os.listdir(d)
                if n.endswith(".hbn")]

    def read(self, version: int, digest: str) -> bytes | None:
        """The bytes of a staged or stored bundle (unverified: open them with ``open_bundle``)."""
        name = f"{stem(version, digest)}.hbn"
        for directory in (self.staged_dir, self.bundles_dir):
            path = os.path.join(directory, name)
            try:
                if os.stat(path).st_size <= self.limits.max_bundle_bytes:
                    return fs.read_small(path)
            except OSError:
                continue
        return None

    def verify(self, version: int, digest: str) -> tuple[Bundle | None, str]:
        """The stored bundle of ``(version, digest)``, verified, or None and why. Callers name a
        stored bundle or the state file's: a committed bundle whose move out of staged/ was cut short
        (see ``Store.commit``) is read from there."""
        name = f"{stem(version, digest)}.hbn"
        path = self.bundles / name
        try:
            try:
                raw = _read_file(path, self.limits.max_bundle_bytes)
            except FileNotFoundError:
                try:
                    raw = _read_file(self.staged / name, self.limits.max_bundle_bytes)
                except OSError:
                    return None, f"{path.name} is missing"
        except ValueError as exc:  # of either file
            return None, f"{path.name} {exc}"
        except OSError as exc:
            return None, f"cannot read {path.name} ({exc.strerror})"
        try:
            bundle = open_bundle(raw, self.trusted, app_id=self.app_id, limits=self.limits,
                                 content=self.objects.get)
        except FileNotFoundError:
            return None, f"{path.name} is missing"
        except OSError as exc:
            return None, f"cannot read {path.name} ({exc.strerror})"
        except HabaneroError as exc:
            return None, f"{exc.code}: {exc.message}"
        if (bundle.version, bundle.digest) != (version, digest):
            return None, (f"{path.name} holds v{bundle.version} ({short(bundle.digest)}), not what its "
                          "name says")
        return bundle, ""

    def newest_verifying(self, which: Callable[[int], bool],
                         prefer: str | None = None) -> tuple[Bundle | None, list[str]]:
        """The newest stored bundle (``prefer`` first) whose version passes ``which`` and that
        verifies, and why each one skipped did not."""
        candidates = [(v, d) for v, d in reversed(self.stored()) if which(v)]
        candidates.sort(key=lambda vd: vd[1] != prefer)  # stable: newest first otherwise
        skipped: list[str] = []
        for version, digest in candidates:
            bundle, why = self.verify(version, digest)
            if bundle is not None:
                return bundle, skipped
            skipped.append(f"stored bundle v{version} ({short(digest)}) does not verify: {why}")
        return None, skipped

    def release(self, bundle: Bundle) -> None:
        """Let the committed ``bundle`` go of its file's bytes and bodies: each is read back from
        ``objects/`` when asked for, checked against its hash, else from the bundle's own file."""
        version, digest = bundle.version, bundle.digest
        opened: list[tuple[Bundle | None, str]] = []  # the bundle file, verified once if ever needed

        def read(entry: Entry) -> bytes | None:
            body = self.objects.get(entry.sha256, entry.size)
            if body is not None and len(body) == entry.size and hashlib.sha256(body).hexdigest() == entry.sha256:
                return body
            logger.warning("habanero store %s: object %s (%s, of v%d) is missing or damaged; reading it from "
                           "the bundle file", self.root, entry.sha256[:12], entry.name, version)
            if not opened:
                opened.append(self.verify(version, digest))
            whole, why = opened[0]
            twin = whole.by_hash.get(entry.sha256) if whole is not None else None
            if whole is None or twin is None:
                logger.error("habanero store %s: %s cannot be read back: %s", self.root, entry.name,
                             why or f"bundle v{version} does not carry it")
                return None
            return whole.bodies[twin.name]

        bundle.release(read)

    def promote(self, staged: str, final: str, bundle: Bundle, *, sync: bool) -> None:
        """Move a committed bundle from staged/ to bundles/. Never raises for the disk: until it
        moves, it is read from staged/ (:meth:`verify`), and :meth:`clear_staged` finishes the move."""
        try:
            try:
                os.replace(staged, final)
            except FileNotFoundError:
                fs.write_atomic(final, bundle.raw, mode=0o444, sync=sync, sync_dir=False)
            if sync:
                fs.fsync_dir(self.bundles_dir)
        except OSError as exc:
            logger.error("habanero store %s: v%d is committed but stays in staged/ (%s); it is served from "
                         "there, and the next start moves it", self.root, bundle.version, exc)

    def remove(self, version: int, digest: str) -> None:
        """Remove a stored bundle (retention, or a version above a reset mark)."""
        (self.bundles / f"{stem(version, digest)}.hbn").unlink(missing_ok=True)

    def clear_staged(self, pointer: Pointer | None) -> None:
        """Empty staged/: a push there never committed, but for the one the state file names, whose
        move to bundles/ a crash cut short (see ``Store.commit``): that one moves now."""
        committed = f"{stem(pointer['version'], pointer['digest'])}.hbn" if pointer is not None else None
        for name in os.listdir(self.staged):
            if name == committed and not (self.bundles / name).exists():
                logger.warning("moved committed bundle %s from staged/ to bundles/: its commit was interrupted "
                               "after its commit point", name)
                os.replace(self.staged / name, self.bundles / name)
                continue
            logger.info("removed staged bundle %s: its push never committed", name)
            (self.staged / name).unlink()

    def drop_stale_staged(self, highest: int, committed: Pointer | None) -> None:
        """Remove the staged bundles that can never be committed as a push (at or below ``highest``),
        but ``committed``, the state file's, whose move to bundles/ is still to come."""
        kept = {stem(p["version"], p["digest"]) for p in filter(None, (committed,))}
        for name in os.listdir(self.staged):
            if (m := NAME.match(name)) and int(m[1]) <= highest and name[:-4] not in kept:
                (self.staged / name).unlink(missing_ok=True)
