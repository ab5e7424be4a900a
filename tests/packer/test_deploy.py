"""``push_once`` against an overlay serving a real loopback endpoint: a second push travels as a
delta against what the app runs, and one packed against a version the app no longer runs is sent
again in full."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.project import make_project

import overlay
from overlay.bundle import ParentManifest
from packer.client import Remote
from packer.config import load_config
from packer.deploy import BaseCache, push_once

pytestmark = pytest.mark.slow  # each push builds, and a build asks git who is building


@pytest.fixture
def served(tmp_path: Path, trusted_keys_file, signing_key, import_state, monkeypatch):
    """An app package on disk, an overlay serving it with a real loopback endpoint, and its project."""
    monkeypatch.delenv("HABANERO_DISABLE", raising=False)
    files = {"dapp/__init__.py": "", **{f"dapp/m{i}.py": f"def f():\n    return {i}\n" for i in range(30)}}
    project = make_project(tmp_path / "proj", files, table='packages = ["dapp"]\n')
    ov = overlay.install(packages=["dapp"], trusted_keys=str(trusted_keys_file), store=str(tmp_path / "store"),
                         listen="127.0.0.1:0", code_cache=False)
    try:
        config = load_config(project, key=str(Path(signing_key.path)))
        yield ov, config, f"http://127.0.0.1:{ov.address[1]}"
    finally:
        ov.uninstall()


def test_second_push_is_a_small_delta_and_goes_live(served, signing_key):
    ov, config, url = served
    bases = BaseCache(None)
    with Remote(url, app_id=config.app_id, key=signing_key) as remote:
        first = push_once(remote, config, bases=bases)
        (config.root / "dapp" / "m3.py").write_text("def f():\n    return 'three'\n")
        second = push_once(remote, config, bases=bases)
    assert not first.delta and second.delta
    assert second.bytes_sent < first.bytes_sent
    assert second.report["changed"] == ["dapp.m3"]
    import dapp.m3

    assert dapp.m3.f() == "three" and ov.version == 2


def test_push_against_a_parent_the_server_does_not_run_falls_back_to_full(served, signing_key):
    ov, config, url = served
    with Remote(url, app_id=config.app_id, key=signing_key) as remote:
        push_once(remote, config, bases=BaseCache(None))
        (config.root / "dapp" / "m4.py").write_text("def f():\n    return 'four'\n")
        second = push_once(remote, config, bases=BaseCache(None))

        class OutOfDate(BaseCache):
            """A cache that hands out the manifest of version 1, whatever the server runs now."""

            def get(self, digest):
                return ParentManifest.from_manifest(ov.store.load(1).manifest_bytes)

        (config.root / "dapp" / "m5.py").write_text("def f():\n    return 'five'\n")
        third = push_once(remote, config, bases=OutOfDate(None))
    assert second.version == 2 and third.version == 3
    assert not third.delta  # packed against v1, refused as parent_missing, sent again in full
    history = [(e["version"], e["outcome"], e["code"]) for e in ov.history()]
    assert (None, "failed", "parent_missing") in history and history[-1][:2] == (3, "ok")
    import dapp.m5

    assert dapp.m5.f() == "five"
