"""The mirror: paths derived from ``__file__`` in a source tree reach the project's own files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.bundle import Bundle, open_bundle
from overlay.storage.mirror import Mirror, homes_of
from overlay.storage.tree import SourceTree
from overlay.store import Store


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A Django-like project: the served package ``app`` beside the files the app finds through
    ``BASE_DIR = Path(__file__).resolve().parent.parent``; the store inside it, as by default."""
    root = tmp_path / "project"
    (root / "app").mkdir(parents=True)
    (root / "app" / "__init__.py").write_text("")
    (root / "db.sqlite3").write_bytes(b"the project's database")
    (root / ".env").write_text("SECRET=project\n")
    (root / "media").mkdir()
    (root / "mysite").mkdir()
    (root / "mysite" / "settings.py").write_text("")
    (root / "manage.py").write_text("")
    return root


@pytest.fixture
def store(project: Path, trusted) -> Iterator[Store]:
    with Store.open(project / ".habanero", trusted=trusted, app_id="app") as opened:
        yield opened


@pytest.fixture
def version(store: Store, make_bundle, trusted) -> Callable[..., Bundle]:
    """``version(n, files)``: bundle ``n`` of ``app``, committed to the store."""

    def make(number: int, files: dict[str, tuple[str, bytes]] | None = None) -> Bundle:
        files = files or {"app": ("package", f"V = {number}\n".encode()),
                          "app/data.txt": ("data", f"data of v{number}\n".encode())}
        bundle = open_bundle(make_bundle(files, version=number), trusted, app_id="app")
        store.check_fresh(bundle)
        store.stage(bundle)
        store.commit(bundle)
        return bundle

    return make


def tree_in(store: Store, root: Path, homes: dict[str, str], packages: tuple[str, ...] = ("app",)) -> SourceTree:
    return store.source_tree(root, mirror=Mirror(homes, packages=packages, avoid=[str(store.path)]))


def base_dir(tree: SourceTree) -> Path:
    """What Django's settings compute from a served module's ``__file__``."""
    return (tree.root / "app" / "__init__.py").resolve().parent.parent


def test_a_path_derived_from_file_in_the_tree_reaches_the_projects_files(project, store, version, tmp_path):
    tree = tree_in(store, tmp_path / "w0" / "tree", {"app": str(project)})
    v1 = version(1)
    tree.lay_out(v1)
    base = base_dir(tree)
    assert (base / "db.sqlite3").read_bytes() == b"the project's database"
    assert (base / ".env").read_text() == "SECRET=project\n"
    assert (base / "mysite" / "settings.py").samefile(project / "mysite" / "settings.py")
    (base / "media" / "upload.png").write_bytes(b"png")
    assert (project / "media" / "upload.png").read_bytes() == b"png"
    # The served package is the tree's own: the pushed version's, not the project's.
    assert not (tree.root / "app").is_symlink()
    assert (base / "app" / "data.txt").read_text() == "data of v1\n"


def test_a_file_added_to_the_project_is_linked_at_the_next_push(project, store, version, tmp_path):
    tree = tree_in(store, tmp_path / "w0" / "tree", {"app": str(project)})
    v1 = version(1)
    tree.lay_out(v1)
    for directory in (project, tree.root):  # settled long ago: the next refresh remembers them
        os.utime(directory, (1_000_000_000, 1_000_000_000))
    v2 = version(2)
    tree.update(v1, v2)
    (project / "uploads.json").write_text("[]")
    tree.update(v2, version(3))
    assert (base_dir(tree) / "uploads.json").read_text() == "[]"


def test_a_link_whose_file_left_the_project_creates_it_in_the_project_again(project, store, version, tmp_path):
    tree = tree_in(store, tmp_path / "w0" / "tree", {"app": str(project)})
    v1 = version(1)
    tree.lay_out(v1)
    (project / "db.sqlite3").unlink()
    tree.update(v1, version(2))
    (base_dir(tree) / "db.sqlite3").write_bytes(b"created again")
    assert (project / "db.sqlite3").read_bytes() == b"created again"


def test_links_follow_the_project_when_it_moves(project, store, version, tmp_path):
    # A new release directory (/srv/app/releases/124) with the store kept elsewhere.
    tree_root = tmp_path / "w0" / "tree"
    v1 = version(1)
    tree_in(store, tree_root, {"app": str(project)}).lay_out(v1)
    moved = tmp_path / "release-2"
    moved.mkdir()
    (moved / "db.sqlite3").write_bytes(b"the new release's database")
    tree = tree_in(store, tree_root, {"app": str(moved)})
    tree.lay_out(v1)  # a restart
    assert (base_dir(tree) / "db.sqlite3").read_bytes() == b"the new release's database"
    assert os.readlink(tree_root / ".env") == str(moved / ".env"), "a name the new home lacks points into it"


