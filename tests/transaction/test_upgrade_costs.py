"""What a push does in proportion to its change: unchanged modules are left alone, the collector
waits, and the tree is touched only where files changed."""

from __future__ import annotations

import gc
import importlib
import sys

import pytest
from support.upgrade import APP

from overlay.bundle import build_bundle

FILES = {
    APP: ("package", b""),
    f"{APP}.core": ("module", b"import gc\nSEEN = []\n"),
    **{f"{APP}.m{i}": ("module", f"X = {i}\n".encode()) for i in range(20)},
}


def push(deploy, files):
    data = build_bundle(files, app_id=APP, version=deploy.ov.store.highest + 1, signers=[deploy.key])
    return deploy.ov.apply(data)


@pytest.fixture
def running(deploy):
    push(deploy, FILES)
    for name in FILES:
        importlib.import_module(name)
    return deploy


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_waits_while_a_push_applies_and_comes_back_as_it_was(running, enabled):
    changed = {**FILES, f"{APP}.core": ("module", b"import gc\nSEEN = []\nSEEN.append(gc.isenabled())\n")}
    (gc.enable if enabled else gc.disable)()
    try:
        push(running, changed)
        assert sys.modules[f"{APP}.core"].SEEN == [False]
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_a_push_re_points_and_rewrites_only_the_module_it_changes(running):
    specs = {name: sys.modules[name].__spec__ for name in FILES}
    tree = running.ov.tree_root / APP
    inodes = {p.name: p.stat().st_ino for p in tree.iterdir()}

    report = push(running, {**FILES, f"{APP}.m7": ("module", b"X = 'seven'\n")})

    assert report.changed == [f"{APP}.m7"] and sys.modules[f"{APP}.m7"].X == "seven"
    assert [n for n in FILES if sys.modules[n].__spec__ is not specs[n]] == [f"{APP}.m7"]
    assert [p.name for p in tree.iterdir() if p.stat().st_ino != inodes[p.name]] == ["m7.py"]
    assert (tree / "m7.py").read_text() == "X = 'seven'\n"


def test_what_the_next_push_needs_from_the_active_bundle_is_built_after_the_answer(running, monkeypatch):
    # The proof's index of the active manifest and the packed form's zstd dictionary each cost a
    # pass over the whole manifest: the store's worker builds them once a push has answered.
    from overlay.format import delta as _delta

    store = running.ov.store
    store.settle()
    from overlay.format.model import UNKNOWN_SPANS

    assert store.active._spans is not UNKNOWN_SPANS, "a full push's index, built on the worker"
    assert store.active.digest in _delta._idle
    built = []
    monkeypatch.setattr(_delta, "_take", lambda *a, real=_delta._take: built.append(a[0]) or real(*a))
    gate = __import__("threading").Event()
    store.later(gate.wait)  # hold the worker: the answer does not wait for it
    try:
        push(running, {**FILES, f"{APP}.m3": ("module", b"X = 'three'\n")})
        assert built == [] and store.active.digest not in _delta._idle
    finally:
        gate.set()
    store.settle()
    assert built == [store.active.digest] and store.active.digest in _delta._idle
