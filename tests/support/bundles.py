"""A base bundle and the pushes opened against it, for the format and the transaction's diff tests.

``FILES`` is version 1 of a small app (``base``); each of ``PUSHES`` is a version 2 that changes it
in one way. The helpers build what a packer or a forger would send: a delta against base, a bundle
around a hand-made entry table, a manifest wrapped and signed as given.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable

import zstandard

from overlay.bundle import FORMAT, Bundle, ParentManifest, build_bundle, open_bundle
from overlay.format.wire import MAGIC, signed_message
from overlay.keys import SigningKey, TrustedKeys

FILES = {
    "app": ("package", b"from . import a\n"),
    "app.a": ("module", b"A = 1\n" * 20),
    "app.b": ("module", b"B = 2\n" * 30),
    "app.copy": ("module", b"B = 2\n" * 30),  # the same body as app.b
    "app.sub": ("package", b""),
    "app.sub.c": ("module", b"C = 3\n" * 40),
    "app/data/x.txt": ("data", b"hello\n"),
}

PUSHES = {
    "one line": {**FILES, "app.a": ("module", b"A = 1\n" * 19 + b"A = 99\n")},
    "a file added": {**FILES, "app.new": ("module", b"NEW = 1\n")},
    "a file removed": {k: v for k, v in FILES.items() if k != "app.b"},
    "a file renamed": {**{k: v for k, v in FILES.items() if k != "app.sub.c"}, "app.sub.d": FILES["app.sub.c"]},
    "a body that shrinks": {**FILES, "app": ("package", b"")},
    "everything": {name: (kind, body + b"# v2\n") for name, (kind, body) in FILES.items()},
    "nothing": FILES,
}


def open_base(key: SigningKey, trusted: TrustedKeys) -> Bundle:
    """Version 1, ``FILES``, signed by ``key`` and opened: the active bundle pushes are opened against."""
    return open_bundle(build_bundle(FILES, app_id="app", version=1, signers=[key]), trusted)


def delta_push(files, base: Bundle, key, **kw) -> bytes:
    return build_bundle(files, app_id="app", version=2, signers=[key], base=ParentManifest.from_manifest(base.manifest_bytes),
                        **kw)


def held(bundle: Bundle, **lies: bytes) -> Callable[[str], bytes | None]:
    """The store's lookup by hash, as the server has it; ``lies`` maps a hash to other bytes."""
    by_hash = {e.sha256: bundle.read(n) for n, e in bundle.entries.items()}
    return lambda sha: lies.get(sha, by_hash.get(sha))


def same(a: Bundle, b: Bundle) -> None:
    assert a.bodies == b.bodies and a.entries == b.entries and a.raw == b.raw
    assert {n: a.read(n) for n in a.entries} == {n: b.read(n) for n in b.entries}


def sha256_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def signed_bundle(key, rows, *, parent: str | None, included: list[str] | None = None, **entry_over) -> bytes:
    """A bundle signed by ``key`` around an entry table built from ``(name, kind, body)`` rows, as
    given (any order, any name); ``entry_over`` replaces fields of the named entries."""
    entries, offset, bodies = [], 0, {}
    for name, kind, body in rows:
        entries.append({"name": name, "kind": kind, "size": len(body), "sha256": sha256_of(body)})
        entries[-1].update(entry_over.get(name, {}))
        offset += len(body)
        bodies[name] = body
    carried = [n for n, _, _ in rows] if included is None else included
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"".join(bodies[n] for n in carried))
    payload = {"codec": "zstd", "size": len(frame), "uncompressed_size": offset, "sha256": sha256_of(frame)}
    if included is not None:
        payload.update(codec="zstd-delta", included=included)
    manifest = {"format": FORMAT, "app_id": "app", "version": 2, "parent": parent, "created": "2026-01-01T00:00:00Z",
                "builder": {}, "payload": payload, "entries": entries}
    return wrap(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), key, frame)


def wrap(manifest: bytes, key, frame: bytes) -> bytes:
    """``manifest`` as given, signed by ``key``, with the payload ``frame``: a bundle's bytes."""
    kid = key.key_id.encode()
    sig = bytes([1, len(kid)]) + kid + key.sign(signed_message(FORMAT, manifest))
    return struct.pack(">8sHHII", MAGIC, FORMAT, 0, len(manifest), len(sig)) + manifest + sig + frame


def rows_of(files) -> list[tuple[str, str, bytes]]:
    return [(name, kind, body) for name, (kind, body) in sorted(files.items())]
