"""The manifest's schema: every field, type and cross-check a reader relies on later.

Parsing is strict on purpose: duplicate keys are refused (``json.loads`` would keep the last one,
so ``{"version": 1, "version": 999}`` could read differently to two parsers), as are ``NaN`` and
``Infinity``, unknown fields and ``true`` where an integer belongs. Arrays and objects nest at most
:data:`MAX_DEPTH` levels, counted in the bytes before any parser recurses into them.

A push's manifest lists every entry (1,000 for a large app) though few changed, so the checks run
a column at a time at C speed (``_fast_table``), and entries identical to ones verified earlier (the
active bundle's :class:`EntryTable`) skip the checks that depend on nothing else. Whenever the fast path
is unsure it hands over to the entry-by-entry check, which says precisely what is wrong.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache, partial
from itertools import accumulate, compress, count, repeat
from operator import itemgetter, lt, ne
from typing import Any, NamedTuple

from overlay.errors import BadEntryName, BadManifest, TooLarge, UnknownFormat
from overlay.format.limits import Limits
from overlay.format.names import APP_ID_RULE, check_entry_name, module_path, valid_app_id

FORMAT = 2  #: what this habanero writes
#: How deep arrays and objects may nest in a manifest: the root object is level 1, ``entries`` 2, an
#: entry 3 (``builder`` and ``payload`` are 2, ``payload.included`` 3). The rest is room for builder
#: metadata; far below the depth where a recursive parser or encoder gives up.
MAX_DEPTH = 8
READABLE = (1, 2)  #: what it reads: format 1 entries also list their offsets (see docs/bundle-format.md)
CODECS = ("zstd", "zstd-delta")


class Entry(NamedTuple):
    """One file of a bundle (``overlay.bundle.Entry``). A tuple, not a dataclass: a bundle makes
    thousands of them per open."""

    name: str
    kind: str  # "module", "package" (an __init__) or "data"
    size: int
    sha256: str

    @property
    def path(self) -> str:
        """The entry's relative path in a source tree (``pkg/mod.py``, ``pkg/data/x.txt``)."""
        return self.name if self.kind == "data" else module_path(self.name, self.kind)


class EntryTable(NamedTuple):
    """A checked entry table: its entries in order, the same as columns, and how it differs from base.

    ``changed`` is set when the table was checked against a known one (the active bundle's) listing
    the same names and kinds in the same order: the positions whose size or hash differ there.
    """

    rows: list[Entry]
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    sizes: tuple[int, ...]
    hashes: tuple[str, ...]
    changed: list[int] | None = None

    @classmethod
    def of(cls, rows: list[Entry]) -> EntryTable:
        # zip(*rows) is the four columns; mypy cannot count them, so it fears one lands on ``changed``
        return cls(rows, *zip(*rows)) if rows else cls(rows, (), (), (), ())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- canonical text

#: How every manifest is written (``build_bundle``'s ``json.dumps``): sorted keys, no spaces, ASCII.
canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_BEFORE, _AFTER = ("app_id", "builder", "created"), ("format", "parent", "payload", "version")  # sorted

#: A format 2 entry's canonical JSON, given kind, name, sha256 and size (``str.format`` runs at C
#: speed over columns). Exact for valid entries only: their names and kinds need no JSON escape.
ENTRY_JSON = '{{"kind":"{}","name":"{}","sha256":"{}","size":{}}}'.format
ENTRIES_OPEN = ',"entries":['  # in the canonical text, between "created" and the first entry


def canonical_parts(top: Mapping[str, Any]) -> tuple[str, str]:
    """What comes before and after the entries' JSON in the canonical text of manifest ``top``."""
    head = canonical_json({k: top[k] for k in _BEFORE})
    tail = canonical_json({k: top[k] for k in _AFTER})
    return head[:-1] + ENTRIES_OPEN, "]," + tail[1:]


def canonical_manifest(top: Mapping[str, Any], texts: Iterable[str]) -> bytes:
    """The format 2 manifest ``top`` (its fields but ``entries``) with entries of these canonical
    JSON texts, as ``build_bundle`` writes it."""
    head, tail = canonical_parts(top)
    return f'{head}{",".join(texts)}{tail}'.encode("ascii")


