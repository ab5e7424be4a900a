"""This process as a member of its fleet: deploys through Redis, with no inbound port.

``overlay.install(channel="redis://host:6379/0")`` starts a :class:`Fleet` on a daemon thread (an
asyncio loop with the ``redis`` client's asyncio API). Every process of the app announces itself
with a heartbeat that expires (``HEARTBEAT_TTL``); one process per store, the **store's member**
(whichever holds ``channel.lock`` in the store's runtime directory: another takes over within a
heartbeat when it dies), reads the deploy stream and drives each deploy in its store through
the same transaction an HTTP push takes (``overlay.deploy``), every other process of the store
verifying and taking part over its Unix socket as usual::

    habanero-pack ── Redis ──┬── store A's member ─ deploy ─┬─ process A1 (verifies itself)
      (signs)     (untrusted)│   (verifies each message)    └─ process A2
                             └── store B's member ─ deploy ─┬─ process B1
                                                            └─ process B2

Between the steps of that transaction the deploy waits for the fleet's word (:class:`_FleetGate`):
each store says *prepared* (every process of it verified, compiled and planned), then the CLI says
*apply* only once every store did; each store says *applied*, then the CLI says *commit* only once
every store did, else *revert*. A word that does not come in time is a *no*: nobody applies, or
everybody undoes. Every message is signed by a deploy key and checked here, clock window and nonce
included (``overlay.channel``), with this store's own trusted keys.

The store's member reads the deploy stream once (one ``XREAD BLOCK``, no polling) and hands each
word of a deploy, verified, to the deploy's thread; that thread answers through a blocking client
of its own (no hop through the event loop). Answers are short (a line per process: pid, outcome,
ms; the store's host and version once); the full report comes from the one store the commit names.

A store that missed a deploy (a new machine, a restart, a member cut off from Redis) **catches up**
by itself: the fleet's signed ``active`` record names the last version committed, and when it is
newer than any version this store accepted, its bundle is fetched (another store's member uploads
it on request), verified here, and deployed to this store's processes. It never moves backwards:
a missed rollback leaves the store shown as behind (``habanero-pack status``) until the next push.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from overlay import deploy
from overlay.bundle import Bundle
from overlay.channel import (
    HEARTBEAT,
    HEARTBEAT_TTL,
    METHOD,
    WORDS,
    ChannelURL,
    Keys,
    connect,
    heartbeat,
    open_message,
    path_of,
    verify_record,
)
from overlay.control import RequestVerifier
from overlay.errors import ControlRejected, HabaneroError

#: A ``redis.asyncio.Redis`` client (typed loosely: its answers' types depend on its options).
Redis = Any

__all__ = ["Fleet"]

logger = logging.getLogger("overlay.channel")

#: Seconds between two looks at the fleet's active record (and at start, and after a reconnect).
CATCH_UP_EVERY = 2.0
#: Seconds ``install()`` waits for this store to catch up with its fleet before the app goes on.
START_WAIT = 5.0
#: Seconds a member waits for another store to upload a bundle it asked for.
FETCH_WAIT = 3.0
#: Bounds of the wait for the fleet's next word (the CLI says how long, in the signed prepare).
MIN_WAIT, MAX_WAIT = 1.0, 120.0
#: Reconnection backoff, in seconds: doubled from the first to the last, with jitter.
BACKOFF = (0.1, 5.0)
#: How long acks and uploads stay in Redis.
ACK_TTL, UPLOAD_TTL = 600, 3600
#: Milliseconds an XREAD blocks at most (the loop looks at its heartbeat and at the fleet between).
READ_BLOCK = 1000
#: Seconds between two full descriptions of this member (``member:<id>``) when nothing changed.
DESCRIBE_EVERY = 30.0


class Fleet:
    """This process's membership of its fleet (see the module docstring)."""

    def __init__(self, node: deploy.Node, url: ChannelURL, *, app_id: str,
                 status: Callable[[], dict[str, Any]], history: Callable[[int], list[dict[str, Any]]]) -> None:
        self.node, self.url, self.app_id = node, url, app_id
        self.keys = Keys(app_id)
        self._status, self._history = status, history
        self.host = socket.gethostname()
        store = node.host.store
        self.store_id = hashlib.sha256(f"{self.host}\0{os.path.realpath(store.path)}".encode()).hexdigest()[:16]
        self.verifier = RequestVerifier(node.host.trusted, app_id, nonces=store.requests)
        self.connected = False
        self.behind: str | None = None  # why this store runs another version than the fleet, if it does
        self.caught_up = threading.Event()
        self._new_identity()
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Redis | None = None
        self._thread: threading.Thread | None = None
        self._blocking_client: Redis | None = None  # a deploy thread's own (see connect(blocking=True))
        self._blocking_lock = threading.Lock()
        self._seen: dict[str, float] = {}  # deploys taken part in: a message repeated is not acted on twice
        #: The fleet's deploys under way in this store, each with its words (verified) for its thread.
        self._deploying: dict[str, queue.Queue[tuple[str, dict[str, Any]]]] = {}
        self._busy = threading.Lock()  # one deploy of the fleet at a time in this store

    def _new_identity(self) -> None:
        self.member_id = f"{self.host}-{os.getpid()}-{os.urandom(3).hex()}"

    # ------------------------------------------------------------------------------ lifetime

    def start(self, *, wait: float = START_WAIT) -> None:
        """Join the fleet; wait up to ``wait`` seconds for this store to run the fleet's version."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._main, name="habanero-channel", daemon=True)
        self._thread.start()
        if wait > 0 and not self.caught_up.wait(wait):
            logger.warning("habanero: not caught up with the fleet at %s within %g s; serving v%s and catching up "
                           "in the background", self.url, wait, self._version())

    def stop(self) -> None:
        """Leave the fleet: the heartbeat is withdrawn, the store's lead given up."""
        self._stopping.set()
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self._leave(), loop).result(2.0)
            thread.join(3.0)
        self._release_lead()
        client, self._blocking_client = self._blocking_client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's thread, connection and lead are the parent's (``start``
        joins the fleet again, as a member of its own)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # the parent still holds the lock through its own descriptor
            self._lock_fd = None
        self._loop = self._client = self._thread = self._blocking_client = None
        self._seen, self._deploying = {}, {}
        self._busy = threading.Lock()
        self.caught_up = threading.Event()
        self._new_identity()
        self.verifier = RequestVerifier(self.node.host.trusted, self.app_id, nonces=self.node.host.store.requests)

    def describe(self) -> dict[str, Any]:
        return {"url": str(self.url), "member": self.member_id, "connected": self.connected,
                "leads_store": self._lock_fd is not None, "behind": self.behind}

    # ---------------------------------------------------------------------------- the loop

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run())
        finally:
            loop.close()

    async def _run(self) -> None:
        delay = BACKOFF[0]
        while not self._stopping.is_set():
            client = self._client = connect(self.url)
            try:
                await client.ping()
                if not self.connected:
                    logger.info("habanero: joined the fleet at %s as %s", self.url, self.member_id)
                self.connected, delay = True, BACKOFF[0]
                await self._session(client)
            except Exception as exc:  # a lost or refused connection, a failover: connect again
                if self._stopping.is_set():
                    break
                if self.connected:
                    logger.warning("habanero: lost the channel %s (%s); reconnecting", self.url, exc)
                self.connected = False
                self.caught_up.set()  # nothing to wait for at start-up: serve what the store has
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, BACKOFF[1])
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self.connected = False

    async def _session(self, client: Redis) -> None:
        """One connection's life: the heartbeat, and the store's lead when this process holds it."""
        beat = asyncio.ensure_future(self._beat(client))
        try:
            await self._lead(client, beat)
        finally:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat

    async def _beat(self, client: Redis) -> None:
        """Renew the heartbeat (``alive:<id>``: what a push needs to know of this member, its
        version included); write the full description (for ``status``: what a silent member last
        ran) when its role changed, and every ``DESCRIBE_EVERY`` seconds, not after every push."""
        described: tuple[bool, str | None] | None = None
        when = 0.0
        while not self._stopping.is_set():
            version = self._version()
            alive = heartbeat(self.store_id, self.host, os.getpid(), version)
            role = (self._lock_fd is not None, self.behind)
            describe = role != described or time.monotonic() - when > DESCRIBE_EVERY
            async with client.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.alive(self.member_id), alive, px=int(HEARTBEAT_TTL * 1000))
                if describe:
                    pipe.set(self.keys.member(self.member_id), json.dumps(self._member_info(), separators=(",", ":")),
                             ex=300)
                    pipe.sadd(self.keys.members, self.member_id)
                await pipe.execute()
            if describe:
                described, when = role, time.monotonic()
            await asyncio.sleep(HEARTBEAT)

    async def _leave(self) -> None:
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                await client.delete(self.keys.member(self.member_id), self.keys.alive(self.member_id))
                await client.srem(self.keys.members, self.member_id)
        self._stopping.set()

    def _member_info(self) -> dict[str, Any]:
        active = self.node.host.active
        return {"id": self.member_id, "host": self.host, "pid": os.getpid(), "store": str(self.node.host.store.path),
                "store_id": self.store_id, "version": active.version if active else None,
                "digest": active.digest if active else None, "leads_store": self._lock_fd is not None,
                "behind": self.behind}

    def _version(self) -> int | None:
        active = self.node.host.active
        return active.version if active is not None else None

    # ------------------------------------------------------------------------- the store's lead

    def _take_lead(self) -> bool:
        if self._lock_fd is not None:
            return True
        root = self.node.registry.root
        try:
            fd = os.open(root / "channel.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _release_lead(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _lead(self, client: Redis, beat: asyncio.Future[None]) -> None:
        while not self._take_lead():
            self.caught_up.set()  # another process of this store catches up for it
            if beat.done():
                beat.result()
            await asyncio.sleep(HEARTBEAT)
            if self._stopping.is_set():
                return
        # From the stream's end as it is now: a message from before this connection is not ours.
        last = await self._tail(client, self.keys.steps)
        wants = await self._tail(client, self.keys.wants)
        await self._catch_up(client)
        looked = time.monotonic()
        while not self._stopping.is_set():
            if beat.done():
                beat.result()  # its connection error ends the session
            read = await client.xread({self.keys.steps: last, self.keys.wants: wants}, count=64, block=READ_BLOCK)
            for stream, entries in read or []:
                for entry_id, fields in entries:
                    name = stream.decode() if isinstance(stream, bytes) else stream
                    if name == self.keys.steps:
                        last = entry_id
                        await self._on_step(client, entry_id, fields)
                    else:
                        wants = entry_id
                        await self._on_want(client, fields)
            if time.monotonic() - looked > CATCH_UP_EVERY:
                await self._catch_up(client)
                looked = time.monotonic()

    @staticmethod
    async def _tail(client: Redis, stream: str) -> bytes | str:
        newest = await client.xrevrange(stream, count=1)
        return newest[0][0] if newest else "0-0"

    # ------------------------------------------------------------------------------ messages

    async def _on_step(self, client: Redis, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        txn: object = None
        try:
            op, body, auth, text = open_message(fields.get(b"m", b""))
            txn = body.get("txn")
            if not isinstance(txn, str) or len(txn) > 64:
                raise ControlRejected("a channel message without a transaction id", code="bad_request")
            if op in WORDS:
                words = self._deploying.get(txn)
                if words is None:
                    return  # not a deploy this store takes part in (any more): nothing to do
                self.verifier.verify(METHOD, path_of(op), auth, text)
                words.put((op, body))
                return
            self.verifier.verify(METHOD, path_of(op), auth, text)
        except HabaneroError as exc:
            logger.warning("habanero: refused a channel message: %s: %s", exc.code, exc.message)
            if isinstance(txn, str) and len(txn) <= 64:
                await self._ack(client, txn, {"step": "refused", "ok": False, "code": exc.code,
                                              "message": exc.message})
            return
        if op == "prepare":
            if txn in self._seen:
                return
            self._seen[txn] = time.time()
            self._deploying[txn] = queue.Queue()
            threading.Thread(target=self._drive, args=(txn, body, fields.get(b"b")),
                             name="habanero-channel-deploy", daemon=True).start()
        elif op == "status":
            answer = await asyncio.to_thread(self._answer_status)
            await self._ack(client, txn, {"step": "status", "ok": True, **answer})
        elif op == "history":
            limit = body["limit"] if type(body.get("limit")) is int else 50
            await self._ack(client, txn, {"step": "history", "ok": True, "history": self._history(limit)})

    async def _on_want(self, client: Redis, fields: dict[bytes, bytes]) -> None:
        """Another store asked for a bundle: upload it if this store holds it (unsigned asks cost
        one upload each at most: a bundle present already is not sent again)."""
        try:
            version, digest = int(fields.get(b"version", b"")), fields.get(b"digest", b"").decode()
        except (ValueError, UnicodeDecodeError):
            return
        if len(digest) != 64 or await client.exists(self.keys.full(digest)):
            return
        data = self.node.host.store.read_bundle(version, digest)
        if data is not None:
            await client.set(self.keys.full(digest), data, ex=UPLOAD_TTL, nx=True)

    async def _ack(self, client: Redis, txn: str, answer: dict[str, Any]) -> None:
        key = self.keys.acks(txn)
        async with client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"m": self.answer({**answer, "pid": os.getpid(), "where": self.where})})
            pipe.expire(key, ACK_TTL)
            await pipe.execute()

    def ack(self, txn: str, answer: dict[str, Any], *, first: bool = False) -> None:
        """From a deploy's thread: answer the CLI (a lost connection makes the CLI's wait run out);
        ``first`` when this store said nothing yet in this deploy (the answers' stream gets its TTL)."""
        key = self.keys.acks(txn)
        try:
            pipe = self.blocking().pipeline(transaction=False)
            pipe.xadd(key, {"m": self.answer(answer)})
            if first:
                pipe.expire(key, ACK_TTL)
            pipe.execute()
        except Exception as exc:
            logger.warning("habanero: could not answer the fleet (%s)", exc)

    def answer(self, answer: dict[str, Any]) -> bytes:
        """A deploy's answer, short: this store and its host once, then the step's own fields."""
        return json.dumps({**answer, "store": self.store_id, "host": self.host}, separators=(",", ":"),
                          default=str).encode()

    def blocking(self) -> Redis:
        """This process's blocking client, for deploy threads (made at the first deploy, kept)."""
        with self._blocking_lock:
            if self._blocking_client is None:
                self._blocking_client = connect(self.url, blocking=True)
            return self._blocking_client

    def _answer_status(self) -> dict[str, Any]:
        status = self._status()
        for worker in status.get("workers") or []:
            worker["host"] = self.host
        return {"status": status}

    # ------------------------------------------------------------------------------- deploys

    def _drive(self, txn: str, body: dict[str, Any], inline: bytes | None) -> None:
        """This store's part in one deploy of the fleet (on its own thread)."""
        wait = min(max(float(body.get("wait") or 10.0), MIN_WAIT), MAX_WAIT)
        gate = _FleetGate(self, txn, wait, self._deploying.get(txn) or queue.Queue())
        try:
            with self._busy:
                if body.get("action") == "rollback":
                    to, expect = body.get("to"), body.get("expect")
                    if not all(v is None or type(v) is int for v in (to, expect)) or expect is None:
                        raise ControlRejected("a rollback must name the version it expects to replace",
                                              code="bad_request")
                    report = deploy.rollback(self.node, to, expect=expect, gate=gate)
                else:
                    report = deploy.push(self.node, self._payload(body, inline), gate=gate)
            self.behind = None
            answer = {"step": "done", "ok": True, "version": report.version,
                      "workers": _compact(report.workers, report.version)}
            if gate.reporter:
                answer["report"] = {k: v for k, v in report.to_dict().items() if k != "workers"}
            self.ack(txn, answer)
        except HabaneroError as exc:
            workers = exc.details.get("workers")
            lines = _compact([w for w in workers if isinstance(w, dict)], None) if isinstance(workers, list) else []
            self.ack(txn, {"step": "done" if gate.stage != "prepare" else "refused", "ok": False, "code": exc.code,
                           "message": exc.message, "workers": lines, "where": self.where,
                           "remote_traceback": getattr(exc, "remote_traceback", "")}, first=gate.stage == "prepare")
        except Exception as exc:  # never let a deploy thread die silently
            logger.exception("habanero: a deploy of the fleet failed")
            self.ack(txn, {"step": "done", "ok": False, "code": "internal_error", "message": str(exc),
                           "where": self.where}, first=gate.stage == "prepare")
        finally:
            self._deploying.pop(txn, None)
            cutoff = time.time() - 3600
            self._seen = {t: s for t, s in self._seen.items() if s > cutoff}

    @property
    def where(self) -> str:
        return f"{self.host}:{self.node.host.store.path}"

    def _payload(self, body: dict[str, Any], inline: bytes | None) -> bytes:
        """The pushed bundle: beside the prepare in its stream entry, or uploaded (a large one). The
        signed prepare names its sha256; the bundle's own signatures are checked by every process."""
        sha = body.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ControlRejected("a push that does not name its bundle's sha256", code="bad_request")
        data = inline
        if data is None:
            try:
                data = self.blocking().get(self.keys.payload(sha))
            except Exception as exc:
                raise ControlRejected(f"Redis did not answer ({exc or type(exc).__name__})",
                                      code="channel_unreachable") from None
            if not isinstance(data, bytes):
                raise ControlRejected("the pushed bundle is not in Redis (expired, or Redis lost it); push again",
                                      code="payload_missing")
        if hashlib.sha256(data).hexdigest() != sha:
            raise ControlRejected("the bundle beside the prepare is not the one it names", code="bad_request")
        return data

    # ----------------------------------------------------------------------------- catching up

    async def _catch_up(self, client: Redis) -> None:
        try:
            await self._catch_up_once(client)
        except HabaneroError as exc:
            logger.error("habanero: could not catch up with the fleet: %s", exc)
        finally:
            self.caught_up.set()

    async def _catch_up_once(self, client: Redis) -> None:
        if self._deploying:
            # A deploy of the fleet is under way here: the active record may already name it (the
            # CLI writes it with the commit) while this store has yet to commit: nothing to fetch.
            return
        raw = await client.get(self.keys.active)
        if raw is None:
            self.behind = None
            return
        record = verify_record(raw, self.node.host.trusted, self.app_id)
        version, digest = record.get("version"), record.get("digest")
        if type(version) is not int or not isinstance(digest, str):
            return
        store = self.node.host.store
        pointer, highest = store.pointer()
        if pointer is not None and pointer["digest"] == digest:
            self.behind = None
            return
        if version <= highest:
            self.behind = (f"the fleet runs v{version}, this store v{pointer['version'] if pointer else 'on disk'}; "
                           "a store takes only newer versions by itself: push or roll back through the channel")
            return
        data = await client.get(self.keys.full(digest))
        if data is None:
            await client.xadd(self.keys.wants, {"version": str(version), "digest": digest}, maxlen=1000,
                              approximate=True)
            deadline = time.monotonic() + FETCH_WAIT
            while data is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                data = await client.get(self.keys.full(digest))
        if data is None:
            self.behind = f"the fleet runs v{version}; no other store has uploaded it yet"
            return
        if self._busy.locked():
            return
        report = await asyncio.to_thread(self._apply_caught_up, data)
        if report is not None:
            logger.info("habanero: caught up with the fleet: v%s", report.version)
            self.behind = None

    def _apply_caught_up(self, data: bytes) -> Any:
        with self._busy:
            return deploy.push(self.node, data, parent=False)


