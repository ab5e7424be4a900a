"""Pushes against the bundle the server runs: only what changed travels, and is checked again.

A delta bundle's payload already carries only the entries the server lacks, but its manifest lists
every entry (about 160 bytes each), so for a large project the manifest dominates a one-line push.
On the wire the manifest is therefore sent as a zstd frame that uses the parent's manifest (which
the server holds) as a raw-content dictionary: a few hundred bytes instead of 160 KB.

Nothing is decompressed before a signature holds: the packed form carries its own signature block
(same keys, its own domain) over everything after it, checked before the manifest is inflated. The
server then rebuilds the exact signed bundle (``unpack``) and verifies it as usual; the store keeps
that unpacked form, so nothing stored depends on a chain of manifests.

Opening a push against the active bundle (``open_bundle(..., base=active)``), what did not change is
not verified again: its bodies are the active bundle's (the same objects, already hashed, nothing
copied: ``assemble``); in a full push they are compared with it, which is cheaper than hashing
(``unlike``).

Packed layout::

    header (flags = 1; manifest_len = packed length) | base digest (32 bytes) |
    transport_sig_len u32 | transport signature block |
    packed manifest | bundle signature block | payload
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

import zstandard

from overlay.errors import CorruptPayload, ParentMissing, TooLarge, UnknownFormat, unverified
from overlay.format.limits import Limits
from overlay.format.manifest import READABLE, Entry, EntryTable
from overlay.format.model import Bundle, ContentLookup, ParentManifest
from overlay.format.payload import MAX_WINDOW
from overlay.format.wire import FLAG_PACKED, HEADER, MAGIC, manifest_bytes_of, parse_sigblock, sign_block, verify_block
from overlay.keys import SigningKey, TrustedKeys

TRANSPORT_DOMAIN = b"habanero-transport-v1\x00"
_LEN = struct.Struct(">I")
_KEEP = 2  # idle decompressors kept, by base digest: pushes against the same base skip the set-up
_idle: dict[str, tuple[bytes, zstandard.ZstdDecompressor]] = {}
_idle_lock = threading.Lock()


def manifest_compressor(base: ParentManifest, *, level: int = 3) -> zstandard.ZstdCompressor:
    """A compressor of manifests against ``base``'s: building one digests its whole manifest, so a
    caller pushing again and again on the same base (watch mode) keeps it."""
    dictionary = zstandard.ZstdCompressionDict(base.manifest_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    dictionary.precompute_compress(level=level)
    return zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_content_size=True)


def pack(bundle: bytes, base: ParentManifest, signers: Sequence[SigningKey], *, level: int = 3,
         compressor: zstandard.ZstdCompressor | None = None) -> bytes:
    """The transport form of ``bundle`` (an unpacked one this side built) for a server holding ``base``;
    ``compressor`` is a :func:`manifest_compressor` for ``base`` kept from an earlier push."""
    _, fmt, _, manifest_len, sig_len = HEADER.unpack_from(bundle)
    manifest = manifest_bytes_of(bundle)
    rest = bundle[HEADER.size + manifest_len :]
    packed = (compressor or manifest_compressor(base, level=level)).compress(manifest)
    base_raw = bytes.fromhex(base.digest)
    body = packed + rest
    signatures = sign_block(TRANSPORT_DOMAIN + base_raw + body, signers)
    header = HEADER.pack(MAGIC, fmt, FLAG_PACKED, len(packed), sig_len)
    return header + base_raw + _LEN.pack(len(signatures)) + signatures + body


def unpack(data: bytes, trusted: TrustedKeys, base_manifest: Callable[[str], bytes | None] | None,
           limits: Limits) -> bytes:
    """Check the transport signature, inflate the manifest against the base, return the bundle."""
    with unverified():  # up to the transport signature: bytes no trusted key vouched for
        if len(data) > limits.max_bundle_bytes:
            raise TooLarge(f"bundle is {len(data)} bytes, over the {limits.max_bundle_bytes} byte limit",
                           code="bundle_too_large")
        _, fmt, _, packed_len, sig_len = HEADER.unpack_from(data)
        if fmt not in READABLE:
            raise UnknownFormat(f"bundle format {fmt} is not supported (this habanero reads formats "
                                f"{', '.join(map(str, READABLE))}); upgrade habanero on the server")
        pos = HEADER.size
        if len(data) < pos + 32 + _LEN.size:
            raise CorruptPayload("packed bundle is truncated", code="truncated")
        base_raw = data[pos : pos + 32]
        (tsig_len,) = _LEN.unpack_from(data, pos + 32)
        pos += 32 + _LEN.size
        if pos + tsig_len + packed_len + sig_len > len(data):
            raise CorruptPayload("packed bundle is truncated", code="truncated")
        signatures = parse_sigblock(data[pos : pos + tsig_len])
        body = data[pos + tsig_len :]
        verify_block(signatures, TRANSPORT_DOMAIN + base_raw + body, trusted)  # before inflating anything
    digest = base_raw.hex()
    dictionary = base_manifest(digest) if base_manifest is not None else None
    if dictionary is None:
        raise ParentMissing(f"this push was packed against bundle {digest[:12]}, which this server does "
                            "not run now; push the full bundle instead (habanero-pack does this by itself)",
                            parent=digest)
    manifest = _inflate(body[:packed_len], digest, dictionary, limits.max_manifest_bytes)
    rest = body[packed_len:]
    return HEADER.pack(MAGIC, fmt, 0, len(manifest), sig_len) + manifest + rest


def _inflate(frame: bytes, digest: str, dictionary: bytes, cap: int) -> bytes:
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"packed manifest is not a zstd frame ({exc})", code="bad_payload") from None
    if size < 0 or size > cap:
        raise TooLarge(f"packed manifest declares {size} bytes (limit {cap})", code="manifest_too_large")
    dctx = _take(digest, dictionary)
    try:
        out = dctx.decompress(frame, max_output_size=cap)  # the declared size was checked above
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"packed manifest does not decompress ({exc})", code="bad_payload") from None
    _give_back(digest, dictionary, dctx)
    if len(out) != size:
        raise CorruptPayload("packed manifest is truncated", code="truncated")
    return out


def prepare(digest: str, manifest: bytes) -> None:
    """Build now the decompressor that pushes packed against this manifest need: building one
    digests the whole manifest, which the server does on a worker after a push, not in the next."""
    with _idle_lock:
        if digest in _idle:
            return
    _give_back(digest, manifest, _take(digest, manifest))


def _take(digest: str, dictionary: bytes) -> zstandard.ZstdDecompressor:
    """A decompressor for ``dictionary``, ours alone until given back (they are not thread-safe).

    The one last used with the same base is reused: building one copies and digests the base's
    whole manifest. It must hold the same bytes, whatever lookup served them this time.
    """
    with _idle_lock:
        held, dctx = _idle.pop(digest, (None, None))
    if dctx is not None and (held is dictionary or held == dictionary):
        return dctx
    raw_content = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=raw_content, max_window_size=MAX_WINDOW)


def _give_back(digest: str, dictionary: bytes, dctx: zstandard.ZstdDecompressor) -> None:
    with _idle_lock:
        _idle.pop(digest, None)  # re-inserted last: the newest stays
        _idle[digest] = (dictionary, dctx)
        while len(_idle) > _KEEP:
            del _idle[next(iter(_idle))]


# ------------------------------------------------------------------------- opening against base


def assemble(table: EntryTable, included: Sequence[str], body: bytes, content: ContentLookup | None, parent: str,
             base: Bundle | None, *, differ: Iterable[int] | None = None) -> tuple[dict[str, bytes], list[Entry]]:
    """A delta's bodies by name, and the entries among them whose bodies must still be hashed.

    Bodies base has let go of (see ``Bodies.spill``) are left out: base's reader fetches them.

    The ``included`` entries (names, in entry order) come from the delta's ``body``; the others from
    ``base``: by name when base's entry has the same hash (the same bytes object, known good: not
    hashed again), else by hash from anywhere in base, else from ``content`` (the store's files:
    hashed). ``differ``, when given, are the only positions whose entry may differ from base's of
    the same name apart from the included ones, and the table lists every name base does (a proven
    table, or one with base's names): then the others need no look at all.
    """
    names, rows = table.names, table.rows
    carried: dict[str, bytes] = {}
    unproven: list[Entry] = []
    pos = 0
    for name in included:  # _decompress made the body exactly as long as these sizes add up to
        entry = rows[bisect_left(names, name)]
        carried[name] = body[pos : pos + entry.size]
        pos += entry.size
        unproven.append(entry)
    base_entries = base.entries if base is not None else {}
    # An entry base has is known good: its body is shared when base holds it in memory, and read
    # back through base's reader (checked against its hash) when base let go of it.
    nothing: dict[str, bytes] = {}
    shared = base.bodies.held if base is not None else nothing.get
    if differ is not None and base is not None:
        bodies = base.bodies.held_copy()
        bodies.update(carried)
        others = [rows[i] for i in differ if names[i] not in carried]
    else:
        bodies = {}
        others = []
        for entry in rows:
            name = entry.name
            if name in carried:
                bodies[name] = carried[name]
                continue
            twin = base_entries.get(name)
            if twin is not None and twin.sha256 == entry.sha256 and twin.size == entry.size:
                if (kept := shared(name)) is not None:
                    bodies[name] = kept
            else:
                others.append(entry)
    missing = 0
    for entry in others:  # bodies base holds under another name (moved, copied), or the store's
        twin = base.by_hash.get(entry.sha256) if base is not None else None
        if twin is not None and twin.size == entry.size:  # known good
            if (kept := shared(twin.name)) is not None:
                bodies[entry.name] = kept
            else:  # read through base's reader when asked; never base's old body under this name
                bodies.pop(entry.name, None)
            continue
        piece = content(entry.sha256) if content is not None else None
        if piece is None:
            missing += 1
            continue
        bodies[entry.name] = piece
        unproven.append(entry)
    if missing:
        raise ParentMissing(
            f"this delta bundle is built on {parent[:12]}, and {missing} of its entries are not held "
            "here (another version is active, or it was pruned); push the full bundle instead "
            "(habanero-pack does this by itself)", parent=parent, missing=missing)
    return bodies, unproven


def split_payload(table: EntryTable, payload: bytes) -> dict[str, bytes]:
    """A full payload cut into its entries' bodies (the table's sizes add up to its length)."""
    starts = list(accumulate(table.sizes, initial=0))
    return dict(zip(table.names, map(payload.__getitem__, map(slice, starts, starts[1:]))))


def unlike(table: EntryTable, bodies: dict[str, bytes], base: Bundle) -> list[Entry]:
    """The entries of a full payload whose bodies are not byte for byte base's same-named entry's.

    Comparing bytes costs a fraction of hashing them (0.1 ms against 1 ms for 1.4 MB). An equal
    body is replaced by base's object, so versions share the memory of what they did not change.
    """
    held, twins = base.bodies.held, base.entries
    unproven: list[Entry] = []
    for entry in table.rows:
        twin = twins.get(entry.name)
        # Base's body is known to have base's hash: the same bytes prove this entry only if it
        # claims that same hash and size. A body base no longer holds in memory is hashed instead.
        if twin is not None and twin.sha256 == entry.sha256 and twin.size == entry.size \
                and (same := held(entry.name)) is not None and same == bodies[entry.name]:
            bodies[entry.name] = same
        else:
            unproven.append(entry)
    return unproven