# ---------------------------------------------------------------------------------------- parsing


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadManifest(f"manifest repeats the key {key!r}; a manifest must be unambiguous")
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise BadManifest(f"manifest contains {name}, which is not valid JSON")


_FAST = json.JSONDecoder(parse_constant=_no_constants)
_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """The manifest as a dict; duplicate keys at any depth, NaN and Infinity are refused, and so is
    nesting deeper than :data:`MAX_DEPTH` (found in the bytes, before a parser recurses).

    The C parser builds plain dicts (a Python hook per object costs a third of the parse); a count
    then proves no key was dropped, and only a manifest it cannot vouch for is parsed again with
    the hook, which names the repeated key.
    """
    if nesting_exceeds(raw, MAX_DEPTH):
        raise BadManifest(f"manifest nests arrays or objects more than {MAX_DEPTH} levels deep, the limit "
                          "(habanero writes 3); rebuild it with habanero-pack")
    try:
        text = raw.decode("utf-8")
        value = _FAST.decode(text)
        if not _surely_unique(raw, value):
            value = _STRICT.decode(text)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of 4,300+ digits
        raise BadManifest(f"manifest is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadManifest("manifest must be a JSON object")
    return value


_NOT_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"')  # delete: all but brackets and quotes
_STEP = [0] * 256  # how each byte moves the nesting depth
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in the JSON text ``raw`` nest more than ``limit`` levels deep.

    Read in the bytes, without recursion, at C speed (a millisecond per megabyte): escaped
    backslashes and quotes go first, then everything but brackets and quotes, then the strings
    (brackets in them are text). For invalid JSON the answer is only a guess; the parser refuses it
    anyway.
    """
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # \\ first: in \\" the quote ends the string
    marks = raw.translate(None, _NOT_STRUCTURE)
    if marks.count(b'""') * 2 == marks.count(b'"'):  # every string is "": no bracket inside one
        marks = marks.translate(None, b'"')
    else:
        marks = b"".join(marks.split(b'"')[::2])
    for pair in (b"{}", b"[]"):  # a run of empty siblings is as deep as one: shorter to walk
        while pair * 2 in marks:
            marks = marks.replace(pair * 2, pair)
    return limit + 1 in accumulate(map(_STEP.__getitem__, marks))  # steps of one: stops where it gets there


def nesting_depth(value: Any) -> int:
    """How many levels of lists and dicts ``value`` has (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if item.__class__ is dict or item.__class__ is list:
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if item.__class__ is dict else item))
    return deepest


def _surely_unique(raw: bytes, value: Any) -> bool:
    """True only if no object in ``raw`` repeats a key; False means "not sure": parse strictly.

    Outside strings, each key/value pair writes exactly one ``:`` and nothing else writes any. Inside
    a string a ``:`` is one in its text, and the text has no other unless escaped as ``\\u003a``. So
    without that escape, ``raw.count(":")`` is the number of pairs plus the colons in strings. What
    the parse kept can only count less: one pair per distinct key, and a value dropped with its
    duplicate key takes its own strings and pairs along. Equality proves nothing was dropped.
    Entries are counted without reading their keys and values (a valid entry's hold no colon): if
    one does, the sides differ and we are unsure.
    """
    if b"\\u003a" in raw or b"\\u003A" in raw:
        return False
    entries = value.get("entries") if value.__class__ is dict else None
    if entries.__class__ is list and set(map(type, entries)) <= {dict}:
        counted = _pairs_and_colons(value, skip=entries) + sum(map(len, entries))
    else:
        counted = _pairs_and_colons(value)
    return raw.count(b":") == counted


