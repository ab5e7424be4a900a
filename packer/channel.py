"""The CLI's side of a fleet's channel: ``habanero-pack push|status|history|rollback redis://...``.

:class:`ChannelRemote` speaks to every process of the app through Redis, with the same methods as
the HTTP client (``packer.client.Remote``), so ``packer.deploy.push_once`` drives a fleet as it
drives one app: read its status, build the next version on the one it runs, push (a delta, or
whole when a store lacks the parent), confirm. A push is one transaction over the whole fleet,
the CLI its coordinator (see ``overlay.serving.channel`` for the members' side)::

    CLI                                             each store's member (verifies every message)
    XADD steps  prepare{txn, sha256, wait}    ──►   verify, plan, compile in every process
                + the bundle beside it              (a bundle over INLINE_MAX: SET bundle:<sha256>)
                                              ◄──   prepared{workers} | refused{code, workers}
    XADD steps  apply        (all prepared)   ──►   apply in every process
           or   abort        (any did not)    ◄──   applied | done{ok: false}
    XADD steps  commit{report: one store}     ──►   commit the store, keep the change
           or   revert       (any did not)    ◄──   done{version, workers[, report]}
    SET active <signed record>                      (what a late member catches up to)

Every message is signed with the deploy key and carries a fresh timestamp and nonce. Each step is
one round trip: the step's message and the first wait for the answers go in one pipeline. The CLI
waits for the live members their heartbeats list (``alive:<id>``: store, host, pid, version); a
member that does not answer a step within the deadline (``HABANERO_CHANNEL_TIMEOUT``, 10 s) counts
as a refusal. Answers are short: a line per process (pid, outcome, ms), the store's host and
version once; the full report comes from one store, the one the commit names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from overlay.channel import INLINE_MAX, Keys, connect, new_txn, parse_url, read_heartbeat, seal
from overlay.errors import RemoteError
from overlay.keys import SigningKey

#: A ``redis.asyncio.Redis`` client (typed loosely: its answers' types depend on its options).
Redis = Any

__all__ = ["ChannelRemote"]

#: Seconds each step of a deploy waits for every store's answer; questions wait less.
STEP_TIMEOUT, QUESTION_TIMEOUT = 10.0, 3.0
#: What a store's member waits beyond the CLI's own deadline before it decides alone (revert).
MEMBER_SLACK = 5.0


def _timeout() -> float:
    try:
        return max(0.5, float(os.environ.get("HABANERO_CHANNEL_TIMEOUT", "") or STEP_TIMEOUT))
    except ValueError:
        return STEP_TIMEOUT


class ChannelRemote:
    """Every process of ``app_id`` subscribed to the channel at ``url`` (see the module docstring)."""

    def __init__(self, url: str, *, app_id: str, key: SigningKey | None) -> None:
        self.url = parse_url(url)
        self.endpoint = str(self.url)
        self.app_id, self.key = app_id, key
        self.keys = Keys(app_id)
        self.store: str | None = None  # (several stores: tracebacks are not mapped)
        self.timeout = _timeout()
        self.last: dict[str, Any] = {}  # the last push's measurements: ms to the last ack, bytes
        self._loop = asyncio.new_event_loop()
        self._client: Redis | None = None

    def __enter__(self) -> ChannelRemote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):  # closing a connection Redis dropped already
                self._loop.run_until_complete(client.aclose())
        if not self._loop.is_closed():
            self._loop.close()

    def _run(self, work: Callable[[Redis], Any]) -> Any:
        if self._client is None:
            self._client = connect(self.url)
        try:
            return self._loop.run_until_complete(work(self._client))
        except RemoteError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("redis") or isinstance(exc, OSError):
                raise RemoteError(f"cannot reach the channel {self.endpoint}: {exc or type(exc).__name__}; is Redis "
                                  "running and the URL right? Nothing was applied unless a member says so in "
                                  "`habanero-pack status`", code="channel_unreachable") from None
            raise

    # ------------------------------------------------------------------------------- members

    async def _members(self, client: Redis) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(live members, members gone silent within the last minutes), from their heartbeats."""
        ids = sorted(m.decode() for m in await client.smembers(self.keys.members))
        if not ids:
            return [], []
        infos = await client.mget([self.keys.member(i) for i in ids])
        alive = await client.mget([self.keys.alive(i) for i in ids])
        live, silent, gone = [], [], []
        for member_id, info, beat in zip(ids, infos, alive):
            try:
                member = json.loads(info) if info is not None else None
            except ValueError:
                member = None
            if not isinstance(member, dict):
                gone.append(member_id)
            elif beat is not None:
                live.append(member)
            else:
                silent.append(member)
        if gone:
            await client.srem(self.keys.members, *gone)
        return live, silent

    async def _live(self, client: Redis) -> list[dict[str, Any]]:
        """The live members, from their heartbeats alone (what a push needs: store, host, pid, version)."""
        ids = [m.decode() for m in await client.smembers(self.keys.members)]
        beats = await client.mget([self.keys.alive(i) for i in ids]) if ids else []
        live = [m for m in map(read_heartbeat, ids, beats) if m is not None]
        return sorted(live, key=lambda m: str(m["id"]))

    def _require(self, live: list[dict[str, Any]]) -> set[str]:
        stores = {str(m.get("store_id")) for m in live}
        if not stores:
            raise RemoteError(f"no process of app {self.app_id!r} is subscribed to {self.endpoint}: start the app with "
                              "overlay.install(..., channel=...) (or HABANERO_CHANNEL), and check its app id",
                              code="no_members", status=503)
        return stores

    def _publisher(self, op: str, body: dict[str, Any], extra: dict[str, bytes] | None = None
                   ) -> Callable[[Any], None]:
        """What publishes one signed step (queued on a pipeline, before the wait for its answers)."""
        if self.key is None:
            raise RemoteError("channel messages are signed: no signing key", code="no_key")
        fields = {"m": seal(self.key, self.app_id, op, body), **(extra or {})}

        def queue(pipe: Any) -> None:
            pipe.xadd(self.keys.steps, fields, maxlen=1000, approximate=True)
        return queue

    async def _publish(self, client: Redis, op: str, body: dict[str, Any]) -> None:
        queue = self._publisher(op, body)
        async with client.pipeline(transaction=False) as pipe:
            queue(pipe)
            await pipe.execute()

    async def _answers(self, client: Redis, txn: str, stores: set[str], steps: set[str], timeout: float,
                       answers: dict[str, dict[str, Any]], cursor: list[Any],
                       before: Callable[[Any], None] | None = None) -> None:
        """Read ``acks:<txn>`` until every store in ``stores`` answered one of ``steps`` (or a
        refusal, or a failure), or ``timeout`` seconds pass; the latest answer per store goes to
        ``answers``. ``before`` queues commands (the step's message) in the first read's pipeline."""
        deadline = time.monotonic() + timeout
        key = self.keys.acks(txn)

        def settled() -> bool:
            return all(s in answers and (answers[s].get("step") in steps or not answers[s].get("ok"))
                       for s in stores)

        while before is not None or not settled():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            async with client.pipeline(transaction=False) as pipe:
                if before is not None:
                    before(pipe)
                    before = None
                if not settled():
                    pipe.xread({key: cursor[0]}, count=100, block=max(1, int(left * 1000)))
                replies = await pipe.execute()
            read = replies[-1] if replies and isinstance(replies[-1], (list, dict)) else None
            for _, entries in _streams(read):
                for entry_id, fields in entries:
                    cursor[0] = entry_id
                    try:
                        answer = json.loads(fields.get(b"m", b"{}"))
                    except ValueError:
                        continue
                    if isinstance(answer, dict) and isinstance(answer.get("store"), str):
                        store = answer["store"]
                        previous = answers.get(store, {})
                        if previous.get("ok", True) or not answer.get("ok"):
                            answers[store] = _merged(previous, answer)  # a refusal is kept over a later word

    # ------------------------------------------------------------------------------ questions

    def _ask(self, op: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                           dict[str, dict[str, Any]]]:
        async def work(client: Redis) -> Any:
            live, silent = await self._members(client)
            stores = self._require(live)
            txn = new_txn()
            answers: dict[str, dict[str, Any]] = {}
            await self._publish(client, op, {**body, "txn": txn})
            await self._answers(client, txn, stores, {op}, QUESTION_TIMEOUT, answers, ["0-0"])
            return live, silent, answers

        result: tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]] = self._run(work)
        refused = [a for a in result[2].values() if not a.get("ok")]
        if refused:
            raise RemoteError(f"{refused[0].get('where')}: {refused[0].get('message')}",
                              code=str(refused[0].get("code")), status=403)
        return result

    def status(self) -> dict[str, Any]:
        """The fleet as one app: what each store and each of its processes runs, who is live, who
        is behind the newest version, who went silent."""
        live, silent, answers = self._ask("status", {})
        record = self._run(lambda client: client.get(self.keys.active))
        fleet = _record_body(record)
        stores = [a for a in answers.values() if isinstance(a.get("status"), dict)]
        workers = [w for a in stores for w in a["status"].get("workers") or [] if isinstance(w, dict)]
        highest = max((int(a["status"].get("highest") or 0) for a in stores), default=0)
        newest = fleet if fleet.get("digest") else max(
            ((a["status"].get("active") or {}) for a in stores), key=lambda x: x.get("version") or 0, default={})
        active = next((a["status"]["active"] for a in stores
                       if (a["status"].get("active") or {}).get("digest") == newest.get("digest")), None)
        reported = {(w.get("host"), w.get("pid")) for w in workers}
        unanswered = [m for m in live if (m.get("host"), m.get("pid")) not in reported]
        # What each process runs is its store's fresh answer; a heartbeat (up to a second old) only
        # speaks for the processes no store listed, and for the silent ones.
        behind = [m for m in [*workers, *unanswered, *silent]
                  if newest.get("digest") and m.get("digest") != newest.get("digest")]
        return {"app_id": self.app_id, "channel": self.endpoint, "active": active, "highest": highest,
                "fleet": fleet or None, "workers": workers, "members": live, "silent": silent,
                "unanswered": unanswered, "behind": behind,
                "stores": [{"where": a.get("where"), "host": a.get("host"),
                            "active": (a["status"].get("active") or {}).get("version"),
                            "highest": a["status"].get("highest"), "channel": a["status"].get("channel")}
                           for a in stores]}

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        _, _, answers = self._ask("history", {"limit": int(limit)})
        entries = [{**e, "store": a.get("where")} for a in answers.values() for e in a.get("history") or []
                   if isinstance(e, dict)]
        return sorted(entries, key=lambda e: str(e.get("time")))[-limit:] if limit > 0 else []

    # -------------------------------------------------------------------------------- deploys

    def push(self, data: bytes) -> dict[str, Any]:
        """Deploy signed bundle bytes to every live process of the fleet, or to none."""
        return self._deploy({"action": "push", "sha256": hashlib.sha256(data).hexdigest()}, data)

    def rollback(self, to: int | None = None, expect: int | None = None) -> dict[str, Any]:
        return self._deploy({"action": "rollback", "to": to, "expect": expect}, None)

    def _deploy(self, body: dict[str, Any], data: bytes | None) -> dict[str, Any]:
        timeout = self.timeout

        async def work(client: Redis) -> dict[str, Any]:
            live = await self._live(client)
            stores = self._require(live)
            txn = new_txn()
            answers: dict[str, dict[str, Any]] = {}
            cursor: list[Any] = ["0-0"]
            started = time.perf_counter()
            extra = None
            if data is not None and len(data) <= INLINE_MAX:
                extra = {"b": data}  # beside the signed prepare, in its stream entry: no upload, no fetch
            elif data is not None:
                await client.set(self.keys.payload(body["sha256"]), data, ex=3600)
            prepare = self._publisher("prepare", {**body, "txn": txn, "wait": timeout + MEMBER_SLACK}, extra)
            await self._answers(client, txn, stores, {"prepared"}, timeout, answers, cursor, prepare)
            problem = self._problem(answers, stores, live, "prepared")
            if problem is not None:
                await self._publish(client, "abort", {"txn": txn})
                raise self._refusal(problem, answers, stores, live, applied=False)
            apply = self._publisher("apply", {"txn": txn})
            await self._answers(client, txn, stores, {"applied"}, timeout, answers, cursor, apply)
            problem = self._problem(answers, stores, live, "applied")
            if problem is not None:
                await self._publish(client, "revert", {"txn": txn})
                await self._answers(client, txn, {s for s, a in answers.items() if a.get("ok")}, {"done"},
                                    timeout + MEMBER_SLACK, answers, cursor)
                raise self._refusal(problem, answers, stores, live, applied=True)
            version, digest = answers[next(iter(stores))]["version"], answers[next(iter(stores))]["digest"]
            assert self.key is not None
            commit = self._publisher("commit", {"txn": txn, "report": min(stores)})
            record = seal(self.key, self.app_id, "active", {
                "txn": txn, "version": version, "digest": digest, "action": body["action"]})

            def finish(pipe: Any) -> None:
                commit(pipe)
                pipe.set(self.keys.active, record)
            await self._answers(client, txn, stores, {"done"}, timeout, answers, cursor, finish)
            last_ack = (time.perf_counter() - started) * 1000
            return self._result(answers, stores, version, digest, last_ack, data)

        answer: dict[str, Any] = self._run(work)
        return answer

    def _problem(self, answers: dict[str, dict[str, Any]], stores: set[str], live: list[dict[str, Any]],
                 step: str) -> str | None:
        """Why the fleet cannot take the next step, or None."""
        for store in sorted(stores):
            answer = answers.get(store)
            if answer is None:
                names = ", ".join(f"{m.get('host')} pid {m.get('pid')}" for m in live if m.get("store_id") == store)
                return f"no answer from the store of {names} within {self.timeout:g} s"
            if not answer.get("ok") or answer.get("step") != step:
                return f"{answer.get('where')}: {answer.get('code')}: {answer.get('message')}"
        versions = {(a.get("version"), a.get("digest")) for a in answers.values()}
        if len(versions) > 1:
            return f"the stores prepared different bundles ({sorted(map(str, versions))}); push again"
        covered = {(w.get("host"), w.get("pid")) for a in answers.values() for w in a.get("workers") or []
                   if isinstance(w, dict)}
        missing = [m for m in live if (m.get("host"), m.get("pid")) not in covered]
        if missing:
            return "; ".join(f"{m.get('host')} pid {m.get('pid')} took no part (its store did not list it)"
                             for m in missing)
        return None

    def _refusal(self, problem: str, answers: dict[str, dict[str, Any]], stores: set[str],
                 live: list[dict[str, Any]], *, applied: bool) -> RemoteError:
        codes = [str(a.get("code")) for a in answers.values() if not a.get("ok") and a.get("code")]
        code = next((c for c in codes if c not in ("fleet_aborted", "fleet_reverted")), None) or (
            "worker_lost" if any(s not in answers for s in stores) else "worker_refused")
        outcome = ("every member undid it; the fleet runs its previous version" if applied
                   else "no member applied it; the fleet runs its previous version")
        lines = _lines(answers)
        reported = {(w.get("host"), w.get("pid")) for w in lines}
        lines += [{"host": m.get("host"), "pid": m.get("pid"), "version": m.get("version"), "outcome": "no answer"}
                  for m in live if (m.get("host"), m.get("pid")) not in reported]
        traceback = next((str(a.get("remote_traceback")) for a in answers.values() if a.get("remote_traceback")), "")
        return RemoteError(f"{problem}; {outcome}", code=code, status=409, remote_traceback=traceback,
                           body={"workers": lines, "code": code})

    def _result(self, answers: dict[str, dict[str, Any]], stores: set[str], version: int, digest: str,
                last_ack: float, data: bytes | None) -> dict[str, Any]:
        failed = [a for s, a in answers.items() if s in stores and (not a.get("ok") or a.get("step") != "done")]
        report = dict(next((a["report"] for a in answers.values() if isinstance(a.get("report"), dict)),
                           {"version": version, "digest": digest, "timings_ms": {}}))
        report["workers"] = _lines(answers)
        self.last = {"last_ack_ms": round(last_ack, 3), "stores": len(stores), "members": len(report["workers"]),
                     "payload_bytes": len(data) if data is not None else 0}
        if failed:
            # Committed (every store applied and the fleet said commit) but a store's last word is
            # missing: the status read back says whether it runs the version.
            report.setdefault("notes", []).append(f"{len(failed)} store(s) did not confirm the commit")
        return {"ok": True, "report": report, "server_ms": round(last_ack, 3),
                "active": {"version": version, "digest": digest}}


