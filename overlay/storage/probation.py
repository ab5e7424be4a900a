"""What the store keeps of a probation: the last permanent version, beside the active one.

While a pushed version is on probation (``install(probation=...)``), the state file names, beside
it, the last permanent version (``"permanent"``, see ``overlay.storage.state``): the one a restart of
the app boots, so a version that crashes the app at start cannot keep it down. Pushes made during a
probation keep the same permanent version; a rollback or a revert is an operator's or a verdict's
choice, permanent at once. A verdict ends the probation: ``permanent`` (the state file names the
active version alone again) or ``reverted`` (the runtime rolls back). Each verdict and each revert
at boot is a history entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from overlay.bundle import Bundle
from overlay.storage import fs
from overlay.storage.bundles import BundleFiles
from overlay.storage.history import History
from overlay.storage.state import Pointer, StateFile, pointer_to

__all__ = ["Probation"]

logger = logging.getLogger("overlay.store")


class Probation:
    """The probation records of the store ``files.root``: its ``state`` file and its ``history``.

    ``lock`` is the store's writers' lock; ``writable`` raises when the store must not be written,
    and ``unsafe`` says why it must not; ``active`` is the bundle this process serves now.
    """

    def __init__(self, files: BundleFiles, state: StateFile, history: History, lock: fs.FileLock, *,
                 unsafe: Sequence[str], writable: Callable[[], None], active: Callable[[], Bundle | None]) -> None:
        self.files, self.state, self.history, self._lock = files, state, history, lock
        self._unsafe, self._writable, self._active = unsafe, writable, active

    def permanent_before_push(self) -> tuple[Pointer | None]:
        """What a push committed on probation writes as the last permanent version: the one before
        it, kept across the pushes made during a probation. Read under the commit's lock."""
        state, _ = self.state.read()
        if state is None:
            return (pointer_to(self._active()),)
        return (state["permanent"],) if "permanent" in state else (state["active"],)

    def status(self) -> tuple[bool, Pointer | None]:
        """Whether the active version (as on disk now) is on probation, and the last permanent one."""
        state, _ = self.state.read()
        if state is None or "permanent" not in state:
            return False, None
        return True, state["permanent"]

    def make_permanent(self, digest: str, reason: str) -> bool:
        """End the probation of the active version ``digest``: false when it is no longer on one."""
        with self._lock, self._io("make the active version permanent"):
            self._writable()
            state, _ = self.state.read()
            active = state["active"] if state is not None else None
            if state is None or "permanent" not in state or active is None or active["digest"] != digest:
                return False
            self.state.write(active, state["highest"])
            self.history.append("probation", active["version"], digest, (), "permanent", None, reason)
            return True

    def record_verdict(self, version: int, digest: str, outcome: str, reason: str) -> None:
        """Append a verdict on ``version`` to the history."""
        with self._lock, self._io("record a probation verdict"):
            self._writable()
            self.history.append("probation", version, digest, (), outcome, "reverted" if outcome == "reverted"
                                else None, reason)

    def boot_permanent(self) -> Bundle | None:
        """Make the last permanent version active again; the bundle to serve (the active one,
        unchanged, outside a probation or when the permanent one does not verify)."""
        with self._lock, self._io("boot the last permanent version"):
            state, _ = self.state.read()
            if state is None or "permanent" not in state or self._unsafe:
                return self._active()
            self._writable()
            permanent, active = state["permanent"], state["active"]
            bundle: Bundle | None = None
            if permanent is not None:
                bundle, why = self.files.verify(permanent["version"], permanent["digest"])
                if bundle is None:
                    logger.error("habanero store %s: the last permanent version v%d cannot be served (%s); "
                                 "keeping the probationary one", self.files.root, permanent["version"], why)
                    return self._active()
            self.state.write(permanent, state["highest"])
            shown = f"v{permanent['version']}" if permanent is not None else "the code on disk"
            reason = (f"the app restarted while v{active['version'] if active else '?'} was on probation: it "
                      f"boots {shown}, the last permanent version")
            if active is not None:
                self.history.append("probation", active["version"], active["digest"], (), "reverted", "reverted",
                                    reason)
            self.history.append("revert", permanent["version"] if permanent else None,
                                permanent["digest"] if permanent else None, (), "ok", None, reason)
            logger.warning("habanero store %s: %s", self.files.root, reason)
            return bundle

    def _io(self, what: str) -> AbstractContextManager[None]:
        return fs.os_errors_as_store_errors(self.files.root, what)
