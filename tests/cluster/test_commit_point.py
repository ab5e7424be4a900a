"""The driving process's commit point: what the store says decides, even when the store raised."""

from __future__ import annotations

import sys

import pytest
from support.cluster import APP, app_bundle

from overlay.errors import ActivationFailed


def greet() -> str:
    return sys.modules[APP].greet()


def test_a_store_that_fails_before_its_commit_point_leaves_every_change_undone(served, signing_key, monkeypatch):
    def failing(bundle, *, action="push"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(served.store, "commit", failing)
    with pytest.raises(ActivationFailed, match="could not record it"):
        served.apply(app_bundle(signing_key, 2, "two"))
    assert greet() == "one" and served.version == 1 and served.store.pointer()[0]["version"] == 1


def test_a_store_that_raises_after_its_commit_point_keeps_the_new_version_everywhere(served, signing_key,
                                                                                      monkeypatch, caplog):
    commit = served.store.commit

    def committed_then_failed(bundle, *, action="push"):
        commit(bundle, action=action)  # the state file names the new version: committed
        raise OSError(5, "Input/output error")  # as a directory fsync after the replace can

    monkeypatch.setattr(served.store, "commit", committed_then_failed)
    report = served.apply(app_bundle(signing_key, 2, "two"))
    assert report.version == 2 and greet() == "two" and served.version == 2
    assert served.store.pointer()[0]["version"] == 2  # the process and the disk agree
    assert "committed, but the store raised after its commit point" in caplog.text
