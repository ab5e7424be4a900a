"""The signed bundle: one self-contained file per version of an app's source.

Layout (all integers big-endian; see docs/bundle-format.md)::

    magic "HABANERO" | format u16 | flags u16 | manifest_len u32 | sigblock_len u32
    manifest (canonical JSON) | signature block | payload (one zstd frame)

This module is pure: bytes in, a verified :class:`Bundle` or a precise :class:`BundleRejected` out.
Reading follows *verify before parse*: the Ed25519 signature over the exact manifest bytes (format 2:
over their sha256, the bundle's digest) is checked against the locally trusted keys before the
manifest is parsed, before anything is decompressed.
Only then: app id, declared sizes against :class:`Limits`, the payload hash, a bounded
decompression, and every entry's size and hash.
"""

from __future__ import annotations

import hashlib
import json
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from operator import itemgetter
from typing import Any

import zstandard

from . import _proof
from ._manifest import CODECS, ENTRY_JSON, FORMAT, READABLE, Entry, Table, check_manifest, parse_manifest
from .errors import (
    BadSignature,
    CorruptPayload,
    TooLarge,
    UnknownFormat,
    UntrustedKey,
    WrongApp,
)
from .keys import SigningKey, TrustedKeys

__all__ = ["Base", "Bundle", "Entry", "Limits", "build_bundle", "bundle_digest", "manifest_bytes_of",
           "open_bundle", "read_unverified", "CODECS"]

ContentLookup = Callable[[str], "bytes | None"]  # sha256 -> an entry body the server already holds

MAGIC = b"HABANERO"
SIGNATURE_DOMAIN = b"habanero-bundle-v2\x00"  # + sha256(manifest): signing cost flat in project size
_SIGNATURE_DOMAIN_V1 = b"habanero-bundle-v1\x00"  # + the manifest itself: format 1, still read
FLAG_PACKED = 1  # transport form: manifest compressed against the parent's (see overlay._delta)
_HEADER = struct.Struct(">8sHHII")
_SIG_LEN = 64
_MAX_SIGNATURES = 8
_MAX_WINDOW = 1 << 25  # zstd window cap: bounds the decoder's memory whatever the frame asks for
_DECOMPRESS_STEP = 1024  # input fed per step; caps how far one step can overshoot the limit
# Decompressors are reused (making one allocates its buffers: a tenth of a small push's decompress
# time). Each is used by one thread at a time: list.pop and append are atomic.
_idle_decompressors: list[zstandard.ZstdDecompressor] = []


@dataclass(frozen=True)
class Limits:
    """Every size a bundle may declare, checked before memory is spent on it."""

    max_bundle_bytes: int = 64 << 20
    max_manifest_bytes: int = 8 << 20
    max_entries: int = 20_000
    max_entry_bytes: int = 16 << 20
    max_total_bytes: int = 256 << 20


DEFAULT_LIMITS = Limits()
_SHA256 = itemgetter(3)  # of an Entry


