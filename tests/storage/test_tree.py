"""The source tree removes only what habanero wrote: a file the app put there survives everything."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.bundle import Bundle, open_bundle
from overlay.storage import fs
from overlay.storage.mirror import Mirror
from overlay.storage.tree import SourceTree
from overlay.store import Store

V1 = {"app": ("package", b"V = 1\n"), "app.old": ("module", b"OLD = 1\n"),
      "app/templates/old.html": ("data", b"<p>old</p>\n")}
V2 = {"app": ("package", b"V = 2\n"), "app/templates/new.html": ("data", b"<p>new</p>\n")}


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "project" / ".habanero"


@pytest.fixture
def opener(store_dir: Path, trusted) -> Iterator[Callable[..., Store]]:
    opened: list[Store] = []

    def open_store(**kwargs: object) -> Store:
        store = Store.open(store_dir, trusted=trusted, app_id="app", **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def commit(make_bundle, trusted) -> Callable[..., Bundle]:
    def run(store: Store, files: dict[str, tuple[str, bytes]], version: int) -> Bundle:
        bundle = open_bundle(make_bundle(files, version=version), trusted, app_id="app")
        store.check_fresh(bundle)
        store.stage(bundle)
        store.commit(bundle)
        return bundle

    return run


def tree_of(store: Store, tmp_path: Path) -> SourceTree:
    project = tmp_path / "project"
    return store.source_tree(tmp_path / "w0" / "tree", mirror=Mirror({"app": str(project)}, packages=["app"],
                                                                      avoid=[str(store.path)]))


def test_files_the_app_wrote_into_the_tree_survive_pushes_and_restarts(opener, commit, tmp_path, caplog):
    store = opener()
    tree = tree_of(store, tmp_path)
    v1 = commit(store, V1, 1)
    tree.lay_out(v1)
    (tree.root / "db.sqlite3").write_bytes(b"the app's rows")  # BASE_DIR / "db.sqlite3", unknown to the project
    (tree.root / "app" / "cache.json").write_text("{}")  # Path(__file__).parent / "cache.json"
    v2 = commit(store, V2, 2)
    tree.update(v1, v2)
    store.close()
    with caplog.at_level(logging.WARNING, logger="overlay.store"):
        for _ in range(2):  # restarts
            reopened = opener()
            tree_of(reopened, tmp_path).lay_out(reopened.active)
            reopened.close()
    assert (tree.root / "db.sqlite3").read_bytes() == b"the app's rows"
    assert (tree.root / "app" / "cache.json").read_text() == "{}"
    assert not (tree.root / "app" / "old.py").exists()
    warned = [r.getMessage() for r in caplog.records]
    assert sum("cache.json" in m for m in warned) == 1, "warned once per file"


def test_a_tree_of_another_version_loses_only_the_files_habanero_wrote(opener, commit, tmp_path, store_dir):
    # A restarted process takes its slot's tree as the last one left it: another version's files,
    # a copy of an object (hard links fail across file systems), a temp file of an interrupted
    # write, a module whose object retention dropped since; and files the app wrote among them.
    store = opener()
    tree = tree_of(store, tmp_path)
    v1 = commit(store, V1, 1)
    tree.lay_out(v1)
    root = tree.root
    copied = root / "app" / "templates" / "copied.html"
    os.link(root / "app" / "templates" / "old.html", root / "app" / "templates" / "linked.html")
    copied.write_bytes(b"<p>old</p>\n")
    copied.chmod(0o444)
    (root / "app" / f"{fs.TMP_PREFIX}123").write_bytes(b"half")
    dropped = root / "app" / "dropped.py"
    dropped.write_bytes(b"D = 1\n")
    dropped.chmod(0o444)
    os.utime(dropped, (946684800, 946684800))
    foreign = {root / "app" / "notes.txt": b"mine", root / "app" / "uploads" / "a.png": b"png",
               root / "app" / "edited.py": b"X = 1\n", root / "app" / "readonly.bin": b"secret"}
    for path, body in foreign.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(body)
    (root / "app" / "readonly.bin").chmod(0o444)
    store.close()
    reopened = opener()
    tree = tree_of(reopened, tmp_path)
    tree.lay_out(commit(reopened, V2, 2))
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == {
        "app/__init__.py", "app/templates/new.html",
        *(str(p.relative_to(root)) for p in foreign)}
    assert all(path.read_bytes() == body for path, body in foreign.items())


def test_an_older_habaneros_tree_holding_the_apps_files_is_kept(opener, commit, store_dir, tmp_path, caplog):
    # The reported case: Django's BASE_DIR led into <store>/tree and its database was made there.
    store = opener()
    v1 = commit(store, V1, 1)
    legacy = store.source_tree(store_dir / "tree")
    legacy.lay_out(v1)
    (store_dir / "tree" / "db.sqlite3").write_bytes(b"rows")
    store.close()
    with caplog.at_level(logging.WARNING, logger="overlay.store"):
        opener().worker.settle()
    assert (store_dir / "tree" / "db.sqlite3").read_bytes() == b"rows"
    assert any("db.sqlite3" in r.getMessage() for r in caplog.records)


def test_an_older_habaneros_tree_of_its_own_files_is_removed(opener, commit, store_dir):
    store = opener()
    store.source_tree(store_dir / "tree").lay_out(commit(store, V1, 1))
    store.close()
    opener().worker.settle()
    assert not (store_dir / "tree").exists()
