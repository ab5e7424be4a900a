"""The packed transport form of a bundle: its manifest compressed against the parent's.

A delta bundle's payload already carries only the entries the server lacks, but its manifest lists
every entry (about 160 bytes each), so for a large project the manifest dominates a one-line push.
On the wire the manifest is therefore sent as a zstd frame that uses the parent's manifest (which
the server holds) as a raw-content dictionary: a few hundred bytes instead of 160 KB.

Nothing is decompressed before a signature holds: the packed form carries its own signature block
(same keys, its own domain) over everything after it, checked before the manifest is inflated. The
server then rebuilds the exact signed bundle (``unpack``) and verifies it as usual; the store keeps
that unpacked form, so nothing stored depends on a chain of manifests.

Packed layout::

    header (flags = 1; manifest_len = packed length) | base digest (32 bytes) |
    transport_sig_len u32 | transport signature block |
    packed manifest | bundle signature block | payload
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import zstandard

from .bundle import (
    _HEADER,
    FLAG_PACKED,
    FORMAT,
    MAGIC,
    Base,
    Limits,
    manifest_bytes_of,
    parse_sigblock,
    sign_block,
    verify_block,
)
from .errors import CorruptPayload, ParentMissing, TooLarge, UnknownFormat
from .keys import SigningKey, TrustedKeys

TRANSPORT_DOMAIN = b"habanero-transport-v1\x00"
_LEN = struct.Struct(">I")


def pack(bundle: bytes, base: Base, signers: Sequence[SigningKey], *, level: int = 3) -> bytes:
    """The transport form of ``bundle`` (an unpacked one this side built) for a server holding ``base``."""
    _, _, _, manifest_len, sig_len = _HEADER.unpack_from(bundle)
    manifest = manifest_bytes_of(bundle)
    rest = bundle[_HEADER.size + manifest_len :]
    dictionary = zstandard.ZstdCompressionDict(base.manifest_bytes, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    packed = zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_content_size=True).compress(manifest)
    base_raw = bytes.fromhex(base.digest)
    body = packed + rest
    signatures = sign_block(TRANSPORT_DOMAIN + base_raw + body, signers)
    header = _HEADER.pack(MAGIC, FORMAT, FLAG_PACKED, len(packed), sig_len)
    return header + base_raw + _LEN.pack(len(signatures)) + signatures + body


def unpack(data: bytes, trusted: TrustedKeys, base_manifest: Callable[[str], bytes | None] | None,
           limits: Limits) -> bytes:
    """Check the transport signature, inflate the manifest against the base, return the bundle."""
    if len(data) > limits.max_bundle_bytes:
        raise TooLarge(f"bundle is {len(data)} bytes, over the {limits.max_bundle_bytes} byte limit",
                       code="bundle_too_large")
    _, fmt, _, packed_len, sig_len = _HEADER.unpack_from(data)
    if fmt != FORMAT:
        raise UnknownFormat(f"bundle format {fmt} is not supported (this habanero reads {FORMAT})")
    pos = _HEADER.size
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
    manifest = _inflate(body[:packed_len], dictionary, limits.max_manifest_bytes)
    rest = body[packed_len:]
    return _HEADER.pack(MAGIC, FORMAT, 0, len(manifest), sig_len) + manifest + rest


def _inflate(frame: bytes, dictionary: bytes, cap: int) -> bytes:
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"packed manifest is not a zstd frame ({exc})", code="bad_payload") from None
    if size < 0 or size > cap:
        raise TooLarge(f"packed manifest declares {size} bytes (limit {cap})", code="manifest_too_large")
    dctx = zstandard.ZstdDecompressor(
        dict_data=zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
        max_window_size=1 << 25)
    try:
        out = dctx.decompress(frame, max_output_size=cap)  # the declared size was checked above
    except zstandard.ZstdError as exc:
        raise CorruptPayload(f"packed manifest does not decompress ({exc})", code="bad_payload") from None
    if len(out) != size:
        raise CorruptPayload("packed manifest is truncated", code="truncated")
    return out
