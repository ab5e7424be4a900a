"""Fixtures for the push transaction: a probe module the snippets report to, and a deployment.

``deploy`` is an overlay serving ``upapp`` from an empty store in the test's temporary directory;
scenarios are pushed to it from ``snippets/<scenario>/<version>/`` (see ``support.upgrade``).
Import state, ``linecache`` and the ``HABANERO_*`` environment are put back after every test, and
the overlay is uninstalled even when the test fails.
"""

from __future__ import annotations

import linecache
import types
from collections.abc import Iterator

import pytest
from support.upgrade import APP, Deployment, make_probe

import overlay


@pytest.fixture
def probe(import_state: None) -> types.ModuleType:
    return make_probe()


@pytest.fixture
def deploy(probe, tmp_path, trusted_keys_file, signing_key, monkeypatch) -> Iterator[Deployment]:
    """An overlay serving ``upapp`` from an empty store in ``tmp_path``; uninstalled afterwards."""
    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE", "CODE_CACHE", "SYNC"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)
    saved_lines = dict(linecache.cache)
    ov = overlay.install(packages=[APP], trusted_keys=trusted_keys_file, store=tmp_path / "store")
    try:
        yield Deployment(ov, signing_key)
    finally:
        ov.uninstall()
        linecache.cache.clear()
        linecache.cache.update(saved_lines)
