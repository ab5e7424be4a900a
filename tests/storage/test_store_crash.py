"""kill -9 a process writing to the store at random moments; the store must always reopen cleanly.

The child (``support/crash_writer.py``) pushes versions in a loop. After each kill the parent opens the
store and checks: no startup problems, the active bundle verifies and is the newest version, the
highest mark never went down, and every version the child acknowledged survived. Set
``HABANERO_CRASH_SEED`` to replay a failing sequence of kill times.
"""

from __future__ import annotations

import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, TESTS

from overlay.bundle import open_bundle
from overlay.keys import TrustedKeys, generate_signing_key
from overlay.store import Store

pytestmark = pytest.mark.slow  # a writer process killed 60 times

# Run as a module of ``support`` (a script would put tests/support/ first on its path, where
# support/overlay.py would shadow the real overlay package).
WRITER = "support.crash_writer"
KILLS = 60
MAX_DELAY = 0.08  # seconds after "ready": long enough for several commits on a slow disk
EARLY_KILLS = 0.15  # share of rounds killed without waiting for "ready"


def _start(store_dir: Path, key_path: Path, stderr_path: Path) -> subprocess.Popen[bytes]:
    path = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", WRITER, str(store_dir), str(key_path)],
                                stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=ROOT)


def _wait_ready(child: subprocess.Popen[bytes], stderr_path: Path) -> None:
    assert child.stdout is not None
    readable, _, _ = select.select([child.stdout], [], [], 20)
    line = child.stdout.readline() if readable else b""
    assert line == b"ready\n", f"writer did not start: {line!r}\n{stderr_path.read_text()}"


def _acknowledged(output: bytes) -> list[int]:
    """Versions whose commit returned; a line cut by the kill does not count."""
    return [int(line[3:]) for line in output.split(b"\n")[:-1] if line.startswith(b"ok ")]


def test_kill_9_at_random_moments_always_leaves_a_clean_store(tmp_path: Path) -> None:
    seed = int(os.environ.get("HABANERO_CRASH_SEED", time.time_ns()))
    rng = random.Random(seed)
    key = generate_signing_key(tmp_path / "key")
    trusted = TrustedKeys([key.public])
    store_dir, stderr_path = tmp_path / "store", tmp_path / "writer.err"
    last_highest = acked = 0
    for round_ in range(KILLS):
        where = f"seed {seed}, round {round_}"
        child = _start(store_dir, tmp_path / "key", stderr_path)
        try:
            if rng.random() < EARLY_KILLS:  # may land in the writer's own start-up repair
                time.sleep(rng.uniform(0.05, 0.3))
            else:
                _wait_ready(child, stderr_path)
                time.sleep(rng.uniform(0, MAX_DELAY))
            assert child.poll() is None, f"{where}: writer died by itself:\n{stderr_path.read_text()}"
        finally:
            child.kill()
            output, _ = child.communicate()
        acked = max([acked, *_acknowledged(output)])

        store = Store.open(store_dir, trusted=trusted, app_id="crashy", keep=3)
        try:
            assert store.startup_problems == [], where
            assert store.highest >= last_highest, f"{where}: highest went from {last_highest} down"
            assert store.highest >= acked, f"{where}: acknowledged v{acked} was lost"
            if store.highest:
                assert store.active is not None and store.active.version == store.highest, where
                open_bundle(store.active.raw, trusted, app_id="crashy")  # verifies, or raises
                tree = tmp_path / f"tree-after-{round_}"  # a new process's tree: exactly the active version's
                store.source_tree(tree).lay_out(store.active)
                files = {str(p.relative_to(tree)): p.read_bytes() for p in tree.rglob("*") if p.is_file()}
                assert files == {e.path: store.active.read(e.name) for e in store.active.entries.values()}, where
            leftovers = [p for p in store_dir.rglob(".tmp-*")] + list((store_dir / "staged").iterdir())
            assert leftovers == [], f"{where}: {leftovers}"
            assert all(e["outcome"] in ("ok", "failed") for e in store.history()), where
            last_highest = store.highest
        finally:
            store.close()
    assert last_highest >= 5, f"seed {seed}: too few commits ({last_highest}) to have tested much"
