"""A delta push's entry table without parsing its manifest: the active one's, proven by the signed bytes.

The manifest of a one-line push lists 1,000 entries, 999 of them exactly as the active bundle lists
them. Parsing and checking all of them would cost most of a push. Instead (format 2 manifests, whose
entries carry no offsets, so an entry's text does not depend on the entries before it):

1. the manifest's top level (everything but ``entries``) is cut out, parsed strictly and checked;
2. the entries the push carries (its payload's ``included`` list) are read one by one, each from
   its own small JSON object, and checked;
3. the manifest must then be, byte for byte, the canonical text (sorted keys, no spaces, ASCII
   escapes: how every manifest is written) of the parsed top level with the active bundle's entries,
   the carried ones replaced or inserted. The active bundle's entries are compared as runs of its
   own manifest's bytes, which were checked to be the canonical text of its entries (``Spans``); a
   carried entry as the canonical text of its parsed values. If every byte matches, the manifest is
   the canonical text of exactly the candidate, so parsing it would give the candidate. How the
   pieces were located does not matter to that argument; only the byte comparison does.

Everything in the candidate that did not come from the push was checked when the active bundle was
opened (names, kinds, hash format, the package tree), under the same limits; what is new is checked
here (its entry, sizes, totals, order, the tree when names or kinds change). A manifest the proof
cannot vouch for (written another way, an entry removed, a candidate that does not match) gets
``None`` and is parsed and checked in full, as without a base: the slow path decides every refusal,
so its error messages stay the only ones. The cost is a few memory comparisons and the carried
entries: flat in the project's size but for copying four columns of references.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any, NamedTuple

from overlay.errors import BundleRejected
from overlay.format import manifest
from overlay.format.limits import Limits
from overlay.format.manifest import (
    ENTRIES_OPEN,
    ENTRY_JSON,
    Entry,
    EntryTable,
    canonical_manifest,
    canonical_parts,
    check_top,
    is_sha256,
    parse_manifest,
)

_FEW = 64  # carried entries always worth proving; beyond that, only up to an eighth of the table
_OPEN, _CLOSE = ENTRIES_OPEN.encode("ascii"), b'],"format":'  # "format" is the key after "entries"
_FIELDS = frozenset(("kind", "name", "sha256", "size"))
_AFTER_NAME = b',"sha256":"'  # in an entry's text, what follows its name (a name holds no quote)


class Spans(NamedTuple):
    """Where a canonical manifest's entries are: the first one's start, then each one's length (a
    comma sits between two)."""

    start: int
    lengths: list[int]


def spans_of(raw: bytes, top: Mapping[str, Any], texts: list[str]) -> Spans | None:
    """The spans of manifest ``raw`` if it is exactly the canonical text of ``top`` with entries of
    these canonical ``texts``; None if it is written any other way."""
    if canonical_manifest(top, texts) != raw:
        return None
    return Spans(len(canonical_parts(top)[0]), list(map(len, texts)))


class Proven(NamedTuple):
    manifest: dict[str, Any]       # the top level; ``entries`` is the empty list it was cut to
    table: EntryTable
    spans: Spans
    added: tuple[str, ...]         # names the base table lacked
    changed: tuple[str, ...]       # names whose hash or kind differ from the base table's


class _Carried(NamedTuple):
    at: int          # its position in the base table (of its name, or where it goes)
    entry: Entry
    length: int      # of its text
    replaces: bool   # base has an entry of that name


def proven_table(raw: bytes, base_raw: bytes, known: EntryTable, spans: Spans | None, limits: Limits
                 ) -> Proven | None:
    """The checked table of manifest ``raw`` built from a base's, or None: parse it in full.

    The base is a bundle opened earlier: its manifest ``base_raw``, its checked table ``known`` and
    the ``spans`` of its entries in ``base_raw`` (None: not canonical, nothing to prove against).
    """
    start, end = raw.find(_OPEN), raw.rfind(_CLOSE)
    if spans is None or start < 0 or end < start:
        return None
    try:
        top = parse_manifest(raw[:start] + b',"entries":[]' + raw[end + 1:])
        delta = check_top(top, limits)
    except BundleRejected:
        return None  # not this layout after all, or a real problem the full check will name
    if not delta or top["format"] == 1:
        return None
    head, tail = (part.encode("ascii") for part in canonical_parts(top))
    if not (raw.startswith(head) and raw.endswith(tail)) or len(head) + len(tail) > len(raw):
        return None
    included = top["payload"]["included"]
    n = len(known.rows)
    if not all(type(name) is str for name in included):
        return None
    if len(included) > max(_FEW, n // 8) or n + len(included) > limits.max_entries:
        return None  # a large change: the full parse is linear, this is not (inserts, a scan each)
    carried = _walk(raw, len(head), len(raw) - len(tail), base_raw, known, spans, included, limits)
    if carried is None:
        return None
    return _table(top, known, spans.lengths, carried, len(head), limits)


def _walk(raw: bytes, pos: int, stop: int, base_raw: bytes, known: EntryTable, spans: Spans, included: list[str],
          limits: Limits) -> list[_Carried] | None:
    """Match ``raw[pos:stop]`` against base's entries with the ``included`` ones replaced or
    inserted; the carried entries, or None at the first byte that differs."""
    source, lengths = memoryview(base_raw), spans.lengths
    names, n = known.names, len(known.rows)
    found: list[_Carried] = []
    next_base, previous = 0, None
    at_base = spans.start  # where base's entry ``next_base`` starts in its manifest
    for name in included:
        if previous is not None and name <= previous:
            return None  # included must be sorted and unique
        previous = name
        at = bisect_left(names, name, next_base)
        if at > next_base:  # base's entries before this one, unchanged: one comparison
            run = sum(lengths[next_base:at]) + at - next_base - 1  # and the commas between them
            pos = _same(raw, pos, source[at_base : at_base + run], found)
            if pos < 0:
                return None
            at_base += run + 1
        if found or at > 0:
            if raw[pos : pos + 1] != b",":
                return None
            pos += 1
        carried = _entry_at(raw, pos, stop, name, limits)
        if carried is None:
            return None
        entry, text_end = carried
        replaces = at < n and names[at] == name
        if replaces:
            before = known.rows[at]
            if before.kind == entry.kind and before.sha256 == entry.sha256:
                return None  # carried though unchanged: not how a delta is built; let the full check see
            if before.kind != entry.kind and not _name_holds(name, entry.kind):
                return None
            at_base += lengths[at] + 1
        elif not _name_holds(name, entry.kind):
            return None  # a name base did not have, and it is not valid
        found.append(_Carried(at, entry, text_end - pos, replaces))
        pos = text_end
        next_base = at + 1 if replaces else at
    if next_base < n:
        run = sum(lengths[next_base:]) + n - next_base - 1
        pos = _same(raw, pos, source[at_base : at_base + run], found)
    return found if pos == stop else None


def _same(raw: bytes, pos: int, run: memoryview, after_another: object) -> int:
    """Past ``run`` (base's bytes) at ``pos`` in ``raw``, after a comma if it follows an entry; -1
    if the bytes differ."""
    if after_another:
        if raw[pos : pos + 1] != b",":
            return -1
        pos += 1
    return pos + len(run) if raw.startswith(run, pos) else -1


def _entry_at(raw: bytes, pos: int, stop: int, name: str, limits: Limits) -> tuple[Entry, int] | None:
    """The entry ``name`` whose canonical text starts at ``pos``, checked, and where its text ends."""
    after_name = raw.find(_AFTER_NAME, pos, stop)
    right = raw.find(b"}", after_name, stop) if after_name >= 0 else -1
    if right < 0 or raw.count(b"[", pos, right) or raw.count(b"{", pos + 1, right):
        return None  # not an entry's canonical text, which has no other bracket (nor a parser recursing in it)
    try:
        obj = json.loads(raw[pos : right + 1])
    except (ValueError, RecursionError):
        return None
    if not (type(obj) is dict and obj.keys() == _FIELDS and obj["name"] == name
            and type(obj["kind"]) is str and type(obj["size"]) is int and type(obj["sha256"]) is str
            and 0 <= obj["size"] <= limits.max_entry_bytes and is_sha256(obj["sha256"])):
        return None
    entry = Entry(name, obj["kind"], obj["size"], obj["sha256"])
    if not (name.isascii() and entry.kind.isascii()):
        return None  # not a valid entry (the full check names it), nor one ENTRY_JSON can write
    # Written from the parsed values: equal bytes mean this text is exactly that entry.
    if raw[pos : right + 1] != ENTRY_JSON(entry.kind, name, entry.sha256, entry.size).encode("ascii"):
        return None
    return entry, right + 1


def _table(top: dict[str, Any], known: EntryTable, base_lengths: list[int], carried: list[_Carried], start: int,
           limits: Limits) -> Proven | None:
    """Base's table with the carried entries put in, and the checks that depend on them; ``start``
    is where this manifest's first entry begins (its own head's length, not base's)."""
    rows, names, kinds = list(known.rows), list(known.names), list(known.kinds)
    sizes, hashes, lengths = list(known.sizes), list(known.hashes), list(base_lengths)
    added: list[str] = []
    changed: list[str] = []
    kinds_changed = False
    shift = 0
    for at, entry, length, replaces in carried:
        i = at + shift
        if replaces:
            kinds_changed = kinds_changed or kinds[i] != entry.kind
            rows[i], kinds[i], sizes[i], hashes[i], lengths[i] = entry, entry.kind, entry.size, entry.sha256, length
            changed.append(entry.name)
        else:
            rows.insert(i, entry)
            names.insert(i, entry.name)
            kinds.insert(i, entry.kind)
            sizes.insert(i, entry.size)
            hashes.insert(i, entry.sha256)
            lengths.insert(i, length)
            shift += 1
            added.append(entry.name)
    if len(rows) > limits.max_entries or sum(sizes) != top["payload"]["uncompressed_size"]:
        return None
    if added or kinds_changed:
        try:
            manifest.check_tree(dict(zip(names, kinds)))
        except BundleRejected:
            return None
    names_t = tuple(names)
    same_names = not added and not kinds_changed
    table = EntryTable(rows, names_t, tuple(kinds), tuple(sizes), tuple(hashes),
                  sorted(bisect_left(names_t, name) for name in changed) if same_names else None)
    return Proven(top, table, Spans(start, lengths), tuple(added), tuple(changed))


def _name_holds(name: str, kind: str) -> bool:
    try:
        manifest.check_name(name, kind)
    except BundleRejected:
        return False
    return True