def test_the_store_and_the_runtime_directory_inside_the_project_are_not_linked(project, store, version):
    # .habanero holds the store and, here, the trees themselves: a link to it would be a loop.
    tree = tree_in(store, project / ".habanero" / "run" / "w0" / "tree", {"app": str(project)})
    tree.lay_out(version(1))
    assert not (tree.root / ".habanero").exists()
    assert (tree.root / "db.sqlite3").is_symlink()


def test_a_file_the_app_wrote_into_the_tree_root_is_never_replaced_by_a_link(project, store, version, tmp_path,
                                                                             caplog):
    tree = tree_in(store, tmp_path / "w0" / "tree", {"app": str(project)})
    tree.root.mkdir(parents=True)
    (tree.root / "db.sqlite3").write_bytes(b"made by an app before the mirror existed")
    with caplog.at_level(logging.WARNING, logger="overlay.store"):
        tree.lay_out(version(1))
    assert (tree.root / "db.sqlite3").read_bytes() == b"made by an app before the mirror existed"
    assert any("db.sqlite3" in r.getMessage() and "hides" in r.getMessage() for r in caplog.records)


def test_the_first_packages_home_wins_a_name_two_homes_have(project, store, version, tmp_path, make_bundle, trusted):
    other = tmp_path / "lib"
    (other / "tools").mkdir(parents=True)
    (other / "db.sqlite3").write_bytes(b"another database")
    (other / "only-here.txt").write_text("lib")
    tree = tree_in(store, tmp_path / "w0" / "tree", {"app": str(project), "tools": str(other)},
                   packages=("app", "tools"))
    tree.lay_out(version(1))
    assert (tree.root / "db.sqlite3").read_bytes() == b"the project's database"
    assert (tree.root / "only-here.txt").read_text() == "lib"
    assert not (tree.root / "tools").exists(), "a served package is never linked"


def test_a_linked_name_that_becomes_a_served_package_is_laid_out_as_one(project, store, version, tmp_path):
    (project / "tools").mkdir()
    (project / "tools" / "__init__.py").write_text("ON_DISK = True\n")
    tree_root = tmp_path / "w0" / "tree"
    tree_in(store, tree_root, {"app": str(project)}).lay_out(version(1))
    assert (tree_root / "tools").is_symlink()
    tree = tree_in(store, tree_root, {"app": str(project), "tools": str(project)}, packages=("app", "tools"))
    v2 = version(2, {"app": ("package", b""), "tools": ("package", b"PUSHED = True\n")})
    tree.lay_out(v2)
    assert not (tree_root / "tools").is_symlink()
    assert (tree_root / "tools" / "__init__.py").read_text() == "PUSHED = True\n"
    assert (project / "tools" / "__init__.py").read_text() == "ON_DISK = True\n"


def test_a_packages_home_is_the_sys_path_directory_it_is_found_in(project, tmp_path, monkeypatch, import_state):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "single.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.syspath_prepend(str(project))
    assert homes_of(["app", "single", "nowhere_on_disk"]) == {"app": str(project), "single": str(tmp_path / "lib")}


def test_links_the_app_made_at_the_tree_root_are_never_rewritten_or_removed(project, store, version, tmp_path):
    tree = tree_in(store, tmp_path / "w0" / "tree", {"app": str(project)})
    v1 = version(1)
    tree.lay_out(v1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "current").write_text("the app's own")
    os.symlink(elsewhere / "current", tree.root / "current")  # shaped like one of the mirror's links
    os.symlink(elsewhere / "current", tree.root / "app.py")  # named like a served module
    os.symlink(elsewhere / "current", tree.root / "db.sqlite3.bak")
    os.unlink(tree.root / ".env")
    os.symlink(elsewhere / "current", tree.root / ".env")  # one of ours, re-pointed by the app

    tree.update(v1, version(2))
    tree.lay_out(version(3))  # and a restart

    for name in ("current", "app.py", "db.sqlite3.bak", ".env"):
        assert os.readlink(tree.root / name) == str(elsewhere / "current"), name
    assert os.readlink(tree.root / "media") == str(project / "media")  # ours: still there
