"""The manifest's schema: every field, type and cross-check a reader relies on later.

Parsing is strict on purpose: duplicate keys are refused (``json.loads`` would keep the last one,
so ``{"version": 1, "version": 999}`` could read differently to two parsers), as are ``NaN`` and
``Infinity``, unknown fields and ``true`` where an integer belongs.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._names import check_entry_name, module_path
from .errors import BadEntryName, BadManifest, TooLarge, UnknownFormat

if TYPE_CHECKING:
    from .bundle import Limits

FORMAT = 1
CODECS = ("zstd", "zstd-delta")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadManifest(f"manifest repeats the key {key!r}; a manifest must be unambiguous")
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise BadManifest(f"manifest contains {name}, which is not valid JSON")


def parse_manifest(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadManifest(f"manifest is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadManifest("manifest must be a JSON object")
    return value


_TOP = {"format": int, "app_id": str, "version": int, "parent": (str, type(None)), "created": str,
        "builder": dict, "payload": dict, "entries": list}
_PAYLOAD = {"codec": str, "size": int, "uncompressed_size": int, "sha256": str}
# A delta payload carries only the ``included`` entries; the rest come from the parent bundle.
_DELTA_PAYLOAD = {**_PAYLOAD, "included": list}
_ENTRY = {"name": str, "kind": str, "offset": int, "size": int, "sha256": str}


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


def check_manifest(m: Any, limits: Limits, *, own: bool = False) -> None:
    """Schema, limits and entry-table consistency; everything a reader relies on later.

    ``own=True`` is for a manifest this process just built from typed values: the per-entry type
    and hash-format checks are skipped (names, sizes, order, offsets and limits are still checked).
    """
    _check_fields(m, _TOP, "manifest")
    if m["format"] != FORMAT:
        raise UnknownFormat(f"manifest format {m['format']} is not supported (expected {FORMAT})")
    if not m["app_id"] or not m["app_id"].isascii() or len(m["app_id"]) > 128:
        raise BadManifest("manifest.app_id must be 1-128 ASCII characters")
    if m["version"] < 1:
        raise BadManifest("manifest.version must be a positive integer")
    if m["parent"] is not None and not is_sha256(m["parent"]):
        raise BadManifest("manifest.parent must be a bundle digest (64 hex digits) or null")
    payload = m["payload"]
    if not isinstance(payload, dict) or payload.get("codec") not in CODECS:
        codec = payload.get("codec") if isinstance(payload, dict) else None
        raise UnknownFormat(f"payload codec {codec!r} is not supported (expected one of {CODECS})")
    delta = payload["codec"] == "zstd-delta"
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
    entries = m["entries"]
    if len(entries) > limits.max_entries:
        raise TooLarge(f"bundle has {len(entries)} entries, over the {limits.max_entries} limit",
                       code="too_many_entries")
    _check_entries(entries, payload["uncompressed_size"], limits, own)
    if delta:
        _check_included(payload["included"], entries)


def _check_included(included: list[Any], entries: list[dict[str, Any]]) -> None:
    """The delta's entries: names of this manifest, unique, in entry order."""
    order = {e["name"]: i for i, e in enumerate(entries)}
    last = -1
    for name in included:
        position = order.get(name) if isinstance(name, str) else None
        if position is None or position <= last:
            raise BadManifest(f"manifest.payload.included names {name!r}, which is not an entry, is "
                              "repeated or out of order")
        last = position


def _check_entries(entries: list[Any], total: int, limits: Limits, own: bool = False) -> None:
    offset, previous = 0, None
    names: dict[str, str] = {}
    entry_keys = _ENTRY.keys()
    for i, e in enumerate(entries):
        # Fast path for the common, well-formed entry; anything odd gets the precise check.
        if not own and not (e.__class__ is dict and e.keys() == entry_keys and e["name"].__class__ is str
                and e["kind"].__class__ is str and e["offset"].__class__ is int
                and e["size"].__class__ is int and e["sha256"].__class__ is str and e["size"] >= 0):
            _check_fields(e, _ENTRY, f"manifest.entries[{i}]")
        name, kind = e["name"], e["kind"]
        _check_name(name, kind)
        if previous is not None and name <= previous:
            raise BadEntryName(f"entry {name!r} is a duplicate or out of order; entries are unique and "
                               "sorted by name", name=name)
        previous = name
        if e["size"] > limits.max_entry_bytes:
            raise TooLarge(f"entry {name!r} is {e['size']} bytes, over the {limits.max_entry_bytes} "
                           "byte limit", code="entry_too_large", name=name)
        if e["offset"] != offset:
            raise BadManifest(f"entry {name!r} starts at {e['offset']}, expected {offset}: offsets "
                              "must be contiguous")
        if not own and not is_sha256(e["sha256"]):
            raise BadManifest(f"entry {name!r} has a malformed sha256")
        offset += e["size"]
        names[name] = kind
    if offset != total:
        raise BadManifest(f"entries add up to {offset} bytes but the payload declares {total}")
    _check_tree(names)


@functools.lru_cache(maxsize=65536)
def _check_name(name: str, kind: str) -> None:
    """Names are checked by a pure function: a name seen valid once (last push) is valid again."""
    check_entry_name(name, kind)


def _check_tree(names: Mapping[str, str]) -> None:
    """Every module's parent is a package in the bundle; no data file shadows a module's file."""
    files = {module_path(n, k) for n, k in names.items() if k != "data"}
    for name, kind in names.items():
        if kind == "data":
            if name in files:
                raise BadEntryName(f"data entry {name!r} collides with a module's file", name=name)
            continue
        parent = name.rpartition(".")[0]
        if parent and names.get(parent) != "package":
            raise BadEntryName(f"module {name!r} is inside {parent!r}, which is not a package in this "
                               "bundle (is its __init__.py missing?)", name=name)
