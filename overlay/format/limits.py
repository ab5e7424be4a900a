"""Every size a bundle may declare, checked before memory is spent on it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True)
class Limits:
    """Every size a bundle may declare, checked before memory is spent on it."""

    max_bundle_bytes: int = 64 << 20
    max_manifest_bytes: int = 8 << 20
    max_entries: int = 20_000
    max_entry_bytes: int = 16 << 20
    max_total_bytes: int = 256 << 20


DEFAULT_LIMITS = Limits()
