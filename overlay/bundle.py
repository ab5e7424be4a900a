"""The signed bundle: one self-contained file per version of an app's source.

This is the bundle format's public face, the one module both sides share: the packer writes
bundles with :func:`build_bundle` (or, piece by piece, with the writing functions below), the app
reads them with :func:`open_bundle`. Its parts live in ``overlay.format``: the file's frame and
signatures (``wire``), the manifest's schema and canonical text (``manifest``, ``names``), the
bounded payload (``payload``), delta pushes and their transport form (``delta``, ``proof``).

Reading is pure (bytes in, a verified :class:`Bundle` or a precise :class:`BundleRejected` out) and
follows *verify before parse*: the Ed25519 signature over the manifest's sha256 (format 1: over the
exact manifest bytes) is checked against the locally trusted keys before the manifest is parsed,
before anything is decompressed. Only then: app id, declared sizes against :class:`Limits`, the
payload hash, a bounded decompression, and every entry's size and hash.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import zstandard

from overlay.errors import BadSignature, CorruptPayload, UnknownFormat, WrongApp, unverified
from overlay.format import delta, proof
from overlay.format.limits import DEFAULT_LIMITS, Limits
from overlay.format.manifest import (
    CODECS,
    ENTRY_JSON,
    FORMAT,
    Entry,
    canonical_manifest,
    check_manifest,
    parse_manifest,
)
from overlay.format.model import Bundle, ContentLookup, ParentManifest
from overlay.format.names import APP_ID_RULE, FORBIDDEN_SUFFIXES, RESERVED_NAMES, check_entry_name, valid_app_id
from overlay.format.payload import decompress
from overlay.format.wire import (
    FLAG_PACKED,
    HEADER,
    MAGIC,
    claimed_key_ids,
    manifest_bytes_of,
    sign_bundle,
    split,
    verify,
)
from overlay.keys import SigningKey, TrustedKeys

__all__ = [
    # reading
    "Bundle", "Entry", "Limits", "DEFAULT_LIMITS", "open_bundle", "read_unverified", "bundle_digest",
    "claimed_key_ids", "manifest_bytes_of",
    # writing
    "FORMAT", "CODECS", "APP_ID_RULE", "FORBIDDEN_SUFFIXES", "RESERVED_NAMES", "ParentManifest", "build_bundle",
    "valid_app_id",
    "check_entry_name", "check_new_manifest", "entry_json", "manifest_compressor", "pack", "sign_bundle",
    "write_manifest",
]

#: A format 2 entry's canonical JSON, given kind, name, sha256 and size: one entry's text in
#: :func:`write_manifest`. Exact for valid entries (their names and kinds need no JSON escape).
entry_json = ENTRY_JSON
#: Compress manifests against a :class:`ParentManifest` (for :func:`pack`); keep it across pushes.
manifest_compressor = delta.manifest_compressor
#: The transport form of a bundle this side built, for a server running ``base``.
pack = delta.pack


def write_manifest(top: Mapping[str, Any], entry_texts: Iterable[str]) -> bytes:
    """The canonical manifest: fields ``top`` (all but ``entries``) with entries of these
    :func:`entry_json` texts, sorted keys, no spaces, ASCII. The one writer of every manifest."""
    return canonical_manifest(top, entry_texts)


def check_new_manifest(manifest: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a manifest a server would refuse, before it is signed: never write what cannot be read."""
    check_manifest(manifest, limits, own=True)


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
    base: ParentManifest | None = None,
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
    entries: list[dict[str, Any]] = []  # the manifest's JSON
    chunks: list[bytes] = []
    for name, kind, content in items:
        entries.append({"name": name, "kind": kind, "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest()})
        chunks.append(content)
    total = sum(map(len, chunks))
    included: list[str] = []
    if base is not None:
        parent = base.digest
        included = [e["name"] for e in entries if e["sha256"] not in base.hashes]
        carried = set(included)
        chunks = [content for (name, _, content) in items if name in carried]
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(b"".join(chunks))
    payload: dict[str, Any] = {"codec": "zstd", "size": len(frame), "uncompressed_size": total,
                               "sha256": hashlib.sha256(frame).hexdigest()}
    if base is not None:
        payload.update(codec="zstd-delta", included=included)
    manifest = {
        "format": FORMAT,
        "app_id": app_id,
        "version": version,
        "parent": parent,
        "created": created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "builder": dict(builder or {}),
        "payload": payload,
        "entries": entries,
    }
    check_new_manifest(manifest, limits)
    texts = [entry_json(e["kind"], e["name"], e["sha256"], e["size"]) for e in entries]
    data = sign_bundle(write_manifest(manifest, texts), frame, signers, limits)
    if manifest_out is not None:
        manifest_out.update(manifest)
    return data


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
    ``overlay.format.delta``) needs ``base_manifest``, a lookup of the parent's manifest by digest.
    What is missing raises ``ParentMissing``. ``Bundle.raw`` is always the unpacked form.

    ``base`` is a bundle this process opened earlier (the active one), so its bodies are known good.
    An entry the push does not carry takes its body from ``base`` (the same bytes object), and is
    not hashed again; nor is an entry of a full payload whose bytes equal base's same-named entry.
    Entries identical to base's skip the manifest checks they passed then (a delta's table is proven
    from base's, see ``overlay.format.proof``). Without ``base`` every body is hashed.

    Example::

        bundle = open_bundle(Path("v3.hbn").read_bytes(), load_trusted_keys("trusted_keys"), app_id="shop")
    """
    data = bytes(data)
    if len(data) >= HEADER.size and data.startswith(MAGIC) and HEADER.unpack_from(data)[2] == FLAG_PACKED:
        data = delta.unpack(data, trusted, base_manifest, limits)
    with unverified():  # a refusal up to here is of bytes no trusted key signed: counted, not recorded
        parts = split(data, limits)
        digest = hashlib.sha256(parts.manifest_bytes).digest()  # the bundle's name, and format 2 signs it
        key_ids = verify(parts, trusted, digest)  # before the manifest is parsed or anything decompressed
    proven = None
    if base is not None and parts.format != 1:
        proven = proof.proven_table(parts.manifest_bytes, base.manifest_bytes, base.table, base.spans, limits)
    if proven is not None:  # the table of a delta against base, proven by the bytes (see proof)
        manifest, table = proven.manifest, proven.table
    else:
        manifest = parse_manifest(parts.manifest_bytes)
        table = check_manifest(manifest, limits, known=base.table if base is not None else None)
        if manifest["format"] != parts.format:
            raise UnknownFormat(f"the bundle's header says format {parts.format}, its manifest "
                                f"{manifest['format']}; rebuild it with habanero-pack", code="unknown_format")
    del manifest["entries"]  # they are Bundle.entries; the dicts would only hold memory
    if app_id is not None and manifest["app_id"] != app_id:
        raise WrongApp(f"the signer's app id {manifest['app_id']!r} differs from the app's, {app_id!r}: this "
                       f"bundle was built for another app; push to the right app, or build with app id "
                       f"{app_id!r} (--app-id, HABANERO_APP_ID or app_id in [tool.habanero])",
                       expected=app_id, got=manifest["app_id"])
    declared = manifest["payload"]
    if declared["codec"] == "zstd-delta":
        included = declared["included"]  # entry names in entry order: checked
        body = decompress(parts.frame, declared, sum(table.sizes[bisect_left(table.names, n)] for n in included))
        # Proven: every entry not carried is base's own. The same names and kinds as base's: all
        # but the ``changed`` positions are.
        differ = () if proven is not None else table.changed
        bodies, unproven = delta.assemble(table, included, body, content, manifest["parent"], base,
                                          differ=differ)
    else:
        payload = decompress(parts.frame, declared, declared["uncompressed_size"])
        bodies = delta.split_payload(table, payload)
        unproven = delta.unlike(table, bodies, base) if base is not None else table.rows
    _check_hashes(unproven, bodies)
    changed_from = None
    if proven is not None and base is not None:
        changed_from = (base.digest, proven.added, proven.changed)
    elif base is not None and table.changed is not None:  # the same names and kinds as base's
        changed_from = (base.digest, (), tuple(table.names[i] for i in table.changed))
    entries = dict(zip(table.names, table.rows))
    reader = base.bodies.reader if base is not None else None  # for what base let go of
    bundle = Bundle(manifest, parts.manifest_bytes, data, key_ids, entries, bodies, reader=reader,
                    digest=digest.hex(), table=table._replace(changed=None), changed_from=changed_from)
    if proven is not None:
        bundle.spans = proven.spans  # the proof located them already
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


def read_unverified(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The manifest and signing key ids, *without* checking signatures: for ``inspect`` only."""
    parts = split(bytes(data), limits)
    manifest = parse_manifest(parts.manifest_bytes)
    check_manifest(manifest, limits)
    return manifest, tuple(kid for kid, _ in parts.signatures)