def _pairs_and_colons(value: Any, skip: Any = None) -> int:
    """Key/value pairs in every object under ``value`` plus the colons in its strings (not ``skip``)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if item.__class__ is dict:
            total += len(item) + sum(key.count(":") for key in item)
            stack.extend(v for v in item.values() if v is not skip)
        elif item.__class__ is list:
            stack.extend(item)
        elif item.__class__ is str:
            total += item.count(":")
    return total


# ---------------------------------------------------------------------------------------- schema


_TOP = {"format": int, "app_id": str, "version": int, "parent": (str, type(None)), "created": str,
        "builder": dict, "payload": dict, "entries": list}
_PAYLOAD = {"codec": str, "size": int, "uncompressed_size": int, "sha256": str}
# A delta payload carries only the ``included`` entries; the rest come from the parent bundle.
_DELTA_PAYLOAD = {**_PAYLOAD, "included": list}
_ENTRY = {"name": str, "kind": str, "size": int, "sha256": str}
_ENTRY_V1 = {"name": str, "kind": str, "offset": int, "size": int, "sha256": str}  # offsets: contiguous
_ROW = itemgetter(*_ENTRY)
_OFFSET = itemgetter("offset")
_new_entry = partial(map, tuple.__new__, repeat(Entry))  # Entries from (name, kind, ...) tuples


def _check_fields(obj: Any, schema: Mapping[str, Any], where: str) -> None:
    if not isinstance(obj, dict):
        raise BadManifest(f"{where} must be an object")
    if len(obj) != len(schema) or obj.keys() != schema.keys():
        _report_fields(obj, schema, where)
    for key, kind in schema.items():
        value = obj[key]
        if value.__class__ is bool or not isinstance(value, kind):
            raise BadManifest(f"{where}.{key} has the wrong type ({type(value).__name__})")
        if value.__class__ is int and value < 0:
            raise BadManifest(f"{where}.{key} must not be negative")


def _report_fields(obj: dict[str, Any], schema: Mapping[str, Any], where: str) -> None:
    missing = schema.keys() - obj.keys()
    extra = obj.keys() - schema.keys()
    raise BadManifest(f"{where}: missing {sorted(missing)} / unknown {sorted(extra)} fields")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: str) -> bool:
    return _SHA256.fullmatch(text) is not None


def check_manifest(m: Any, limits: Limits, *, own: bool = False, known: EntryTable | None = None) -> EntryTable:
    """Schema, limits and entry-table consistency; everything a reader relies on later.

    Returns the checked entry table. With ``known`` (the active bundle's table), an entry with the
    name, kind and hash of a known one skips the checks that depend on nothing else (name, hash
    format, their types); with the same names and kinds in the same order, the order and tree checks
    are skipped too. Size types, totals and limits (and format 1's offsets) are checked for every entry.
    ``own=True`` is for a manifest this process just built from typed values.
    """
    delta = check_top(m, limits)
    entries = m["entries"]
    if len(entries) > limits.max_entries:
        raise TooLarge(f"bundle has {len(entries)} entries, over the {limits.max_entries} limit",
                       code="too_many_entries")
    total, v1 = m["payload"]["uncompressed_size"], m["format"] == 1
    table = _fast_table(entries, total, limits, known, v1)
    if table is None:
        table = EntryTable.of(_check_entries(entries, total, limits, own, v1))
    if delta:
        _check_included(m["payload"]["included"], table.names)
    return table


def check_top(m: Any, limits: Limits) -> bool:
    """Everything about a manifest but its entries; True for a delta payload (``zstd-delta``)."""
    _check_fields(m, _TOP, "manifest")
    if nesting_depth(m["builder"]) > MAX_DEPTH - 1:  # a parsed manifest passed this; a built one checks here
        raise BadManifest(f"manifest.builder nests more than {MAX_DEPTH - 1} levels deep (the manifest's "
                          f"limit is {MAX_DEPTH}); flatten the builder metadata")
    if m["format"] not in READABLE:
        raise UnknownFormat(f"manifest format {m['format']} is not supported (this habanero reads formats "
                            f"{', '.join(map(str, READABLE))}); upgrade habanero on the server")
    if not valid_app_id(m["app_id"]):
        raise BadManifest(f"manifest.app_id {m['app_id']!r} is not an app id: {APP_ID_RULE}")
    if m["version"] < 1:
        raise BadManifest("manifest.version must be a positive integer")
    if m["parent"] is not None and not is_sha256(m["parent"]):
        raise BadManifest("manifest.parent must be a bundle digest (64 hex digits) or null")
    payload = m["payload"]
    if not isinstance(payload, dict) or payload.get("codec") not in CODECS:
        codec = payload.get("codec") if isinstance(payload, dict) else None
        raise UnknownFormat(f"payload codec {codec!r} is not supported (expected one of {CODECS})")
    delta: bool = payload["codec"] == "zstd-delta"
    _check_fields(payload, _DELTA_PAYLOAD if delta else _PAYLOAD, "manifest.payload")
    if delta and m["parent"] is None:
        raise BadManifest("a delta payload needs a parent bundle to take the other entries from")
    if not is_sha256(payload["sha256"]):
        raise BadManifest("manifest.payload.sha256 must be 64 lowercase hex digits")
    if payload["uncompressed_size"] > limits.max_total_bytes:
        raise TooLarge(f"bundle unpacks to {payload['uncompressed_size']} bytes, over the "
                       f"{limits.max_total_bytes} byte limit", code="decompressed_too_large")
    if payload["size"] > limits.max_bundle_bytes:
        raise TooLarge(f"payload declares {payload['size']} bytes, over the bundle limit",
                       code="bundle_too_large")
    return delta


def _check_included(included: list[Any], names: tuple[str, ...]) -> None:
    """The delta's entries: names of this manifest (sorted, checked), unique, in entry order."""
    last = -1
    for name in included:
        position = bisect_left(names, name) if isinstance(name, str) else len(names)
        if position == len(names) or names[position] != name or position <= last:
            raise BadManifest(f"manifest.payload.included names {name!r}, which is not an entry, is "
                              "repeated or out of order")
        last = position


def _fast_table(entries: list[Any], total: int, limits: Limits, known: EntryTable | None,
                v1: bool) -> EntryTable | None:
    """The table, if every entry check holds; None if one fails (``_check_entries`` then says which).

    The checks of ``_check_entries``, a column at a time. Integer columns are type-checked before
    any comparison, so no ``1.0`` or ``true`` passes for an integer; a string equal to a known one
    is a string.
    """
    try:
        return _columns_hold(entries, total, limits, known, v1)
    except (TypeError, KeyError):  # an entry that is not an object, lacks a field, or a list for a name
        return None


def _columns_hold(entries: list[Any], total: int, limits: Limits, known: EntryTable | None,
                  v1: bool) -> EntryTable | None:
    """``_fast_table``'s checks, raising TypeError or KeyError on some odd entries."""
    if not entries:
        return None
    table = EntryTable.of(list(_new_entry(map(_ROW, entries))))
    if sum(map(len, entries)) != len(_ENTRY_V1 if v1 else _ENTRY) * len(entries):  # all fields, none else
        return None
    names, kinds, sizes, hashes = table.names, table.kinds, table.sizes, table.hashes
    if set(map(type, sizes)) != {int}:
        return None
    if min(sizes) < 0 or max(sizes) > limits.max_entry_bytes:
        return None
    starts = tuple(accumulate(sizes, initial=0))
    if starts[-1] != total:
        return None
    if v1:
        offsets = tuple(map(_OFFSET, entries))
        if set(map(type, offsets)) != {int} or starts[:-1] != offsets:
            return None
    if known is not None and names == known.names and kinds == known.kinds:
        # The same valid, sorted names, the same tree: only a changed hash is new.
        changed = sorted({*compress(count(), map(ne, hashes, known.hashes)),
                          *compress(count(), map(ne, sizes, known.sizes))})
        if not _hashes_valid([hashes[i] for i in changed]):
            return None
        return table._replace(changed=changed)
    if known is None:
        valid = _all_valid(names, kinds, hashes)
    else:  # only (name, kind, hash) triples the known table lacks: the checks depend on nothing else
        fresh = set(zip(names, kinds, hashes)) - set(zip(known.names, known.kinds, known.hashes))
        valid = _all_valid(*zip(*fresh)) if fresh else True
    if not valid:
        return None
    if not all(map(lt, names, names[1:])):  # every name is a string by now
        return None
    check_tree(dict(zip(names, kinds)))
    return table


def _hashes_valid(hashes: Sequence[Any]) -> bool:
    """Each is 64 lowercase hex digits: one pass over them all (a regex each costs 10 times more)."""
    if not (set(map(type, hashes)) <= {str} and set(map(len, hashes)) <= {64}):
        return False
    joined = "".join(hashes)
    return joined.isascii() and not joined.encode("ascii").translate(None, b"0123456789abcdef")


def _all_valid(names: Sequence[Any], kinds: Sequence[Any], hashes: Sequence[Any]) -> bool:
    """The entry checks that depend on nothing else: field types, names, hash format."""
    if not (set(map(type, names)) | set(map(type, kinds)) <= {str} and _hashes_valid(hashes)):
        return False
    try:
        for name, kind in zip(names, kinds):
            check_name(name, kind)
    except BadEntryName:
        return False
    return True


def _check_entries(entries: list[Any], total: int, limits: Limits, own: bool = False, v1: bool = False
                   ) -> list[Entry]:
    rows: list[Entry] = []
    offset, previous = 0, None
    names: dict[str, str] = {}
    for i, e in enumerate(entries):
        if not own:
            _check_fields(e, _ENTRY_V1 if v1 else _ENTRY, f"manifest.entries[{i}]")
        name, kind = e["name"], e["kind"]
        check_name(name, kind)
        if previous is not None and name <= previous:
            raise BadEntryName(f"entry {name!r} is a duplicate or out of order; entries are unique and "
                               "sorted by name", name=name)
        previous = name
        if e["size"] > limits.max_entry_bytes:
            raise TooLarge(f"entry {name!r} is {e['size']} bytes, over the {limits.max_entry_bytes} "
                           "byte limit", code="entry_too_large", name=name)
        if v1 and e["offset"] != offset:
            raise BadManifest(f"entry {name!r} starts at {e['offset']}, expected {offset}: offsets "
                              "must be contiguous")
        if not own and not is_sha256(e["sha256"]):
            raise BadManifest(f"entry {name!r} has a malformed sha256")
        offset += e["size"]
        names[name] = kind
        rows.append(Entry(*_ROW(e)))
    if offset != total:
        raise BadManifest(f"entries add up to {offset} bytes but the payload declares {total}")
    check_tree(names)
    return rows


@lru_cache(maxsize=65536)
def check_name(name: str, kind: str) -> None:
    """Names are checked by a pure function: a name seen valid once (last push) is valid again."""
    check_entry_name(name, kind)


def check_tree(names: Mapping[str, str]) -> None:
    """Every module's parent is a package in the bundle; no two entries share a file (``p`` the
    package and ``p.__init__`` the module are both ``p/__init__.py``), no data file shadows a
    module's file; no file sits where another entry needs a directory (``app/sub`` beside
    ``app/sub/x.txt``)."""
    files = {module_path(n, k): n for n, k in names.items() if k != "data"}
    if len(files) != len(names) - sum(k == "data" for k in names.values()):
        _same_file(names)
    paths = files.keys() | {n for n, k in names.items() if k == "data"}
    directories: set[str] = set()
    for path in paths:
        parent = path.rpartition("/")[0]
        while parent and parent not in directories:  # a parent seen before has its own seen too
            directories.add(parent)
            parent = parent.rpartition("/")[0]
    for path in sorted(paths & directories):
        raise BadEntryName(f"entry {path!r} is a file where other entries need a directory of that "
                           "name; rename one of them", name=path)
    for name, kind in names.items():
        if kind == "data":
            if name in files:
                raise BadEntryName(f"data entry {name!r} collides with a module's file", name=name)
            continue
        parent = name.rpartition(".")[0]
        if parent and names.get(parent) != "package":
            raise BadEntryName(f"module {name!r} is inside {parent!r}, which is not a package in this "
                               "bundle (is its __init__.py missing?)", name=name)


def _same_file(names: Mapping[str, str]) -> None:
    """Raise for two module entries that land on one file of the source tree."""
    seen: dict[str, str] = {}
    for name, kind in names.items():
        if kind == "data":
            continue
        path = module_path(name, kind)
        if path in seen:
            raise BadEntryName(f"entries {seen[path]!r} ({names[seen[path]]}) and {name!r} ({kind}) are both "
                               f"{path} in the source tree; a package's own code is its package entry: ship "
                               "it once, and rename the other", name=name)
        seen[path] = name
