"""A bundle's payload: one zstd frame, checked and decompressed within bounds.

``zstandard``'s one-shot ``decompress()`` trusts the frame's declared content size and its stream
reader does not report a truncated frame, so decompression here checks the declared size against
what the (signed) manifest promised before allocating, feeds the input in small steps so a bomb is
caught early, and requires the frame's end and the exact size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import zstandard

from overlay.errors import CorruptPayload, TooLarge

__all__ = ["MAX_WINDOW", "decompress"]

MAX_WINDOW = 1 << 25  # zstd window cap: bounds the decoder's memory whatever the frame asks for
_DECOMPRESS_STEP = 1024  # input fed per step; caps how far one step can overshoot the limit
# Decompressors are reused (making one allocates its buffers: a tenth of a small push's decompress
# time). Each is used by one thread at a time: list.pop and append are atomic.
_idle_decompressors: list[zstandard.ZstdDecompressor] = []


def decompress(frame: bytes, declared: Mapping[str, Any], want: int) -> bytes:
    """The payload of ``frame``: exactly ``want`` bytes, as the manifest ``declared`` it, or a refusal."""
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
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
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
