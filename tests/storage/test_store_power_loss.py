"""A power cut at any moment of a ``sync="commit"`` store: every acknowledged push boots.

``kill -9`` (``test_store_crash.py``) loses only what the process had not handed to the kernel; a
power cut also loses what the kernel had not written to the disk. No test machine drops its page
cache on demand, so this test computes what the disk could hold instead, in the worst case POSIX
allows, and boots the store from that:

1. The parent makes a store (or none) and scans the tree holding it: the *baseline*, on disk.
2. A child (``support.powercut_writer``) pushes delta versions into it with ``sync="commit"``, under
   a recorder (``support.powercut``) that wraps ``os.open``, ``os.mkdir``, ``os.fsync`` and
   ``os.close`` (and notes ``write``, ``replace``, ``rename``, ``link``, ``unlink``, ``rmdir``,
   ``ftruncate``) for the whole tree: each ``fsync`` logs what it made durable, a file's bytes or a
   directory's entries (by inode and a generation, so a reused inode number is a new file).
   After each commit returns the child logs ``ack N`` and prints ``ok N``.
3. The disk after a cut is, for each file, its content at its last ``fsync`` (nothing if it had
   none and is new); for each directory, its entries at its last ``fsync`` (the baseline's, if
   none). Every write, creation, rename, link and unlink since is dropped. This worst case changes
   only at an ``fsync``, so the test builds one image per ``fsync`` in the log: together they
   are every point at which the power can go, mid-operation cuts included.
4. Each image is laid out in a fresh directory and opened with ``Store.open``. It must boot the
   last version acknowledged before the image's span ended (or a newer one, if its commit was
   durable already), with no start-up problem, a highest mark at least as high, and a bundle that
   verifies with every body matching its hash (a delta's bodies come from ``objects/``).

What the model leaves out: a disk that loses an fsynced write (lying hardware), a file system that
keeps a rename's new name but not its data (the model keeps content and names apart, by inode, as
ext4 and XFS do), partial writes of an unsynced file (dropped whole here: the store never reads a
file it did not fsync as valid without checking it), and states that mix unsynced changes in an
order the kernel would not write them (only the worst case, everything unsynced lost, is built;
the other end, everything kept, is what ``kill -9`` leaves).

The same harness fails when one fsync is left out of the store (``HABANERO_POWERCUT_SKIP``): it
is able to see a missing one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, TESTS
from support.powercut import Baseline, images, read_log

from overlay.bundle import build_bundle, open_bundle
from overlay.keys import SigningKey, TrustedKeys, generate_signing_key
from overlay.store import Store

pytestmark = pytest.mark.slow  # a writer process

WRITER = "support.powercut_writer"
APP = "powercut"
PUSHES = 12


def _prepare(tmp_path: Path, key: SigningKey, *, existing: bool, skip: str | None
             ) -> tuple[Path, Path, dict[str, str], Path]:
    """The recorded tree (with a store running v1 in it if ``existing``), the log, the child's
    environment and the store's path."""
    disk = tmp_path / "disk"
    disk.mkdir()
    store_dir = disk / "store"
    if existing:  # on disk before the recording starts
        with Store.open(store_dir, trusted=TrustedKeys([key.public]), app_id=APP, sync="commit") as store:
            bundle = open_bundle(build_bundle({APP: ("package", b"VERSION = 1\n")}, app_id=APP, version=1,
                                              signers=[key]), TrustedKeys([key.public]), app_id=APP)
            store.stage(bundle)
            store.commit(bundle)
    log = tmp_path / "fsyncs.log"
    path = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("HABANERO_POWERCUT_SKIP", None)
    if skip:
        env["HABANERO_POWERCUT_SKIP"] = skip
    return disk, log, env, store_dir


def _boot(image_dir: Path, trusted: TrustedKeys) -> tuple[int, int, str | None]:
    """Open the store in ``image_dir``: the version it boots, its highest mark, and what is wrong."""
    store = Store.open(image_dir / "store", trusted=trusted, app_id=APP, keep=2, sync="commit")
    try:
        active = store.active
        version = active.version if active is not None else 0
        if store.startup_problems:
            return version, store.highest, f"start-up problems: {store.startup_problems}"
        if active is not None:
            again = open_bundle(active.raw, trusted, app_id=APP, content=store.object)  # raises if not
            for name, entry in again.entries.items():
                if hashlib.sha256(again.read(name)).hexdigest() != entry.sha256:
                    return version, store.highest, f"v{version}: {name} is torn"
        return version, store.highest, None
    finally:
        store.close()


def _power_cuts(tmp_path: Path, *, existing: bool, skip: str | None = None) -> tuple[list[str], int, int]:
    """Run the writer, then boot every power-cut image; the failures, the cuts and the distinct images."""
    key = generate_signing_key(tmp_path / "key")
    trusted = TrustedKeys([key.public])
    disk, log, env, store_dir = _prepare(tmp_path, key, existing=existing, skip=skip)
    baseline = Baseline(disk)
    done = subprocess.run([sys.executable, "-m", WRITER, str(disk), str(store_dir), str(tmp_path / "key"),
                           str(log), str(PUSHES)], capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    first = 2 if existing else 1
    acked = [int(line[3:]) for line in done.stdout.split(b"\n") if line.startswith(b"ok ")]
    assert acked == list(range(first, first + PUSHES))
    need, failures, cuts = first - 1, [], 0
    booted: dict[bytes, tuple[int, int, str | None]] = {}  # an image seen before boots the same
    last_op = "the start"
    for image, marks in images(read_log(log), baseline):
        # A cut anywhere from this image's fsync to the next leaves this image: it must hold every
        # version acknowledged in that span.
        need = max([need, *(m[1] for m in marks if m[0] == "ack")])
        tree = image.tree()
        seen = hashlib.sha256(repr(sorted(tree.items())).encode()).digest()
        if seen not in booted:
            target = tmp_path / "images" / str(len(booted))
            target.parent.mkdir(exist_ok=True)
            image.write(tree, target)
            booted[seen] = _boot(target, trusted)
            shutil.rmtree(target)
        version, highest, problem = booted[seen]
        if problem is None and (version < need or highest < need):
            problem = f"acknowledged v{need} lost: boots v{version}, highest {highest}"
        if problem:
            failures.append(f"power cut after event {image.at} (after {last_op}): {problem}")
        last_op = next((" ".join(map(str, m[1:])) for m in reversed(marks) if m[0] == "op"), last_op)
        cuts += 1
    return failures, cuts, len(booted)


@pytest.mark.parametrize("existing", [True, False], ids=["running store", "new store"])
def test_every_acknowledged_push_boots_after_a_power_cut_at_any_moment(tmp_path, existing):
    started = time.perf_counter()
    failures, cuts, distinct = _power_cuts(tmp_path, existing=existing)
    assert failures == [], "\n".join(failures[:10])
    assert cuts > 8 * PUSHES and distinct > 2 * PUSHES, (cuts, distinct)  # every commit's fsyncs were seen
    assert time.perf_counter() - started < 15


@pytest.mark.parametrize("skip", ["bundles", "state"])
def test_the_harness_catches_a_store_that_leaves_out_one_fsync(tmp_path, skip):
    failures, _, _ = _power_cuts(tmp_path, existing=True, skip=skip)
    assert any("lost" in f or "start-up problems" in f for f in failures), failures
