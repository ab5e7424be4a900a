"""The bundle file's frame: header, signature blocks and what they sign.

Layout (all integers big-endian; see docs/bundle-format.md)::

    magic "HABANERO" | format u16 | flags u16 | manifest_len u32 | sigblock_len u32
    manifest (canonical JSON) | signature block | payload (one zstd frame)

Cutting a file into these sections checks lengths only: nothing is interpreted before a signature
holds (see ``overlay.bundle.open_bundle``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from overlay.errors import BadSignature, CorruptPayload, TooLarge, UnknownFormat, UntrustedKey
from overlay.format.limits import Limits
from overlay.format.manifest import FORMAT, READABLE
from overlay.keys import SigningKey, TrustedKeys

__all__ = ["FLAG_PACKED", "HEADER", "MAGIC", "SIGNATURE_DOMAIN", "Parts", "claimed_key_ids", "manifest_bytes_of",
           "parse_sigblock", "sign_block", "sign_bundle", "signed_message", "split", "verify_block"]

MAGIC = b"HABANERO"
SIGNATURE_DOMAIN = b"habanero-bundle-v2\x00"  # + sha256(manifest): signing cost flat in project size
_SIGNATURE_DOMAIN_V1 = b"habanero-bundle-v1\x00"  # + the manifest itself: format 1, still read
FLAG_PACKED = 1  # transport form: manifest compressed against the parent's (see overlay.format.delta)
HEADER = struct.Struct(">8sHHII")
_SIG_LEN = 64
_MAX_SIGNATURES = 8


def sign_bundle(manifest_bytes: bytes, frame: bytes, signers: Sequence[SigningKey], limits: Limits,
                  digest: bytes | None = None) -> bytes:
    """Header, manifest, signatures and payload frame: a bundle, or ``TooLarge`` if a server would
    refuse its size (never write what a server would refuse). ``digest``: the manifest's sha256, if
    the caller has it already."""
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise TooLarge(f"manifest is {len(manifest_bytes)} bytes, over the {limits.max_manifest_bytes} "
                       "byte limit", code="manifest_too_large")
    sigblock = sign_block(signed_message(FORMAT, manifest_bytes, digest), signers)
    data = HEADER.pack(MAGIC, FORMAT, 0, len(manifest_bytes), len(sigblock)) + manifest_bytes + sigblock + frame
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
class Parts:
    format: int
    manifest_bytes: bytes
    signatures: tuple[tuple[str, bytes], ...]
    frame: bytes


def split(data: bytes, limits: Limits) -> Parts:
    """Cut the file into its sections, checking only lengths: nothing is interpreted yet."""
    if len(data) > limits.max_bundle_bytes:
        raise TooLarge(f"bundle is {len(data)} bytes, over the {limits.max_bundle_bytes} byte limit",
                       code="bundle_too_large")
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        raise UnknownFormat("this is not a habanero bundle (bad magic); build one with "
                            "`habanero-pack build`", code="unknown_format")
    _, fmt, flags, manifest_len, sig_len = HEADER.unpack_from(data)
    if fmt not in READABLE or flags != 0:
        raise UnknownFormat(f"bundle format {fmt} (flags {flags}) is not supported by this habanero, "
                            f"which reads formats {', '.join(map(str, READABLE))}; upgrade habanero on "
                            "the server or build with a matching habanero-pack", code="unknown_format")
    if manifest_len > limits.max_manifest_bytes:
        raise TooLarge(f"manifest declares {manifest_len} bytes, over the {limits.max_manifest_bytes} "
                       "byte limit", code="manifest_too_large")
    start = HEADER.size
    if start + manifest_len + sig_len > len(data):
        raise CorruptPayload("bundle is truncated: its header declares more bytes than it holds",
                             code="truncated")
    manifest_bytes = data[start : start + manifest_len]
    sigblock = data[start + manifest_len : start + manifest_len + sig_len]
    return Parts(fmt, manifest_bytes, parse_sigblock(sigblock), data[start + manifest_len + sig_len :])


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
        # A key id is printable ASCII ("SHA256:..."): anything else is refused before it can reach a
        # message, a log or a terminal.
        if not all(0x21 <= b <= 0x7E for b in kid_raw):
            raise BadSignature("signature block names a key id that is not printable ASCII")
        kid = kid_raw.decode("ascii")
        sigs.append((kid, sig))
        pos += 1 + kid_len + _SIG_LEN
    if pos != len(block):
        raise BadSignature("signature block has trailing bytes")
    return tuple(sigs)


def verify(parts: Parts, trusted: TrustedKeys, digest: bytes | None = None) -> tuple[str, ...]:
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
        if not trusted.get(kid).verify(sig, message):  # type: ignore[union-attr]  # known: trusted ids only
            raise BadSignature(
                f"the signature by {kid} does not match the bundle's contents: the bundle was "
                "altered after signing, or signed by another key with the same id; rebuild and push again",
                key_ids=[k for k, _ in known],
            )
    return tuple(kid for kid, _ in known)




def manifest_bytes_of(data: bytes) -> bytes:
    """The manifest section of a bundle, cut by its header; for the builder's own bytes."""
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        raise UnknownFormat("this is not a habanero bundle (bad magic)")
    manifest_len = HEADER.unpack_from(data)[3]
    return data[HEADER.size : HEADER.size + manifest_len]


def claimed_key_ids(data: bytes) -> tuple[str, ...]:
    """The key ids a bundle (or its transport form) says it is signed by, unverified: what a push
    names in its ``X-Habanero-Key`` header so that a server can refuse an unknown key before it reads
    the body. Empty for bytes that are not a signed bundle."""
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        return ()
    _, _, flags, manifest_len, sig_len = HEADER.unpack_from(data)
    if flags == FLAG_PACKED:  # base digest, then the transport signature block's length and itself
        start = HEADER.size + 32 + 4
        if len(data) < start:
            return ()
        sig_len = int.from_bytes(data[start - 4 : start], "big")
    else:
        start = HEADER.size + manifest_len
    try:
        return tuple(kid for kid, _ in parse_sigblock(data[start : start + sig_len]))
    except BadSignature:
        return ()
