"""A deploy channel through Redis: its addresses, its keys, and its signed messages.

A fleet (the processes of an app on many machines) can take deploys through Redis instead of an
inbound port: each process subscribes (``overlay.install(channel="redis://...")``, served by
``overlay.serving.channel``) and ``habanero-pack push redis://...`` publishes (``packer.channel``).
This module is what both sides share; it imports no Redis client.

Redis is untrusted. Everything a process acts on through it is signed by a deploy key and verified
by that process with its own trusted keys: bundles carry their own signatures; every other message
(prepare, apply, commit, abort, revert, status, history, the fleet's active record) is signed like a
control request (``overlay.control``), over the domain prefix, the method ``CHANNEL``, the path
``/_habanero/channel/<op>``, the app id, a timestamp, a nonce and the body's sha256. So a message
can never verify as an HTTP request or a bundle, nor as another operation, another app's or
another body; the receiving process takes it within the control window, once (its store keeps the
nonces). Whoever controls Redis can drop, delay or reorder messages (a deploy fails or waits), and
can read them (use ``rediss://`` across machines); it cannot make a process run anything a trusted
key did not sign, nor take one back to an older version.

Keys, all under ``habanero:<app id>:``::

    steps            stream: the signed messages of every deploy, status and history question (a
                     push's bundle rides in its prepare's entry, beside the signed message, when it
                     is small; the message names it by sha256)
    acks:<txn>       stream: the answers of each store's member to one deploy or question
    bundle:<sha256>  the wire bytes of a push too large to ride in its prepare
    full:<digest>    a whole stored bundle, put there by a member for one that catches up
    wants            stream: "I need bundle <digest>" (unsigned: answering costs one upload)
    active           the signed record of the fleet's last committed deploy (what late members run)
    members          set of member ids; member:<id> is each one's description (for ``status``),
                     alive:<id> its heartbeat, expiring: ``store_id host pid``, what a push needs
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from overlay.control import H_APP, H_KEY, H_NONCE, H_SIG, H_TIME, PREFIX, control_message, sign_request
from overlay.errors import ConfigError, ControlRejected, printable
from overlay.keys import SigningKey, TrustedKeys

#: A ``redis.asyncio.Redis`` client (typed loosely: its answers' types depend on its options).
Redis = Any

__all__ = ["INLINE_MAX", "METHOD", "SCHEMES", "WORDS", "ChannelURL", "Keys", "connect", "heartbeat", "is_channel_url",
           "new_txn", "open_message", "parse_url", "path_of", "read_heartbeat", "seal", "verify_record"]

#: The method a channel message is signed under: never one an HTTP request can have.
METHOD = "CHANNEL"
SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
#: The largest signed message: a prepare names its payload by sha256, it does not carry it.
MAX_MESSAGE = 64 << 10
#: The words of a deploy after its prepare: a store's deploy thread reads them itself.
WORDS = ("apply", "commit", "abort", "revert")
#: The largest bundle that rides in its prepare's stream entry (a larger one is uploaded beside it).
INLINE_MAX = 32 << 10
#: Seconds a member's heartbeat lives unless renewed (renewed every ``HEARTBEAT`` seconds).
HEARTBEAT, HEARTBEAT_TTL = 1.0, 3.5


def is_channel_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0].lower() in SCHEMES  # type: ignore[union-attr]


@dataclass(frozen=True)
class ChannelURL:
    """A parsed channel address. ``hosts`` has one ``(host, port)`` for a Redis server, or the
    Sentinels to ask (``redis+sentinel://h1:26379,h2:26379/mymaster/0``) for the master ``service``."""

    url: str
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    db: int
    service: str | None
    username: str | None
    password: str | None

    def __str__(self) -> str:
        """The address without its password, for messages and logs."""
        scheme = self.url.split("://", 1)[0].lower()
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{hosts}/{self.service + '/' if self.service else ''}{self.db}"


def parse_url(url: str) -> ChannelURL:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://`` for TLS, or
    ``redis+sentinel://host:port[,host:port...]/service[/db]``; a ConfigError names what is wrong."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f"channel {printable(text, 200)!r} is not a Redis URL: use redis://host:6379/0, "
                          "rediss://host:6380/0 (TLS) or redis+sentinel://host:26379/mymaster/0",
                          code="bad_config")
    creds, at, hostpart = rest.rpartition("@")
    hostlist, _, path = hostpart.partition("/")
    sentinel = scheme.endswith("+sentinel")
    hosts = []
    for item in hostlist.split(","):
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port or (26379 if sentinel else 6379)
        except ValueError:
            host = None
        if not host:
            raise ConfigError(f"channel {printable(text, 200)!r} has no valid host:port in {item!r}", code="bad_config")
        hosts.append((host, port))
    segments = [s for s in path.split("/") if s]
    service = segments.pop(0) if sentinel and segments else None
    if sentinel and service is None:
        raise ConfigError(f"channel {printable(text, 200)!r} names no Sentinel service: "
                          "redis+sentinel://host:26379/mymaster/0", code="bad_config")
    if len(hosts) > 1 and not sentinel:
        raise ConfigError(f"channel {printable(text, 200)!r} names several hosts; that is for "
                          "redis+sentinel:// (or give your managed Redis's one endpoint)", code="bad_config")
    try:
        db = int(segments[0]) if segments else 0
        if db < 0 or len(segments) > 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"channel {printable(text, 200)!r}: the path must be a database number (/0)",
                          code="bad_config") from None
    user, _, password = creds.partition(":") if at else ("", "", "")
    return ChannelURL(text, scheme.startswith("rediss"), tuple(hosts), db, service,
                      unquote(user) or None, unquote(password) or None)


