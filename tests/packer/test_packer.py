"""packer's library side: settings resolution, collecting sources, building and inspecting bundles."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.e2e import make_project as make_example_project
from support.project import SHOP, age, make_project, write_files

import packer.build
import packer.cli
import packer.collect
import packer.config
from overlay.bundle import ParentManifest, Limits, build_bundle, bundle_digest, open_bundle
from overlay.errors import BadEntryName, ConfigError, HabaneroError, TooLarge
from packer._warm import WarmBuilder
from packer.build import build, builder_info, inspect_bundle, sources_of
from packer.collect import SourceSnapshot, collect
from packer.config import ProjectConfig, load_config


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HABANERO_* from the outside, and a HOME without ~/.ssh/id_ed25519."""
    for name in list(os.environ):
        if name.startswith("HABANERO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    return root


def config_for(root: Path, **overrides) -> ProjectConfig:
    return load_config(root, **overrides)


# ---------------------------------------------------------------------------------- settings


def test_public_names_are_pinned() -> None:
    assert packer.config.__all__ == ["ProjectConfig", "find_project", "load_config", "locate_package"]
    assert packer.collect.__all__ == ["Changes", "SourceSnapshot", "collect"]
    assert packer.build.__all__ == ["BuiltBundle", "Inspection", "build", "builder_info", "inspect_bundle"]
    assert packer.cli.__all__ == ["main"]


def test_app_id_resolves_flag_then_env_then_pyproject_then_first_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path / "p", table='packages = ["shop"]\napp_id = "from-pyproject"\n')
    monkeypatch.setenv("HABANERO_APP_ID", "from-env")
    assert load_config(root, app_id="from-flag").app_id == "from-flag"
    assert load_config(root).app_id == "from-env"
    monkeypatch.delenv("HABANERO_APP_ID")
    assert load_config(root).app_id == "from-pyproject"
    make_project(root, {}, table='packages = ["shop"]\n')
    assert load_config(root).app_id == "shop"


def test_packages_resolve_flag_then_env_then_pyproject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path / "p", {**SHOP, "other/__init__.py": "", "tool.py": "X = 1\n"})
    monkeypatch.setenv("HABANERO_PACKAGES", " other , tool.py ,")
    assert load_config(root, packages=["tool.py"]).packages == ("tool",)
    assert load_config(root).packages == ("other", "tool")
    monkeypatch.delenv("HABANERO_PACKAGES")
    assert load_config(root).packages == ("shop",)


def test_key_resolves_flag_then_env_then_pyproject_then_project_key_then_ssh_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path / "p", table='packages = ["shop"]\nkey = "keys/deploy"\n')
    monkeypatch.setenv("HABANERO_KEY", "~/env_key")
    home = Path(os.environ["HOME"])
    assert load_config(root, key="flag_key").key == Path.cwd() / "flag_key"
    assert load_config(root).key == home / "env_key"
    monkeypatch.delenv("HABANERO_KEY")
    assert load_config(root).key == root / "keys" / "deploy"

    make_project(root, {}, table='packages = ["shop"]\n')
    assert load_config(root).key is None  # neither default exists
    write_files(home, {".ssh/id_ed25519": "x"})
    assert load_config(root).key == home / ".ssh" / "id_ed25519"
    write_files(root, {".habanero/deploy_key": "x"})
    assert load_config(root).key == root / ".habanero" / "deploy_key"


