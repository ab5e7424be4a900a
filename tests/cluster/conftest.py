"""Fixtures for the processes of one store: an installed overlay whose member a test talks to."""

from __future__ import annotations

import linecache
import sys
from collections.abc import Iterator

import pytest
from support.cluster import APP, app_bundle

import overlay

@pytest.fixture
def served(import_state, tmp_path, trusted_keys_file, signing_key, monkeypatch) -> Iterator[overlay.Overlay]:
    """An overlay serving ``clusterapp`` at v1 (``greet() == "one"``); uninstalled afterwards."""
    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE", "CODE_CACHE", "SYNC"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)
    saved_lines = dict(linecache.cache)
    ov = overlay.install(packages=[APP], trusted_keys=trusted_keys_file, store=tmp_path / "store")
    try:
        ov.apply(app_bundle(signing_key, 1, "one"))
        __import__(APP)
        yield ov
    finally:
        ov.uninstall()
        sys.modules.pop(APP, None)
        linecache.cache.clear()
        linecache.cache.update(saved_lines)