@dataclass(frozen=True, eq=False)
class Bundle:
    """A verified, decompressed bundle. ``digest`` (sha256 of the manifest) names it.

    ``manifest`` holds the manifest's top-level fields; its entry table is ``entries``, and each
    entry's body is in ``bodies``: one bytes object per entry, so a push shares the bodies it did
    not change with the bundle it was opened against instead of copying a whole snapshot. Opened
    against a ``base`` it may also carry ``changed_from``: ``(base digest, names added, names
    changed)`` when nothing was removed, what ``overlay._diff`` would otherwise find by a pass over
    every entry.
    """

    manifest: dict[str, Any]
    manifest_bytes: bytes
    raw: bytes
    key_ids: tuple[str, ...]
    entries: dict[str, Entry]
    bodies: dict[str, bytes] = field(repr=False)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def format(self) -> int:
        return self.manifest["format"]

    @cached_property
    def hashes(self) -> dict[str, str]:
        """Each entry's sha256 by name; computed once, as the active bundle meets every push."""
        return dict(zip(self.entries, map(_SHA256, self.entries.values())))

    @cached_property
    def by_hash(self) -> dict[str, Entry]:
        """The first entry holding each body, by sha256: where a delta's unchanged bodies come from.

        Every body here was hashed when the bundle was opened, so a body found here is known good.
        """
        entries = list(self.entries.values())[::-1]  # reversed: of equal hashes, the first stays
        return dict(zip(map(_SHA256, entries), entries))

    @cached_property
    def _spans(self) -> _proof.Spans | None:
        """Where each entry's JSON is in the manifest, for proving the next push (see ``_proof``);
        None when the manifest is not the canonical text of its values (another writer's)."""
        if self.format == 1:
            return None
        table = self._table
        texts = list(map(ENTRY_JSON, table.kinds, table.names, table.hashes, table.sizes))
        return _proof.spans_of(self.manifest_bytes, self.manifest, texts)

    @cached_property
    def _table(self) -> Table:
        """The entries as columns, which the next push is checked against (set by ``open_bundle``)."""
        return Table.of(list(self.entries.values()))

    @property
    def app_id(self) -> str:
        return self.manifest["app_id"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def parent(self) -> str | None:
        return self.manifest["parent"]

    def read(self, name: str) -> bytes:
        return self.bodies[name]

    def summary(self) -> dict[str, Any]:
        """What status pages and the CLI show about a bundle."""
        m = self.manifest
        return {
            "app_id": m["app_id"],
            "version": m["version"],
            "digest": self.digest,
            "parent": m["parent"],
            "created": m["created"],
            "builder": m["builder"],
            "entries": len(self.entries),
            "size": len(self.raw),
            "uncompressed_size": m["payload"]["uncompressed_size"],
            "key_ids": list(self.key_ids),
        }


@dataclass(frozen=True)
class Base:
    """What a delta is built against: the server's active bundle, known by its manifest."""

    digest: str
    manifest_bytes: bytes
    hashes: frozenset[str]

    @classmethod
    def from_manifest(cls, manifest_bytes: bytes) -> Base:
        """From a manifest this side built or verified earlier (trusted input)."""
        entries = json.loads(manifest_bytes)["entries"]
        return cls(hashlib.sha256(manifest_bytes).hexdigest(), bytes(manifest_bytes),
                   frozenset(e["sha256"] for e in entries))


# --------------------------------------------------------------------------------------- writing


def build_bundle(
    files: Mapping[str, tuple[str, bytes]] | Iterable[tuple[str, str, bytes]],
    *,
    app_id: str,
    version: int,
    signers: Sequence[SigningKey],
    parent: str | None = None,
    builder: Mapping[str, Any] | None = None,
    created: str | None = None,
    level: int = 3,
    limits: Limits = DEFAULT_LIMITS,
    base: Base | None = None,
    manifest_out: dict[str, Any] | None = None,
) -> bytes:
    """Build and sign a bundle from ``{name: (kind, content)}`` (or ``(name, kind, content)`` rows).

    With ``base`` (the bundle the server runs now), the payload carries only the entries whose
    bodies the base lacks (codec ``zstd-delta``); the manifest still lists every entry.
    ``manifest_out``, if given, receives the manifest as a dict (saves the builder a re-parse).

    Example::

        data = build_bundle({"app": ("module", b"x = 1\\n")}, app_id="app", version=1, signers=[key])
    """
    rows = files.items() if isinstance(files, Mapping) else ((n, (k, c)) for n, k, c in files)
    items = sorted((name, kind, bytes(content)) for name, (kind, content) in rows)
    if not signers:
        raise BadSignature("a bundle needs at least one signing key", code="unsigned")
    entries, chunks = [], []
    for name, kind, content in items:
        entries.append({"name": name, "kind": kind, "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest()})
        chunks.append(content)
    total = sum(map(len, chunks))
    if base is not None:
        parent = base.digest
        included = [e["name"] for e in entries if e["sha256"] not in base.hashes]
        carried = {e["name"] for e in entries if e["sha256"] not in base.hashes}
        chunks = [content for (name, _, content) in items if name in carried]
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(b"".join(chunks))
    payload = {"codec": "zstd", "size": len(frame), "uncompressed_size": total,
               "sha256": hashlib.sha256(frame).hexdigest()}
    if base is not None:
        payload.update(codec="zstd-delta", included=included)
    manifest = {
        "format": FORMAT,
        "app_id": app_id,
        "version": version,
        "parent": parent,
        "created": created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "builder": dict(builder or {}),
        "payload": payload,
        "entries": entries,
    }
    check_manifest(manifest, limits, own=True)  # never write what a server would refuse
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("ascii")
    data = signed_bundle(manifest_bytes, frame, signers, limits)
    if manifest_out is not None:
        manifest_out.update(manifest)
    return data


def signed_bundle(manifest_bytes: bytes, frame: bytes, signers: Sequence[SigningKey], limits: Limits,
                  digest: bytes | None = None) -> bytes:
    """Header, manifest, signatures and payload frame: a bundle, or ``TooLarge`` if a server would
    refuse its size (never write what a server would refuse). ``digest``: the manifest's sha256, if
    the caller has it already."""
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise TooLarge(f"manifest is {len(manifest_bytes)} bytes, over the {limits.max_manifest_bytes} "
                       "byte limit", code="manifest_too_large")
    sigblock = sign_block(signed_message(FORMAT, manifest_bytes, digest), signers)
    data = _HEADER.pack(MAGIC, FORMAT, 0, len(manifest_bytes), len(sigblock)) + manifest_bytes + sigblock + frame
    if len(data) > limits.max_bundle_bytes:
        raise TooLarge(f"bundle is {len(data)} bytes, over the {limits.max_bundle_bytes} byte limit; "
                       "exclude large data files or raise the limit", code="bundle_too_large")
    return data


def signed_message(fmt: int, manifest_bytes: bytes, digest: bytes | None = None) -> bytes:
    """What a bundle's signatures sign: from format 2 on, the manifest's sha256 (``digest``, if the
    caller has it), so that a signature costs the same whatever the manifest's size."""
    if fmt == 1:
        return _SIGNATURE_DOMAIN_V1 + manifest_bytes
    return SIGNATURE_DOMAIN + (digest or hashlib.sha256(manifest_bytes).digest())


def sign_block(message: bytes, signers: Sequence[SigningKey]) -> bytes:
    """A signature block: ``count``, then per key its id and its Ed25519 signature of ``message``."""
    if len(signers) > _MAX_SIGNATURES:
        raise BadSignature(f"at most {_MAX_SIGNATURES} signatures fit in a bundle", code="unsigned")
    out = [bytes([len(signers)])]
    for key in signers:
        kid = key.key_id.encode("ascii")
        out += [bytes([len(kid)]), kid, key.sign(message)]
    return b"".join(out)


# --------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Parts:
    format: int
    manifest_bytes: bytes
    signatures: tuple[tuple[str, bytes], ...]
    frame: bytes


def _split(data: bytes, limits: Limits) -> _Parts:
    """Cut the file into its sections, checking only lengths: nothing is interpreted yet."""
    if len(data) > limits.max_bundle_bytes:
        raise TooLarge(f"bundle is {len(data)} bytes, over the {limits.max_bundle_bytes} byte limit",
                       code="bundle_too_large")
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise UnknownFormat("this is not a habanero bundle (bad magic); build one with "
                            "`habanero-pack build`", code="unknown_format")
    _, fmt, flags, manifest_len, sig_len = _HEADER.unpack_from(data)
    if fmt not in READABLE or flags != 0:
        raise UnknownFormat(f"bundle format {fmt} (flags {flags}) is not supported by this habanero, "
                            f"which reads formats {', '.join(map(str, READABLE))}; upgrade habanero on "
                            "the server or build with a matching habanero-pack", code="unknown_format")
    if manifest_len > limits.max_manifest_bytes:
        raise TooLarge(f"manifest declares {manifest_len} bytes, over the {limits.max_manifest_bytes} "
                       "byte limit", code="manifest_too_large")
    start = _HEADER.size
    if start + manifest_len + sig_len > len(data):
        raise CorruptPayload("bundle is truncated: its header declares more bytes than it holds",
                             code="truncated")
    manifest_bytes = data[start : start + manifest_len]
    sigblock = data[start + manifest_len : start + manifest_len + sig_len]
    return _Parts(fmt, manifest_bytes, parse_sigblock(sigblock), data[start + manifest_len + sig_len :])


def parse_sigblock(block: bytes) -> tuple[tuple[str, bytes], ...]:
    if not block or block[0] == 0:
        raise BadSignature("bundle is not signed; sign it with a trusted key (habanero-pack signs "
                           "every bundle it builds)", code="unsigned")
    count, pos, sigs = block[0], 1, []
    if count > _MAX_SIGNATURES:
        raise BadSignature(f"bundle claims {count} signatures; at most {_MAX_SIGNATURES} are allowed")
    for _ in range(count):
        if pos >= len(block):
            raise BadSignature("signature block is truncated")
        kid_len = block[pos]
        kid_raw = block[pos + 1 : pos + 1 + kid_len]
        sig = block[pos + 1 + kid_len : pos + 1 + kid_len + _SIG_LEN]
        if len(kid_raw) != kid_len or len(sig) != _SIG_LEN:
            raise BadSignature("signature block is truncated")
        try:
            kid = kid_raw.decode("ascii")
        except UnicodeDecodeError:
            raise BadSignature("signature block names a key id that is not ASCII") from None
        sigs.append((kid, sig))
        pos += 1 + kid_len + _SIG_LEN
    if pos != len(block):
        raise BadSignature("signature block has trailing bytes")
    return tuple(sigs)


def _verify(parts: _Parts, trusted: TrustedKeys, digest: bytes | None = None) -> tuple[str, ...]:
    """Return the ids of trusted keys whose signature holds; refuse otherwise."""
    return verify_block(parts.signatures, signed_message(parts.format, parts.manifest_bytes, digest), trusted)


def verify_block(signatures: Sequence[tuple[str, bytes]], message: bytes, trusted: TrustedKeys) -> tuple[str, ...]:
    known = [(kid, sig) for kid, sig in signatures if kid in trusted]
    if not known:
        kids = ", ".join(kid for kid, _ in signatures)
        raise UntrustedKey(
            f"key {kids} is not trusted by this server; add its public key line (the signing key's "
            f".pub file) to {trusted.source}, then restart the app",
            key_ids=[kid for kid, _ in signatures],
        )
    # A signature under a trusted key id that does not hold is tampering: refuse at the first,
    # so a forged request costs one check, not one per signature it lists.
    for kid, sig in known:
        if not trusted.get(kid).verify(sig, message):  # type: ignore[union-attr]
            raise BadSignature(
                f"the signature by {kid} does not match the bundle's contents: the bundle was "
                "altered after signing, or signed by another key with the same id; rebuild and push again",
                key_ids=[k for k, _ in known],
            )
    return tuple(kid for kid, _ in known)


def open_bundle(
    data: bytes,
    trusted: TrustedKeys,
    *,
    app_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    content: ContentLookup | None = None,
    base_manifest: Callable[[str], bytes | None] | None = None,
    base: Bundle | None = None,
) -> Bundle:
    """Verify and open a bundle, or raise the :class:`BundleRejected` that says why not.

    A delta bundle (codec ``zstd-delta``) takes the entries it does not carry from ``content``, a
    lookup by sha256 into what the server already holds; a packed one (the transport form, see
    ``overlay._delta``) needs ``base_manifest``, a lookup of the parent's manifest by digest. What
    is missing raises ``ParentMissing``. ``Bundle.raw`` is always the unpacked form.

    ``base`` is a bundle this process opened earlier (the active one), so its bodies are known good.
    An entry the push does not carry takes its body from ``base`` (the same bytes object), and is
    not hashed again; nor is an entry of a full payload whose bytes equal base's same-named entry.
    Entries identical to base's skip the manifest checks they passed then (a delta's table is proven
    from base's, see ``overlay._proof``). Without ``base`` every body is hashed.

    Example::

        bundle = open_bundle(Path("v3.hbn").read_bytes(), load_trusted_keys("trusted_keys"), app_id="shop")
    """
    from . import _delta  # it builds on this module

    data = bytes(data)
    if len(data) >= _HEADER.size and data.startswith(MAGIC) and _HEADER.unpack_from(data)[2] == FLAG_PACKED:
        data = _delta.unpack(data, trusted, base_manifest, limits)
    parts = _split(data, limits)
    digest = hashlib.sha256(parts.manifest_bytes).digest()  # the bundle's name, and format 2 signs it
    key_ids = _verify(parts, trusted, digest)  # before the manifest is parsed or anything decompressed
    proven = (_proof.proven_table(parts.manifest_bytes, base, limits)
              if base is not None and parts.format != 1 else None)
    if proven is not None:  # the table of a delta against base, proven by the bytes (see _proof)
        manifest, table = proven.manifest, proven.table
    else:
        manifest = parse_manifest(parts.manifest_bytes)
        table = check_manifest(manifest, limits, known=base._table if base is not None else None)
        if manifest["format"] != parts.format:
            raise UnknownFormat(f"the bundle's header says format {parts.format}, its manifest "
                                f"{manifest['format']}; rebuild it with habanero-pack", code="unknown_format")
    del manifest["entries"]  # they are Bundle.entries; the dicts would only hold memory
    if app_id is not None and manifest["app_id"] != app_id:
        raise WrongApp(f"this bundle is for app {manifest['app_id']!r} but this server runs "
                       f"{app_id!r}; push to the right server or set app_id in [tool.habanero]",
                       expected=app_id, got=manifest["app_id"])
    declared = manifest["payload"]
    if declared["codec"] == "zstd-delta":
        included = declared["included"]  # entry names in entry order: checked
        body = _decompress(parts.frame, declared, sum(table.sizes[bisect_left(table.names, n)] for n in included))
        # Proven: every entry not carried is base's own. The same names and kinds as base's: all
        # but the ``changed`` positions are.
        differ = () if proven is not None else table.changed
        bodies, unproven = _delta.assemble(table, included, body, content, manifest["parent"], base,
                                           differ=differ)
    else:
        payload = _decompress(parts.frame, declared, declared["uncompressed_size"])
        bodies = _delta.split_payload(table, payload)
        unproven = _delta.unlike(table, bodies, base) if base is not None else table.rows
    _check_hashes(unproven, bodies)
    entries = dict(zip(table.names, table.rows))
    bundle = Bundle(manifest, parts.manifest_bytes, data, key_ids, entries, bodies)
    bundle.__dict__["digest"] = digest.hex()  # cached properties, already at hand
    bundle.__dict__["_table"] = table._replace(changed=None)
    if proven is not None:
        bundle.__dict__["_spans"] = proven.spans
        bundle.__dict__["changed_from"] = (base.digest, proven.added, proven.changed)  # type: ignore[union-attr]
    elif base is not None and table.changed is not None:  # the same names and kinds as base's
        bundle.__dict__["changed_from"] = (base.digest, (), tuple(table.names[i] for i in table.changed))
    return bundle


def _check_hashes(entries: Iterable[Entry], bodies: Mapping[str, bytes]) -> None:
    """Refuse the first of ``entries`` whose body does not have its size and sha256."""
    for entry in entries:
        body = bodies[entry.name]
        if len(body) != entry.size:  # a body of the right hash for a size the manifest misstates
            raise CorruptPayload(f"entry {entry.name!r} does not match its size in the manifest",
                                 code="entry_hash_mismatch", name=entry.name)
        if hashlib.sha256(body).hexdigest() != entry.sha256:
            raise CorruptPayload(f"entry {entry.name!r} does not match its hash in the manifest",
                                 code="entry_hash_mismatch", name=entry.name)


def bundle_digest(data: bytes) -> str:
    """The digest (sha256 of the manifest bytes) of a bundle, without verifying anything."""
    return hashlib.sha256(manifest_bytes_of(data)).hexdigest()


def manifest_bytes_of(data: bytes) -> bytes:
    """The manifest section of a bundle, cut by its header; for the builder's own bytes."""
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise UnknownFormat("this is not a habanero bundle (bad magic)")
    manifest_len = _HEADER.unpack_from(data)[3]
    return data[_HEADER.size : _HEADER.size + manifest_len]


def read_unverified(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The manifest and signing key ids, *without* checking signatures: for ``inspect`` only."""
    parts = _split(bytes(data), limits)
    manifest = parse_manifest(parts.manifest_bytes)
    check_manifest(manifest, limits)
    return manifest, tuple(kid for kid, _ in parts.signatures)


def _decompress(frame: bytes, declared: Mapping[str, Any], want: int) -> bytes:
    if len(frame) != declared["size"]:
        if len(frame) < declared["size"]:
            raise CorruptPayload(f"payload is truncated: {len(frame)} of {declared['size']} bytes",
                                 code="truncated")
        raise CorruptPayload(f"{len(frame) - declared['size']} unexpected bytes after the payload",
                             code="trailing_data")
    if hashlib.sha256(frame).hexdigest() != declared["sha256"]:
        raise CorruptPayload("payload does not match its sha256 in the manifest",
                             code="payload_hash_mismatch")
    try:
        content_size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"payload is not a zstd frame ({exc})", code="bad_payload") from None
    # decompress() would allocate whatever the frame header declares: check it against the cap first.
    if content_size != want:
        raise CorruptPayload(f"payload frame declares {content_size} bytes, the manifest {want}",
                             code="bad_payload")
    try:
        dctx = _idle_decompressors.pop()
    except IndexError:
        dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    dobj = dctx.decompressobj()
    out, total, pos = [], 0, 0
    try:
        # Small input steps bound how much one step can produce, so a bomb is caught early.
        while pos < len(frame) and not dobj.eof:
            chunk = dobj.decompress(frame[pos : pos + _DECOMPRESS_STEP])
            pos += _DECOMPRESS_STEP
            total += len(chunk)
            if total > want:
                raise TooLarge(f"payload decompresses past its declared {want} bytes",
                               code="decompressed_too_large")
            out.append(chunk)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"payload does not decompress ({exc})", code="bad_payload") from None
    if dobj.unused_data or pos < len(frame):
        raise CorruptPayload("unexpected bytes after the payload's zstd frame", code="trailing_data")
    # The stream decoder does not report a truncated frame by itself: eof and the size must agree.
    if not dobj.eof or total != want:
        raise CorruptPayload(f"payload is truncated: decompressed {total} of {want} bytes",
                             code="truncated")
    if len(_idle_decompressors) < 2:
        _idle_decompressors.append(dctx)  # only after a clean frame: a failed one is dropped
    return b"".join(out)