def connect(url: ChannelURL, *, blocking: bool = False) -> Redis:
    """An asyncio Redis client for ``url`` (Sentinel's master for ``redis+sentinel://``), or with
    ``blocking=True`` a plain one (for a deploy's own thread, which waits between its steps anyway:
    no hop through the event loop per message); the ``redis`` package is imported here, by the
    first process or command that uses a channel."""
    try:
        if blocking:
            from redis import Redis as Client
            from redis.sentinel import Sentinel
        else:
            from redis.asyncio import Redis as Client  # type: ignore[assignment]
            from redis.asyncio.sentinel import Sentinel  # type: ignore[assignment]
    except ImportError:
        raise ConfigError("channel= needs the redis client: pip install 'habanero[redis]'", code="bad_config") from None
    options: dict[str, Any] = {"username": url.username, "password": url.password, "db": url.db,
                               "socket_connect_timeout": 2.0, "socket_keepalive": True}
    if blocking:
        options["socket_timeout"] = 10.0  # a silent Redis fails the step (it waits in slices of a second)
    if url.tls:
        options["ssl"] = True
    if url.service is not None:
        sentinel = Sentinel(list(url.hosts), sentinel_kwargs={"socket_connect_timeout": 2.0, "ssl": url.tls},
                            **options)
        return sentinel.master_for(url.service)
    host, port = url.hosts[0]
    return Client(host=host, port=port, **options)


class Keys:
    """The Redis keys of one app's channel (see the module docstring)."""

    def __init__(self, app_id: str) -> None:
        self.prefix = f"habanero:{app_id}:"
        self.steps, self.wants, self.active = self.prefix + "steps", self.prefix + "wants", self.prefix + "active"
        self.members = self.prefix + "members"

    def acks(self, txn: str) -> str:
        return f"{self.prefix}acks:{txn}"

    def payload(self, sha256: str) -> str:
        return f"{self.prefix}bundle:{sha256}"

    def full(self, digest: str) -> str:
        return f"{self.prefix}full:{digest}"

    def member(self, member_id: str) -> str:
        return f"{self.prefix}member:{member_id}"

    def alive(self, member_id: str) -> str:
        return f"{self.prefix}alive:{member_id}"


def heartbeat(store_id: str, host: str, pid: int, version: int | None) -> bytes:
    """A member's heartbeat (``alive:<id>``): what a push needs to know of it, in a few bytes."""
    return f"{store_id} {host} {pid} {'-' if version is None else version}".encode()