def _lines(answers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for a in answers.values() for w in a.get("workers") or [] if isinstance(w, dict)]


def _streams(read: Any) -> list[Any]:
    """XREAD's answer as ``[(stream, entries)]`` (a list in RESP2, a mapping in RESP3)."""
    if isinstance(read, dict):
        return list(read.items())
    return list(read or [])


def _merged(previous: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A store's answer, whole: its worker lines get the store's host and, unless they say
    otherwise, its version; a step that sends no lines (``applied``) keeps the last ones, and what
    the store said before (the version and digest it prepared) stays unless said again."""
    kept: dict[str, Any] = {k: previous[k] for k in ("version", "digest") if k in previous}
    merged = {**kept, **answer}
    workers = answer.get("workers")
    if isinstance(workers, list):
        merged["workers"] = [{"host": answer.get("host"), "version": merged.get("version") if answer.get("ok")
                              else None, **w} for w in workers if isinstance(w, dict)]
    elif isinstance(previous.get("workers"), list):
        merged["workers"] = [{**w, "outcome": answer.get("step")} if answer.get("ok") else w
                             for w in previous["workers"]]
    return merged


def _record_body(raw: bytes | None) -> dict[str, Any]:
    """The fleet's active record, read for display only (members verify it themselves)."""
    if raw is None:
        return {}
    try:
        body = json.loads(json.loads(raw)["body"])
    except (ValueError, KeyError, TypeError):
        return {}
    return {k: body.get(k) for k in ("version", "digest", "action")} if isinstance(body, dict) else {}
