"""What differs between two versions, entry by entry: computed once per push, used by every step.

The plan, the finder's index and the process's source tree all need the same answer, and each finding it
for itself would cost a pass over every entry of the project; one pass here is the only work a push
does in proportion to the project's size rather than to its change.
"""

from __future__ import annotations

from dataclasses import dataclass

from overlay.bundle import Bundle


@dataclass(frozen=True)
class EntryDiff:
    """Entry names, each in bundle (name) order. ``changed``: another body or another kind."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that differs."""
        return (*self.added, *self.changed, *self.removed)


def entry_diff(old: Bundle | None, new: Bundle) -> EntryDiff:
    """How ``new`` differs from ``old`` (None: nothing, so every entry is added)."""
    new_entries = new.entries
    if old is None:
        return EntryDiff(tuple(new_entries), (), ())
    known = new.changed_from  # set by open_bundle(base=old) when nothing was removed
    if known is not None and known[0] == old.digest:
        return EntryDiff(known[1], known[2], ())
    old_entries = old.entries
    added: list[str] = []
    changed: list[str] = []
    get = old_entries.get
    for name, entry in new_entries.items():
        before = get(name)
        if before is None:
            added.append(name)
        elif before.sha256 != entry.sha256 or before.kind != entry.kind:
            changed.append(name)
    # Names are unique, so the counts tell whether anything was removed without a second pass.
    removed: tuple[str, ...] = ()
    if len(old_entries) + len(added) != len(new_entries):
        removed = tuple(name for name in old_entries if name not in new_entries)
    return EntryDiff(tuple(added), tuple(changed), removed)