def _compact(lines: list[dict[str, Any]], version: int | None) -> list[dict[str, Any]]:
    """Worker lines as the CLI prints them, without what the answer says once (host, the version)."""
    out = []
    for line in lines:
        item = {k: v for k, v in line.items() if k != "host" and not (k == "version" and v == version)}
        if isinstance(item.get("ms"), float):
            item["ms"] = round(item["ms"], 1)
        out.append(item)
    return out


class _FleetGate:
    """Between the steps of this store's deploy, the fleet's word (see ``overlay.deploy.Gate``)."""

    def __init__(self, fleet: Fleet, txn: str, wait: float, words: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
        self.fleet, self.txn, self.wait, self.words = fleet, txn, wait, words
        self.stage = "prepare"
        self.reporter = False  # whether the commit asks this store for the full report

    def prepared(self, bundle: Bundle, lines: list[dict[str, Any]]) -> None:
        self.stage = "prepared"
        self.fleet.ack(self.txn, {"step": "prepared", "ok": True, "version": bundle.version, "digest": bundle.digest,
                                  "workers": _compact(lines, bundle.version)}, first=True)
        word = self._word(("apply", "abort"))
        if word is None or word[0] != "apply":
            raise ControlRejected(f"the fleet did not go ahead with v{bundle.version}: another store refused it, "
                                  "or the word to apply did not come in time", code="fleet_aborted")
        self.stage = "apply"

    def applied(self, bundle: Bundle, lines: list[dict[str, Any]]) -> None:
        self.stage = "applied"
        self.fleet.ack(self.txn, {"step": "applied", "ok": True})
        word = self._word(("commit", "revert"))
        if word is None or word[0] != "commit":
            raise ControlRejected(f"the fleet undid v{bundle.version}: another store failed to apply it, or the "
                                  "word to commit did not come in time", code="fleet_reverted")
        self.reporter = word[1].get("report") == self.fleet.store_id

    def _word(self, expected: tuple[str, str]) -> tuple[str, dict[str, Any]] | None:
        """The fleet's next word, one of ``expected`` (verified by the store's member), or None
        when none came in time."""
        deadline = time.monotonic() + self.wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                word = self.words.get(timeout=left)
            except queue.Empty:
                break
            if word[0] in expected:
                return word
        return None
