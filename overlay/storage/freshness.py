"""Which pushes a store takes: newer than every version it accepted, and built on the running one.

A signed bundle stays signed forever, so a captured one could be replayed: the store keeps the
highest version it ever accepted (``highest`` in the state file, which never goes down) and refuses
any version at or below it (``stale_version``). A version far above it would block every later push
once accepted (SECURITY.md, fast-forward), so a jump is bounded (``version_jump_too_large``). A
bundle names the version it was built on (its signed ``parent``): naming another than the running
one means someone pushed or rolled back since, and taking it would silently replace their version
(``stale_parent``).
"""

from __future__ import annotations

from collections.abc import Callable

from overlay.bundle import Bundle
from overlay.errors import StaleVersion
from overlay.storage.bundles import short

__all__ = ["check_parent", "check_version"]


def check_version(version: int, highest: int, max_jump: int) -> None:
    """Refuse ``version`` at or below ``highest`` (a replay), or more than ``max_jump`` above it."""
    if version <= highest:
        raise StaleVersion(
            f"version {version} is not newer than {highest}, the highest version this server has "
            f"accepted (old bundles cannot be replayed); push version {highest + 1} or later; "
            "habanero-pack picks it for you", code="stale_version", version=version, highest=highest)
    if version > highest + max_jump:
        raise StaleVersion(
            f"version {version} jumps more than {max_jump} past {highest}, the highest "
            f"accepted version, and would block every later push; push version {highest + 1}, or if "
            f"the jump is intended, have an admin on the server run Store.reset_highest({version - 1})",
            code="version_jump_too_large", version=version, highest=highest)


def check_parent(bundle: Bundle, running: Bundle | None, stored: Callable[[], list[tuple[int, str]]]) -> None:
    """Refuse ``bundle`` when it names a parent other than ``running`` (None: the code on disk);
    ``stored`` lists the store's versions, to name both in the message."""
    parent = bundle.parent
    if parent is None or (running is not None and running.digest == parent):
        return
    versions = {digest: version for version, digest in stored()}

    def named(digest: str | None, version: int | None) -> str:
        if digest is None:
            return "the code on disk (no version is active)"
        return f"v{version} ({short(digest)})" if version is not None else f"{short(digest)}, not in this store"

    base = named(parent, versions.get(parent))
    active = named(running.digest if running else None, running.version if running else None)
    raise StaleVersion(
        f"version {bundle.version} was built on {base}, but the app runs {active}: someone pushed or "
        "rolled back since, and this push would silently replace their version; pull their change and "
        "rebuild on the active version (habanero-pack push builds on it), or push with --force to "
        "replace it anyway", code="stale_parent", version=bundle.version, parent=parent,
        active=running.digest if running else None)
