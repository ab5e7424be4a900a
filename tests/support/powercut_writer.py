"""Child process of ``storage/test_store_power_loss.py``: push versions into a ``sync="commit"``
store under a power-cut recorder (``support.powercut``), then exit.

Usage: ``python -m support.powercut_writer ROOT STORE KEY_PATH LOG PUSHES``, with ``tests/`` on the
path. ``ROOT`` is the recorded tree, ``STORE`` the store in it (created if missing). After each
commit returns it logs ``ack N`` and prints ``ok N``, what a client would have been told. Pushes are
deltas against the active version, as ``habanero-pack`` sends them, so the acknowledged version
needs its objects as well as its bundle file; each round also records a failure, and ``keep=2``
makes retention drop versions (and sweep objects after ten).

``HABANERO_POWERCUT_SKIP`` names one fsync to leave out (``bundles``: of the bundles directory after
a commit moves the bundle in; ``state``: of the store directory after the state file is replaced),
to show that the test catches a store that forgets one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from support.powercut import Recorder

APP = "powercut"


def _skip_one_fsync(which: str) -> None:
    from overlay.storage import fs

    fsync_dir = fs.fsync_dir

    def leaving_one_out(path: str | os.PathLike[str]) -> None:
        name = os.path.basename(os.fspath(path))
        if (which, name) in (("bundles", "bundles"), ("state", "store")):
            return
        fsync_dir(path)

    fs.fsync_dir = leaving_one_out  # type: ignore[assignment]


def main(root: str, store_dir: str, key_path: str, log: str, pushes: str) -> None:
    recorder = Recorder(root, log)
    recorder.install()  # before the store is imported: every call it makes goes through the wrappers
    from overlay.bundle import ParentManifest, build_bundle, open_bundle
    from overlay.keys import TrustedKeys, load_signing_key
    from overlay.store import Store

    if skip := os.environ.get("HABANERO_POWERCUT_SKIP"):
        _skip_one_fsync(skip)
    key = load_signing_key(key_path)
    trusted = TrustedKeys([key.public])
    store = Store.open(store_dir, trusted=trusted, app_id=APP, keep=2, sync="commit")
    tree = store.source_tree(Path(log).parent / f"tree-{os.getpid()}")  # outside the recorded root
    if store.active is not None:
        tree.lay_out(store.active)
    for _ in range(int(pushes)):
        version = store.highest + 1
        files = {
            APP: ("package", f"VERSION = {version}\n".encode()),
            f"{APP}.stable": ("module", b"X = 1\n" * 200),
            f"{APP}.changing": ("module", f"V = {version}\n".encode() * 200),
            f"{APP}.every_other": ("module", f"W = {version // 2}\n".encode() * 50),
            f"{APP}/data/blob.txt": ("data", f"{version}\n".encode() * 500),
        }
        base = ParentManifest.from_manifest(store.active.manifest_bytes) if store.active is not None else None
        data = build_bundle(files, app_id=APP, version=version, signers=[key], base=base)
        bundle = open_bundle(data, trusted, app_id=APP, content=store.object)
        store.check_fresh(bundle)
        store.stage(bundle)
        tree.update(store.active, bundle)  # as a push does: before the commit
        store.commit(bundle)
        recorder.mark("ack", version)
        print(f"ok {version}", flush=True)
        store.record_failure(action="push", version=version + 1, digest=None, key_ids=bundle.key_ids,
                             code="activation_failed", reason="simulated failure between pushes")
    store.close()  # the worker's retention and sweeps finish under the recorder too


if __name__ == "__main__":
    main(*sys.argv[1:6])
