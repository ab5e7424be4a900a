"""Child process of ``storage/test_store_crash.py``: push versions into a store until it is killed.

Usage: ``python -m support.crash_writer STORE_DIR KEY_PATH``, with ``tests/`` on the path. Prints
``ready`` once the store is open, then ``ok N`` after each commit of version N returns (what a
client would have been told). Each round also stages, builds a source tree, records a failure and,
with ``keep=3``, prunes, so a kill can land inside every kind of write the store does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from overlay.bundle import build_bundle, open_bundle
from overlay.keys import TrustedKeys, load_signing_key
from overlay.store import Store

APP = "crashy"


def main(store_dir: str, key_path: str) -> None:
    key = load_signing_key(key_path)
    trusted = TrustedKeys([key.public])
    store = Store.open(store_dir, trusted=trusted, app_id=APP, keep=3)
    tree = store.source_tree(Path(store_dir).parent / f"tree-{os.getpid()}")  # this process's own
    if store.active is not None:
        tree.lay_out(store.active)
    print("ready", flush=True)
    while True:
        version = store.highest + 1
        files = {
            APP: ("package", f"VERSION = {version}\n".encode()),
            f"{APP}.stable": ("module", b"X = 1\n" * 200),
            f"{APP}.changing": ("module", f"V = {version}\n".encode() * 200),
            f"{APP}/data/blob.txt": ("data", f"{version}\n".encode() * 500),
        }
        bundle = open_bundle(build_bundle(files, app_id=APP, version=version, signers=[key]),
                             trusted, app_id=APP)
        store.check_fresh(bundle)
        store.stage(bundle)
        tree.update(store.active, bundle)  # as a push does: before the commit, not fsynced
        store.commit(bundle)
        print(f"ok {version}", flush=True)
        store.record_failure(action="push", version=version + 1, digest=None, key_ids=bundle.key_ids,
                             code="activation_failed", reason="simulated failure between pushes")


if __name__ == "__main__":
    main(*sys.argv[1:3])
