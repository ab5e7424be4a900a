"""Messages between the processes of one store: framed JSON over a Unix socket, with a payload.

    length of the header, u32 big-endian | header (JSON object) | payload (header["size"] bytes)

A connection is one conversation (a push: prepare, apply, commit or revert; or one status
question); either side closing it mid-way is a meaning of its own (the other process is gone). Only
processes of this user may connect: the peer's uid is checked with ``SO_PEERCRED`` on every
accepted connection, as the registry's directories are checked on disk. Nothing a message says is
trusted beyond that: a bundle in a prepare is verified by the receiving process against its own
trusted keys, as if it had come over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

from overlay.format.limits import DEFAULT_LIMITS

__all__ = ["Gone", "Message", "connect", "peer_uid", "receive", "send"]

_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = DEFAULT_LIMITS.max_bundle_bytes  # a bundle's own cap

Message = tuple[dict[str, Any], bytes]


class Gone(Exception):
    """The other process closed the connection, did not answer in time, or spoke nonsense."""


def connect(path: str | os.PathLike[str], timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        uid = peer_uid(sock)
    except OSError as exc:
        sock.close()
        raise Gone(f"cannot be reached ({exc.strerror or exc})") from None
    if uid not in (os.getuid(), 0):  # the bundle goes only to this user's processes
        sock.close()
        raise Gone(f"is served by uid {uid}, not by this user")
    return sock


def send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    data = json.dumps({**header, "size": len(payload)}, separators=(",", ":")).encode()
    try:
        sock.sendall(_LEN.pack(len(data)) + data + payload)
    except OSError as exc:
        raise Gone(f"went away ({exc.strerror or exc})") from None


def receive(sock: socket.socket, deadline: float) -> Message:
    """The next message, by ``deadline`` (a ``time.monotonic()`` value)."""
    (length,) = _LEN.unpack(_exactly(sock, _LEN.size, deadline))
    if length > MAX_HEADER:
        raise Gone("sent a message header over 1 MiB")
    try:
        header = json.loads(_exactly(sock, length, deadline))
    except ValueError:
        raise Gone("sent a message that is not JSON") from None
    size = header.get("size") if isinstance(header, dict) else None
    if type(size) is not int or not 0 <= size <= MAX_PAYLOAD:
        raise Gone("sent a message without a valid payload size")
    return header, _exactly(sock, size, deadline) if size else b""


def _exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Gone("did not answer in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            raise Gone("did not answer in time") from None
        except OSError as exc:
            raise Gone(f"went away ({exc.strerror or exc})") from None
        if not chunk:
            raise Gone("closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])
