"""The registry: a slot per live process, the lowest free one, freed when its process ends."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from overlay.cluster.registry import Registry
from overlay.errors import ConfigError


def test_each_process_takes_the_lowest_free_slot_and_a_freed_one_is_taken_again(tmp_path):
    store = tmp_path / "store"
    first, second = Registry(store, root=tmp_path / "rt"), Registry(store, root=tmp_path / "rt")
    a = first.create({"listen": None})
    b = second.create({"listen": "127.0.0.1:8765"})  # the same process, another holder: like another process
    assert (a.id, b.id) == ("w0", "w1")
    assert [e.id for e in first.live()] == ["w0", "w1"] and b.info()["listen"] == "127.0.0.1:8765"
    first.remove(a)  # its holder is gone: the kernel would release the lock the same way
    assert [e.id for e in second.live()] == ["w1"] and not a.alive()
    again = Registry(store, root=tmp_path / "rt").create({})
    assert again.id == "w0" and again.tree == a.tree  # a restart finds its tree where it was


def test_every_store_meets_by_its_real_path(tmp_path):
    (tmp_path / "store").mkdir()
    os.symlink(tmp_path / "store", tmp_path / "alias")
    assert Registry(tmp_path / "store", root=tmp_path / "rt").root == Registry(tmp_path / "alias", root=tmp_path / "rt").root
    assert Registry(tmp_path / "other", root=tmp_path / "rt").root != Registry(tmp_path / "store", root=tmp_path / "rt").root


def test_a_registry_directory_others_could_write_is_refused(tmp_path):
    root = tmp_path / "rt"
    root.mkdir(mode=0o700)
    registry = Registry(tmp_path / "store", root=root)
    registry.root.mkdir()
    os.chmod(registry.root, 0o777)
    with pytest.raises(ConfigError) as refused:
        registry.create({})
    assert "not a private directory" in refused.value.message and "HABANERO_RUNTIME_DIR" in refused.value.message
    os.chmod(registry.root, stat.S_IRWXU)
    assert registry.create({}).id == "w0"


def test_a_runtime_path_too_long_for_a_socket_is_refused_with_what_to_do(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    os.chmod(deep, 0o700)
    with pytest.raises(ConfigError) as refused:
        Registry(tmp_path / "store", root=deep).create({})
    assert "too long a path for a Unix socket" in refused.value.message


def test_a_lock_a_forked_child_kept_from_a_probe_does_not_make_a_free_slot_look_live(tmp_path):
    registry = Registry(tmp_path / "store", root=tmp_path / "rt")
    registry.remove(registry.create({}))
    phantom = os.open(registry.root / "w0.lock", os.O_RDWR)
    fcntl.flock(phantom, fcntl.LOCK_SH)  # what a child forked during a probe would keep
    try:
        assert registry.live() == []  # no process lives there
        assert Registry(tmp_path / "store", root=tmp_path / "rt").create({}).id == "w1"  # nor can one take it
    finally:
        os.close(phantom)


def test_the_registry_directory_is_held_against_tmp_cleaners_while_a_process_uses_it(tmp_path):
    registry = Registry(tmp_path / "store", root=tmp_path / "rt")
    entry = registry.create({})
    probe = os.open(registry.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(BlockingIOError):  # systemd-tmpfiles takes this lock before it ages a directory
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        registry.remove(entry)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once no process uses it
    finally:
        os.close(probe)


def test_processes_whose_environments_differ_meet_where_the_store_says(tmp_path, monkeypatch, caplog):
    store = tmp_path / "store"
    store.mkdir()
    short = Path(tempfile.mkdtemp(prefix="hb-"))  # socket paths must stay short
    first = second = None
    try:
        for name in ("a", "b", "c"):
            (short / name).mkdir(mode=0o700)
        monkeypatch.delenv("HABANERO_RUNTIME_DIR", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(short / "a"))
        first = Registry(store)
        first.create({})
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(short / "b"))  # another service, another environment
        second = Registry(store)
        assert second.root == first.root and second.create({}).id == "w1"  # they meet: a push reaches both
        monkeypatch.setenv("HABANERO_RUNTIME_DIR", str(short / "c"))  # told otherwise: obeyed, and said
        assert Registry(store).root.parent == short / "c"
        assert "give every process of the app the same HABANERO_RUNTIME_DIR" in caplog.text
    finally:
        for registry in (first, second):
            if registry is not None:
                registry.release()
        shutil.rmtree(short)