def test_missing_key_error_says_the_ssh_default_does_not_exist(project: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(project).require_key()
    assert "~/.ssh/id_ed25519" in err.value.message and "habanero-pack keygen" in err.value.message


def test_key_in_pyproject_expands_home(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", table='packages = ["shop"]\nkey = "~/keys/k"\n')
    assert load_config(root).key == Path(os.environ["HOME"]) / "keys" / "k"


def test_url_resolves_flag_then_env_then_pyproject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path / "p", table='packages = ["shop"]\nurl = "http://pyproject:1"\n')
    monkeypatch.setenv("HABANERO_URL", "http://env:2")
    assert load_config(root, url="http://flag:3").url == "http://flag:3"
    assert load_config(root).url == "http://env:2"
    monkeypatch.delenv("HABANERO_URL")
    assert load_config(root).url == "http://pyproject:1"


def test_ca_file_resolves_flag_then_environment_then_pyproject(tmp_path) -> None:
    project = make_example_project(tmp_path)  # a copy of the aiohttp example
    with (project.root / "pyproject.toml").open("a", encoding="utf-8") as fh:
        fh.write('ca_file = "deploy/ca.pem"\n')
    env = {"HABANERO_CA_FILE": "/etc/env-ca.pem"}
    assert load_config(project.root, environ={}).ca_file == project.root / "deploy" / "ca.pem"
    assert str(load_config(project.root, environ=env).ca_file) == "/etc/env-ca.pem"
    assert str(load_config(project.root, ca_file="/etc/flag.pem", environ=env).ca_file) == "/etc/flag.pem"


def test_project_is_found_by_walking_up_from_the_cwd(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project / "shop" / "admin")
    config = load_config()
    assert config.root == project
    assert config.sources() == {"shop": project / "shop"}


def test_packages_are_found_in_a_src_layout(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", {f"src/{k}": v for k, v in SHOP.items()})
    assert load_config(root).sources() == {"shop": root / "src" / "shop"}


@pytest.mark.parametrize(
    ("pyproject", "files", "message"),
    [
        (None, {}, "no pyproject.toml"),
        ('[project]\nname = "x"\n', {}, "no [tool.habanero] table"),
        ("[tool.habanero]\n", {}, "has no `packages`"),
        ('[tool.habanero]\npackages = ["ghost"]\n', {}, "package 'ghost' was not found: no ghost/__init__.py or ghost.py"),
        ('[tool.habanero]\npackages = ["ns"]\n', {"ns/mod.py": ""}, "has no __init__.py"),
        ('[tool.habanero]\npackages = "shop"\n', SHOP, "must be a list of names"),
        ('[tool.habanero]\npackages = []\n', SHOP, "is empty"),
        ('[tool.habanero]\npackages = ["shop", "shop"]\n', SHOP, "more than once"),
        ('[tool.habanero]\npackages = ["my-app"]\n', SHOP, "not a top-level module name"),
        ('[tool.habanero]\npackages = ["shop.cart"]\n', SHOP, "not a top-level module name"),
        ('[tool.habanero]\npackages = ["class"]\n', SHOP, "not a top-level module name"),
        ('[tool.habanero]\npackages = ["overlay"]\n', SHOP, "'overlay' is reserved"),
        ('[tool.habanero]\npackages = ["sitecustomize.py"]\n', SHOP, "'sitecustomize' is reserved"),
        ('[tool.habanero]\npackages = ["shop"]\napp_id = 7\n', SHOP, "app_id must be a str"),
        ('[tool.habanero]\npackages = ["shop"]\napp_id = "a b"\n', SHOP, "app_id 'a b' is not an app id"),
        ('[tool.habanero]\npackages = ["shop"]\nkey = ["k"]\n', SHOP, "key must be a str"),
        ('[tool.habanero]\npackages = ["shop"]\ninclude = "*.html"\n', SHOP, "include must be a list of glob"),
        ('[tool.habanero]\npackages = ["shop"]\nexclude = [1]\n', SHOP, "exclude must be a list of glob"),
        ("[tool.habanero\n", {}, "is not valid TOML"),
        ("[tool]\nhabanero = 1\n", {}, "tool.habanero must be a table"),
    ],
)
def test_bad_settings_raise_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        pyproject: str | None, files: dict, message: str) -> None:
    root = tmp_path / "p"
    root.mkdir()
    write_files(root, files)
    if pyproject is not None:
        (root / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    monkeypatch.chdir(root)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert message in err.value.message
    assert "\n" not in err.value.message


def test_project_flag_must_name_a_directory_with_a_pyproject(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no pyproject.toml; --project names"):
        load_config(tmp_path)


def test_unknown_setting_is_reported_with_a_suggestion(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_project(tmp_path / "p", table='packages = ["shop"]\nexlcude = ["*.css"]\n')
    with caplog.at_level(logging.WARNING, logger="packer"):
        load_config(root)
    assert "'exlcude'" in caplog.text and "did you mean 'exclude'?" in caplog.text


def test_a_standard_library_name_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_project(tmp_path / "p", {"json/__init__.py": ""}, table='packages = ["json"]\n')
    with caplog.at_level(logging.WARNING, logger="packer"):
        assert load_config(root).packages == ("json",)  # buildable (the benchmark ships stdlib copies)
    assert "'json' is a standard library name; the app's overlay will refuse to serve it" in caplog.text


# ------------------------------------------------------------------------------------ collect


def test_collect_names_modules_packages_and_data(project: Path) -> None:
    write_files(project, {"shop/my-scripts/tool.py": "print('not importable')\n", "shop/my-tool.py": "x\n",
                          "worker.py": "JOBS = []\n"})
    config = load_config(project, packages=["shop", "worker.py"])
    files = collect(config)
    assert {name: kind for name, (kind, _) in files.items()} == {
        "shop": "package",
        "shop.admin": "package",
        "shop.admin.views": "module",
        "shop.cart": "module",
        "shop/my-tool.py": "data",  # not an identifier: cannot be imported
        "shop/my-scripts/tool.py": "data",  # my-scripts is not an identifier: not importable either
        "shop/static/site.css": "data",
        "shop/templates/index.html": "data",
        "worker": "module",
    }
    assert files["shop.cart"] == ("module", SHOP["shop/cart.py"].encode())
    assert files["shop.admin"] == ("package", b"")


def test_a_package_below_a_directory_without_init_is_refused_it_would_import_from_the_tree(project: Path) -> None:
    write_files(project, {"shop/plugins/contrib/__init__.py": "", "shop/plugins/contrib/x.py": ""})
    with pytest.raises(BadEntryName, match=r"importable as module 'shop.plugins.contrib.__init__'.*"
                       r"add shop/plugins/contrib/__init__.py"):
        collect(load_config(project))
    write_files(project, {"shop/plugins/__init__.py": ""})
    files = collect(load_config(project))
    assert (files["shop.plugins.contrib"][0], files["shop.plugins.contrib.x"][0]) == ("package", "module")


def test_junk_never_goes_in(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_files(project, {
        "shop/__pycache__/cart.cpython-311.pyc": b"\0",
        "shop/admin/__pycache__/views.cpython-311.pyc": b"\0",
        "shop/stray.pyc": b"\0",
        "shop/stray.pyo": b"\0",
        "shop/.cart.py.swp": b"\0",
        "shop/cart.py.swo": b"\0",
        "shop/cart.py~": "old",
        "shop/.#cart.py": "lock",
        "shop/#cart.py#": "autosave",
        "shop/.env": "SECRET=1",
        "shop/.hidden/mod.py": "",
        "shop/.git/HEAD": "ref: refs/heads/main",
        "shop/_speedups.cpython-311-x86_64-linux-gnu.so": b"\x7fELF",
        "shop/native.pyd": b"MZ",
        "shop/hook.pth": "import os",
    })
    with caplog.at_level(logging.WARNING, logger="packer"):
        files = collect(load_config(project))
    assert sorted(files) == sorted(["shop", "shop.admin", "shop.admin.views", "shop.cart",
                                    "shop/static/site.css", "shop/templates/index.html"])
    warning = caplog.text
    assert "skipped 3 files" in warning
    for name in ("shop/_speedups.cpython-311-x86_64-linux-gnu.so", "shop/native.pyd", "shop/hook.pth"):
        assert name in warning


def test_include_and_exclude_globs_filter_data_files_only(tmp_path: Path) -> None:
    table = 'packages = ["shop"]\ninclude = ["*.html", "shop/static/**"]\nexclude = ["shop/static/big/*"]\n'
    root = make_project(tmp_path / "p", {**SHOP, "shop/static/big/video.mp4": b"\0" * 10,
                                         "shop/static/img/logo.svg": "<svg/>", "shop/notes.txt": "x"},
                        table=table)
    files = collect(load_config(root))
    data = sorted(n for n, (kind, _) in files.items() if kind == "data")
    assert data == ["shop/static/img/logo.svg", "shop/static/site.css", "shop/templates/index.html"]
    assert "shop.cart" in files  # modules always ship


def test_excluded_data_is_never_read(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", {**SHOP, "shop/huge.bin": b"\0" * 100},
                        table='packages = ["shop"]\nexclude = ["*.bin"]\n')
    snapshot = SourceSnapshot(load_config(root))
    snapshot.refresh()
    assert snapshot.reads == len(SHOP)


def test_collect_is_deterministic_whatever_the_creation_order(tmp_path: Path) -> None:
    a = make_project(tmp_path / "a", dict(SHOP))
    b = make_project(tmp_path / "b", dict(reversed(list(SHOP.items()))))
    files_a, files_b = collect(load_config(a)), collect(load_config(b))
    assert list(files_a) == list(files_b) == sorted(files_a)
    assert files_a == files_b


def test_symlinked_file_inside_the_project_is_followed(project: Path) -> None:
    write_files(project, {"shared/banner.txt": "hello\n"})
    (project / "shop" / "banner.txt").symlink_to(project / "shared" / "banner.txt")
    assert collect(load_config(project))["shop/banner.txt"] == ("data", b"hello\n")


def test_symlink_escaping_the_project_is_refused(project: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("password")
    (project / "shop" / "secret.txt").symlink_to(outside)
    with pytest.raises(ConfigError, match="shop/secret.txt is a symlink to .*outside the project"):
        collect(load_config(project))


def test_symlinked_directory_loop_is_skipped(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    (project / "shop" / "admin" / "loop").symlink_to(project / "shop")
    with caplog.at_level(logging.WARNING, logger="packer"):
        files = collect(load_config(project))
    assert "symlink loop" in caplog.text
    assert "shop.admin.views" in files


def test_names_the_bundle_would_refuse_fail_at_collect_time_naming_the_file(project: Path) -> None:
    write_files(project, {"shop/templates/résumé.html": "<p>"})
    with pytest.raises(BadEntryName, match="cannot ship shop/templates/résumé.html: .*non-ASCII"):
        collect(load_config(project))


def test_module_and_package_of_the_same_name_is_an_error(project: Path) -> None:
    write_files(project, {"shop/admin.py": "X = 1\n"})
    with pytest.raises(ConfigError, match="shop/admin.py and shop/admin/__init__.py both define"):
        collect(load_config(project))


def test_a_file_over_the_entry_limit_fails_before_it_is_read(project: Path) -> None:
    write_files(project, {"shop/static/blob.bin": b"\0" * 2048})
    snapshot = SourceSnapshot(load_config(project), limits=Limits(max_entry_bytes=1024))
    with pytest.raises(TooLarge, match="shop/static/blob.bin is 2048 bytes"):
        snapshot.refresh()


def test_a_file_that_vanishes_during_the_scan_is_left_out(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_lstat = os.lstat
    victim = str(project / "shop" / "cart.py")

    def lstat(path, *args, **kwargs):
        if os.fspath(path) == victim:  # deleted between the directory listing and the stat
            raise FileNotFoundError(2, "No such file or directory", victim)
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(packer.collect.os, "lstat", lstat)
    files = collect(load_config(project))
    assert "shop.cart" not in files and "shop.admin.views" in files


# ------------------------------------------------------------------------- incremental refresh


@pytest.fixture
def snapshot(project: Path) -> SourceSnapshot:
    age(project)
    snap = SourceSnapshot(load_config(project))
    first = snap.refresh()
    assert first.read == len(SHOP) and set(first.added) == set(snap.files())
    return snap


def test_refresh_without_changes_reads_nothing(snapshot: SourceSnapshot) -> None:
    changes = snapshot.refresh()
    assert changes.read == 0 and not changes


def test_refresh_trusts_stat_and_rereads_once_it_changes(snapshot: SourceSnapshot, project: Path) -> None:
    cart = project / "shop" / "cart.py"
    before = cart.stat()
    cart.write_text(SHOP["shop/cart.py"].replace("sum", "max"))  # same size
    os.utime(cart, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    unchanged = snapshot.refresh()
    assert unchanged.read == 0 and not unchanged
    assert b"sum" in snapshot.files()["shop.cart"][1]  # the stale bytes: the file was not re-read

    os.utime(cart)  # touch
    changed = snapshot.refresh()
    assert changed.read == 1 and changed.modified == ("shop.cart",)
    assert b"max" in snapshot.files()["shop.cart"][1]


def test_a_file_written_within_the_settle_window_is_reread_even_with_unchanged_stat(
        snapshot: SourceSnapshot, project: Path) -> None:
    cart = project / "shop" / "cart.py"
    cart.write_text("A = 1\n")
    first = snapshot.refresh()
    assert first.read == 1
    st = cart.stat()
    cart.write_text("B = 2\n")  # a second save in the same timestamp tick, same size
    os.utime(cart, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = snapshot.refresh()
    assert second.read == 1 and second.modified == ("shop.cart",)
    assert snapshot.files()["shop.cart"][1] == b"B = 2\n"


def test_refresh_with_changed_paths_reads_only_those(snapshot: SourceSnapshot, project: Path) -> None:
    (project / "shop" / "cart.py").write_text("def total(items):\n    return 0\n")
    (project / "shop" / "admin" / "views.py").write_text("def index():\n    return 'v2'\n")
    changes = snapshot.refresh({project / "shop" / "cart.py"})
    assert changes.read == 1 and changes.modified == ("shop.cart",)
    assert b"admin" in snapshot.files()["shop.admin.views"][1]  # not told, not looked at


def test_saving_the_same_bytes_is_not_a_change(snapshot: SourceSnapshot, project: Path) -> None:
    cart = project / "shop" / "cart.py"
    cart.write_text(SHOP["shop/cart.py"])
    changes = snapshot.refresh({cart})
    assert changes.read == 1 and not changes


def test_refresh_with_changed_paths_sees_added_and_removed_files_and_dirs(
        snapshot: SourceSnapshot, project: Path) -> None:
    write_files(project, {"shop/api/__init__.py": "", "shop/api/v1.py": "X = 1\n"})
    (project / "shop" / "cart.py").unlink()
    changes = snapshot.refresh({project / "shop" / "api", project / "shop" / "cart.py"})
    assert sorted(changes.added) == ["shop.api", "shop.api.v1"]
    assert changes.removed == ("shop.cart",)

    shutil.rmtree(project / "shop" / "admin")
    gone = snapshot.refresh({project / "shop" / "admin"})
    assert sorted(gone.removed) == ["shop.admin", "shop.admin.views"]


def test_adding_an_init_turns_data_files_into_modules(snapshot: SourceSnapshot, project: Path) -> None:
    plugins = project / "shop" / "plugins"
    write_files(project, {"shop/plugins/x.py": "X = 1\n"})
    with pytest.raises(BadEntryName, match="importable as module 'shop.plugins.x'"):
        snapshot.refresh({plugins / "x.py"})
    (plugins / "x.py").rename(plugins / "x.py-tpl")
    assert snapshot.refresh({plugins / "x.py", plugins / "x.py-tpl"}).added == ("shop/plugins/x.py-tpl",)
    write_files(project, {"shop/plugins/__init__.py": "", "shop/plugins/x.py": "X = 1\n"})
    changes = snapshot.refresh({plugins / "__init__.py", plugins / "x.py"})
    assert sorted(changes.added) == ["shop.plugins", "shop.plugins.x"]


def test_changed_paths_outside_the_packages_or_junk_cost_nothing(
        snapshot: SourceSnapshot, project: Path) -> None:
    write_files(project, {"README.md": "x", "shop/.cart.py.swp": b"\0", "shop/__pycache__/c.pyc": b"\0"})
    changes = snapshot.refresh({project / "README.md", project / "shop" / ".cart.py.swp",
                                project / "shop" / "__pycache__" / "c.pyc"})
    assert changes.read == 0 and not changes


def test_removing_the_package_init_is_a_config_error(snapshot: SourceSnapshot, project: Path) -> None:
    (project / "shop" / "__init__.py").unlink()
    with pytest.raises(ConfigError, match="has no __init__.py"):
        snapshot.refresh({project / "shop" / "__init__.py"})
    write_files(project, {"shop/__init__.py": "VERSION = 2\n"})
    assert snapshot.refresh({project / "shop" / "__init__.py"}).modified == ("shop",)


def test_a_save_keeps_every_entry_it_did_not_change_as_the_same_object(snapshot: SourceSnapshot,
                                                                      project: Path) -> None:
    before = snapshot.files()
    write_files(project, {"shop/cart.py": "def total(items):\n    return 0\n"})
    changes = snapshot.refresh({project / "shop" / "cart.py"})
    after = snapshot.files()
    assert changes.modified == ("shop.cart",)
    assert [name for name in after if after[name] is not before[name]] == ["shop.cart"]  # what the watch relies on


def test_a_save_after_a_refused_refresh_still_takes_what_that_refresh_read(snapshot: SourceSnapshot,
                                                                          project: Path) -> None:
    write_files(project, {"shop/cart.py": "def total(items):\n    return 0\n"})
    (project / "shop" / "__init__.py").unlink()
    with pytest.raises(ConfigError, match="has no __init__.py"):
        snapshot.refresh({project / "shop" / "cart.py", project / "shop" / "__init__.py"})
    write_files(project, {"shop/__init__.py": "VERSION = 2\n"})
    changes = snapshot.refresh({project / "shop" / "__init__.py"})
    assert set(changes.modified) == {"shop", "shop.cart"}
    assert snapshot.files()["shop.cart"][1] == b"def total(items):\n    return 0\n"


# -------------------------------------------------------------------------------------- build


@pytest.mark.slow
def test_build_writes_a_bundle_that_verifies(project: Path, signing_key, trusted) -> None:
    built = build(load_config(project), version=3, signer=signing_key)
    bundle = open_bundle(built.data, trusted, app_id="shop")
    assert bundle.version == built.version == 3
    assert bundle.digest == built.digest == inspect_bundle(built.data).digest
    assert built.entries == len(bundle.entries) == 6
    assert bundle.read("shop.cart") == SHOP["shop/cart.py"].encode()
    assert built.size == len(built.data) and built.key_id == signing_key.key_id
    assert built.uncompressed_size == sum(len(v) for v in SHOP.values())
    assert set(built.timings) == {"collect", "metadata", "bundle", "total"}


@pytest.mark.slow
def test_build_records_parent_and_builder(project: Path, signing_key) -> None:
    parent = "ab" * 32
    built = build(load_config(project), version=2, signer=signing_key, parent=parent)
    assert built.manifest["parent"] == parent
    builder = built.manifest["builder"]
    assert set(builder) == {"user", "host", "git_commit", "git_dirty", "habanero", "sources"}
    assert builder["habanero"] == "0.1.0"
    assert builder["git_commit"] is None and builder["git_dirty"] is None  # not a git checkout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_builder_names_the_git_commit_and_whether_the_tree_is_dirty(project: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, text=True,
                              env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                   "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    info = builder_info(project)
    assert info["git_commit"] == git("rev-parse", "HEAD").strip() and info["git_dirty"] is False
    (project / "shop" / "cart.py").write_text("X = 2\n")
    assert builder_info(project)["git_dirty"] is True


def test_build_from_a_snapshot_reads_nothing_again(project: Path, signing_key) -> None:
    age(project)
    config = load_config(project)
    snapshot = SourceSnapshot(config)
    snapshot.refresh()
    reads = snapshot.reads
    built = build(config, version=1, signer=signing_key, snapshot=snapshot, builder={"user": "ci"})
    assert snapshot.reads == reads and built.timings["collect"] < 5
    assert built.manifest["builder"] == {"user": "ci", "sources": sources_of(snapshot.files())}


@pytest.mark.slow
def test_write_replaces_the_file_atomically(project: Path, signing_key) -> None:
    built = build(load_config(project), version=1, signer=signing_key)
    out = project / "out.hbn"
    out.write_bytes(b"old")
    built.write(out)
    assert out.read_bytes() == built.data
    assert [p.name for p in project.iterdir() if p.name.startswith(".out.hbn")] == []


def test_a_py_file_importable_through_a_directory_without_init_is_refused_naming_the_fix(project: Path) -> None:
    write_files(project, {"shop/scripts/tool.py": "print('imported from the tree')\n"})
    with pytest.raises(BadEntryName, match=r"cannot ship shop/scripts/tool.py: .*importable as module "
                       r"'shop.scripts.tool'.*add shop/scripts/__init__.py.*or rename it"):
        collect(load_config(project, packages=["shop"]))


# ------------------------------------------------------------------------------- warm builds

CREATED = "2030-01-02T03:04:05.000006Z"
# Each step edits the project on disk (None deletes); the warm build must match a cold one each time.
STEPS = [
    {},
    {"shop/cart.py": "def total(items):\n    return 0\n"},  # a save
    {"shop/cart.py": "def total(items):\n    return 0\n", "shop/admin/views.py": "X = 'é'\n"},  # one of two
    {"shop/orders.py": "ORDERS = []\n", "shop/static/site.css": None},  # a module added, a data file gone
    {"shop/scripts/run.sh": "echo 1\n"},  # data in a plain directory; then it becomes a package
    {"shop/scripts/__init__.py": ""},
    {},  # nothing changed: the delta carries no body
]


def test_warm_builds_write_what_build_bundle_writes_and_unpack_to_it(project: Path, signing_key, trusted) -> None:
    age(project)
    snapshot = SourceSnapshot(load_config(project))
    warm = WarmBuilder("shop", signing_key, level=1)
    builder, base, held = {"user": "ci", "host": "ünicode"}, None, {}
    for version, step in enumerate(STEPS, 1):
        for rel, text in step.items():
            (project / rel).unlink() if text is None else write_files(project, {rel: text})
        snapshot.refresh()
        files = snapshot.files()
        built, wire = warm.make(files, builder, version=version, parent=None, base=base, created=CREATED)
        cold = build_bundle(files, app_id="shop", version=version, signers=[signing_key], builder=builder,
                            created=CREATED, level=1, base=base)
        assert built.data == cold, f"step {version}"
        assert (built.digest, built.version, built.entries) == (bundle_digest(cold), version, len(files))
        held.update({hashlib.sha256(c).hexdigest(): c for _, c in files.values()})
        lookup = {base.digest: base.manifest_bytes}.get if base is not None else None
        opened = open_bundle(wire, trusted, app_id="shop", content=held.get, base_manifest=lookup)
        assert opened.raw == cold and (version == 1) == (wire is built.data)
        assert warm.sources(files) == warm.sources(dict(files))
        base = ParentManifest.from_manifest(built.manifest_bytes)
    assert opened.manifest["payload"]["included"] == []


def test_a_warm_build_refuses_an_entry_over_the_limit_naming_it(project: Path, signing_key) -> None:
    files = collect(load_config(project))
    warm = WarmBuilder("shop", signing_key, level=1, limits=Limits(max_entry_bytes=39))
    with pytest.raises(TooLarge, match="'shop.cart' is 40 bytes, over the 39 byte limit"):
        warm.make(files, {}, version=1, parent=None)


# ------------------------------------------------------------------------------------ inspect


@pytest.mark.slow
def test_inspect_without_trusted_keys_checks_nothing_and_lists_claimed_keys(project: Path, signing_key) -> None:
    data = build(load_config(project), version=1, signer=signing_key).data
    report = inspect_bundle(data)
    assert not report.checked and not report.verified
    assert report.claimed_key_ids == (signing_key.key_id,)
    assert report.manifest["app_id"] == "shop"


@pytest.mark.slow
def test_inspect_with_trusted_keys_verifies_or_keeps_the_refusal(project: Path, signing_key, other_key,
                                                                trusted) -> None:
    good = build(load_config(project), version=1, signer=signing_key).data
    assert inspect_bundle(good, trusted).verified_by == (signing_key.key_id,)
    foreign = build(load_config(project), version=1, signer=other_key).data
    refused = inspect_bundle(foreign, trusted)
    assert refused.refusal is not None and refused.refusal.code == "unknown_key"
    assert refused.manifest["version"] == 1  # still shown


def test_inspect_of_garbage_raises_a_habanero_error(trusted) -> None:
    with pytest.raises(HabaneroError) as err:
        inspect_bundle(b"not a bundle at all", trusted)
    assert err.value.code == "unknown_format"


@pytest.mark.slow  # build() asks git who built it
def test_the_sources_digest_is_the_same_for_the_same_code_whoever_builds_it(project: Path, signing_key) -> None:
    # A one-off build and the watch's warm builder name the same code with the same digest, and a
    # manifest names it too: that is how a push of the code the app runs knows to send nothing.
    from packer.build import sources_of_manifest

    config = load_config(project)
    files = collect(config)
    built = build(config, version=1, signer=signing_key)
    warm = WarmBuilder(config.app_id, signing_key, level=1)
    assert built.sources == sources_of(files) == warm.sources(files) == sources_of_manifest(built.manifest_bytes)
    changed = {**files, "shop.cart": ("module", b"X = 'other'\n")}
    assert sources_of(changed) != built.sources
