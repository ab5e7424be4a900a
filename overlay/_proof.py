"""A delta push's entry table without parsing its manifest: rebuilt from the active one, proven by
the signed bytes.

The manifest of a one-line push lists 1,000 entries, 999 of them as the active bundle has them
(offsets shifted). Parsing and checking all of them costs most of a push. Instead:

1. the manifest's top level (everything but ``entries``) is cut out, parsed strictly and checked;
2. a candidate table is the active bundle's, with the entries the push carries (its payload's
   ``included`` list) replaced or inserted, each read from its own small JSON object and checked;
3. the candidate (the parsed top level with the candidate entries) is serialized the way every
   manifest is written (canonical JSON: sorted keys, no spaces, ASCII escapes), all of it from
   parsed values. If that gives the signed manifest, byte for byte, then the manifest is the
   canonical text of exactly the candidate, so parsing it would give the candidate. How the
   candidate was found (where the entry list was cut out, how the carried entries were located)
   does not matter to that argument; only the byte comparison does.

Everything in the candidate that did not come from the push was checked when the active bundle
was opened (names, kinds, hash format, the package tree), under the same limits; what is new is
checked here (its entry, sizes, totals, order, the tree when names or kinds change). A manifest
the proof cannot vouch for (written another way, an entry removed, a candidate that does not match)
gets ``None`` and is parsed and checked in full, as without a base: the slow path decides every
refusal, so its error messages stay the only ones.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from functools import partial
from operator import attrgetter
from itertools import accumulate
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _manifest
from ._manifest import (
    _ENTRY,
    Entry,
    Table,
    canonical_json,
    canonical_manifest,
    check_included,
    check_top,
    entry_head,
    entry_tail,
    is_sha256,
    parse_manifest,
)
from .errors import BundleRejected

if TYPE_CHECKING:
    from .bundle import Limits

_KIND, _SIZE, _SHA256 = attrgetter("kind"), attrgetter("size"), attrgetter("sha256")
_FEW = 64  # carried entries always worth proving; beyond that, only up to an eighth of the table
_ENTRY_OF = partial(tuple.__new__, Entry)  # Entry(*fields) without a Python-level __new__ call
_OPEN, _CLOSE = b',"entries":[', b'],"format":'  # keys after "created" and before "format"


class Pieces(NamedTuple):
    """Each entry's canonical JSON on either side of its offset (the one field a change before it
    moves): ``{"kind":…,"name":…,"offset":`` and ``,"sha256":"…","size":…},``."""

    heads: list[str]
    tails: list[str]


def pieces_of(rows: list[Entry]) -> Pieces:
    return Pieces([entry_head(e.kind, e.name) for e in rows], [entry_tail(e.sha256, e.size) for e in rows])


class Proven(NamedTuple):
    manifest: dict[str, Any]       # the top level; ``entries`` is the empty list it was cut to
    table: Table
    pieces: Pieces
    added: tuple[str, ...]         # names the known table lacked
    changed: tuple[str, ...]       # names whose hash or kind differ from the known table's


def proven_table(raw: bytes, known: Table, pieces: Pieces, limits: Limits) -> Proven | None:
    """The checked table of manifest ``raw`` built from ``known``, or None: parse it in full."""
    start, end = raw.find(_OPEN), raw.rfind(_CLOSE)
    if start < 0 or end < start:
        return None
    try:
        top = parse_manifest(raw[:start] + b',"entries":[]' + raw[end + 1:])
        delta = check_top(top, limits)
    except BundleRejected:
        return None  # not this layout after all, or a real problem the full check will name
    if not delta:
        return None
    included = top["payload"]["included"]
    if not all(type(name) is str for name in included):
        return None
    if len(included) > max(_FEW, len(known.rows) // 8) or len(known.rows) + len(included) > limits.max_entries:
        return None  # a large change: the full parse is linear, this is not (inserts, a scan each)
    rows = list(known.rows)
    heads, tails = list(pieces.heads), list(pieces.tails)
    names = list(known.names)
    added: list[str] = []
    changed: list[str] = []
    first = len(rows)
    kinds_changed = False
    cursor = start  # included is sorted, and so are the entries: each search starts at the last
    for name in included:
        found = _carried(raw, cursor, end, name, limits)
        if found is None:
            return None
        entry, cursor = found
        at = bisect_left(names, name)
        known_name = at < len(names) and names[at] == name
        if not (known_name and rows[at].kind == entry.kind) and not _name_holds(name, entry.kind):
            return None  # a name (or kind) base did not have, and it is not valid
        if known_name:
            before = rows[at]
            if before.kind == entry.kind and before.sha256 == entry.sha256:
                return None  # carried though unchanged: not how a delta is built; let the full check see
            kinds_changed = kinds_changed or before.kind != entry.kind
            rows[at], heads[at], tails[at] = entry, entry_head(entry.kind, name), entry_tail(entry.sha256, entry.size)
            changed.append(name)
        else:
            names.insert(at, name)
            rows.insert(at, entry)
            heads.insert(at, entry_head(entry.kind, name))
            tails.insert(at, entry_tail(entry.sha256, entry.size))
            added.append(name)
        first = min(first, at)
    if len(rows) > limits.max_entries:
        return None
    sizes = list(map(_SIZE, rows))
    offsets = list(accumulate(sizes, initial=0))
    if offsets.pop() != top["payload"]["uncompressed_size"]:
        return None
    # Written entirely from parsed values, none of it copied from ``raw``: equal bytes mean the
    # manifest is exactly this value.
    if canonical_manifest(top, heads, offsets, tails) != raw:
        return None  # the proof: anything else is parsed in full
    try:
        check_included(included, tuple(names))
    except BundleRejected:
        return None
    kinds = tuple(map(_KIND, rows))
    if added or kinds_changed:
        try:
            _manifest._check_tree(dict(zip(names, kinds)))
        except BundleRejected:
            return None
    # Entries before the first change keep their offsets: reuse them; the rest move (made at C
    # speed: this is the one step that may touch every entry).
    hashes = tuple(map(_SHA256, rows))
    final = rows[:first] + list(map(_ENTRY_OF, zip(names[first:], kinds[first:], offsets[first:],
                                                   sizes[first:], hashes[first:])))
    same_names = not added and not kinds_changed
    table = Table(final, tuple(names), kinds, tuple(offsets), tuple(sizes), hashes,
                  sorted(bisect_left(names, n) for n in changed) if same_names else None)
    return Proven(top, table, Pieces(heads, tails), tuple(added), tuple(changed))


def _carried(raw: bytes, start: int, end: int, name: str, limits: Limits) -> tuple[Entry, int] | None:
    """The entry object of ``name`` in the manifest's entry list, its fields checked (the name by
    the caller, when base lacks it); None if not found as expected (the byte comparison would fail
    anyway) or not valid (the full check says why). Also where the entry's object ends."""
    marker = f'"name":{canonical_json(name)},"offset":'.encode("ascii")
    at = raw.find(marker, start, end)
    if at < 0:
        return None
    left, right = raw.rfind(b"{", start, at), raw.find(b"}", at, end)
    if left < 0 or right < 0:
        return None
    try:
        obj = json.loads(raw[left: right + 1])
    except (ValueError, RecursionError):
        return None
    if not (type(obj) is dict and obj.keys() == _ENTRY.keys() and obj["name"] == name
            and type(obj["kind"]) is str and type(obj["offset"]) is int and type(obj["size"]) is int
            and type(obj["sha256"]) is str and 0 <= obj["size"] <= limits.max_entry_bytes
            and is_sha256(obj["sha256"])):
        return None
    return Entry(name, obj["kind"], obj["offset"], obj["size"], obj["sha256"]), right


def _name_holds(name: str, kind: str) -> bool:
    try:
        _manifest._check_name(name, kind)
    except BundleRejected:
        return False
    return True