def read_heartbeat(member_id: str, raw: bytes | None) -> dict[str, Any] | None:
    """:func:`heartbeat` read back (``id``, ``store_id``, ``host``, ``pid``, ``version``), or None
    when it expired or is not one."""
    parts = raw.decode(errors="replace").split(" ") if raw is not None else []
    if len(parts) < 4:
        return None
    store_id, *host, pid, version = parts
    return {"id": member_id, "store_id": store_id, "host": " ".join(host),
            "pid": int(pid) if pid.isdigit() else pid, "version": int(version) if version.isdigit() else None}


def path_of(op: str) -> str:
    return f"{PREFIX}/channel/{op}"


#: The signature's fields in a channel message, short (each message is read by every store): the
#: headers of a signed control request they stand for. The app id is not sent: it is signed, and
#: each process checks the signature with its own.
_SHORT = {"k": H_KEY, "t": H_TIME, "n": H_NONCE, "s": H_SIG}


def seal(key: SigningKey, app_id: str, op: str, body: Mapping[str, Any], *, now: float | None = None) -> bytes:
    """One signed channel message: ``{"op", "body", "auth"}`` as JSON bytes."""
    text = json.dumps({**body, "op": op}, separators=(",", ":"), sort_keys=True)
    headers = sign_request(key, METHOD, path_of(op), app_id, text.encode(), now=now)
    auth = {short: headers[name] for short, name in _SHORT.items()}
    return json.dumps({"op": op, "body": text, "auth": auth}, separators=(",", ":")).encode()


def open_message(raw: bytes) -> tuple[str, dict[str, Any], dict[str, str], bytes]:
    """``(op, body, auth headers, signed body bytes)`` of a message, unverified: verify the
    signature over the body bytes before acting on the body (``RequestVerifier.verify`` with
    :data:`METHOD` and :func:`path_of`, or :func:`verify_record`)."""
    if len(raw) > MAX_MESSAGE:
        raise ControlRejected("a channel message over 64 KiB", code="bad_request")
    try:
        outer = json.loads(raw)
        op, text, auth = outer["op"], outer["body"], outer["auth"]
        body = json.loads(text)
    except (ValueError, KeyError, TypeError):
        raise ControlRejected("a channel message that is not a signed habanero message", code="bad_request") from None
    if not (isinstance(op, str) and isinstance(text, str) and isinstance(auth, dict) and isinstance(body, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in auth.items())):
        raise ControlRejected("a channel message that is not a signed habanero message", code="bad_request")
    if body.get("op") != op:
        raise ControlRejected("a channel message whose body names another operation", code="bad_request")
    auth = {_SHORT.get(name, name): value for name, value in auth.items()}
    return op, body, auth, text.encode()


def verify_record(raw: bytes, trusted: TrustedKeys, app_id: str) -> dict[str, Any]:
    """The body of the fleet's ``active`` record, if a trusted key signed it for this app.

    No clock window and no nonce: the record is as old as the last deploy. What a member may do
    with it is bounded elsewhere: it only ever moves forward, to a bundle newer than any its store
    accepted, verified on its own (see ``overlay.serving.channel``)."""
    op, body, auth, text = open_message(raw)
    if op != "active" or auth.get(H_APP, app_id) != app_id:
        raise ControlRejected("the fleet's active record is not one of this app", code="bad_request")
    public = trusted.get(auth.get(H_KEY, ""))
    if public is None:
        raise ControlRejected(f"the fleet's active record is signed by key {printable(auth.get(H_KEY, ''), 64)}, "
                              "which this process does not trust", code="unknown_key")
    try:
        signature = base64.b64decode(auth.get(H_SIG, ""), validate=True)
    except (binascii.Error, ValueError):
        raise ControlRejected("malformed signature on the fleet's active record",
                              code="bad_request_signature") from None
    message = control_message(METHOD, path_of(op), app_id, auth.get(H_TIME, ""), auth.get(H_NONCE, ""), text)
    if not public.verify(signature, message):
        raise ControlRejected("the fleet's active record does not verify", code="bad_request_signature")
    return body


def new_txn() -> str:
    """A deploy's or question's id: random, so that no two fleets' answers mix."""
    return f"{int(time.time() * 1000):x}-{os.urandom(6).hex()}"
