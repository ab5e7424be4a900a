"""``overlay.install()`` and the ``Overlay`` handle: in this process, then in fresh interpreters."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from support.overlay import APP_V1, APP_V2, child_env, opened, populate_store, run_python, write_disk_app

import overlay
from overlay.cluster.registry import Registry
from overlay.errors import ConfigError, KeyProblem
from overlay.finder import OverlayFinder


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("PACKAGES", "TRUSTED_KEYS", "STORE", "LISTEN", "APP_ID", "DISABLE", "CODE_CACHE", "SYNC"):
        monkeypatch.delenv(f"HABANERO_{name}", raising=False)


@pytest.fixture
def handles(import_state):
    """Collects every Overlay a test makes and uninstalls it afterwards, even when the test fails."""
    made: list[overlay.Overlay] = []
    yield made
    for ov in made:
        ov.uninstall()


@pytest.fixture
def install(handles, trusted_keys_file, tmp_path):
    def do(**kwargs):
        kwargs.setdefault("packages", ["hbapp"])
        kwargs.setdefault("trusted_keys", trusted_keys_file)
        kwargs.setdefault("store", tmp_path / "store")
        ov = overlay.install(**kwargs)
        handles.append(ov)
        return ov

    return do


@pytest.fixture
def store_v1(tmp_path, trusted, make_bundle):
    populate_store(tmp_path / "store", trusted, "hbapp", make_bundle(APP_V1, app_id="hbapp", version=1))
    return tmp_path / "store"


@pytest.fixture
def disk_app(tmp_path, import_state):
    sys.path.insert(0, str(write_disk_app(tmp_path / "disk")))
    return tmp_path / "disk"


# ---------------------------------------------------------------------------------- in process


def test_install_and_overlay_are_exported():
    assert overlay.install is overlay.runtime.install.install and overlay.Overlay is overlay.runtime.handle.Overlay


def test_install_serves_the_active_bundle_from_the_first_import(install, store_v1, disk_app):
    ov = install()
    import hbapp

    assert hbapp.ORIGIN == "bundle v1" and ov.version == 1
    assert hbapp.__file__ == str(ov.tree_root / "hbapp" / "__init__.py")
    assert ov.tree_root.parent.parent == Registry(store_v1).root  # this process's own, outside the store
    assert sys.meta_path[0] is ov.finder and isinstance(ov.finder, OverlayFinder)


def test_install_on_an_empty_store_serves_the_code_on_disk(install, disk_app):
    ov = install()
    import hbapp

    assert hbapp.ORIGIN == "disk" and ov.version is None and ov.status()["active"] is None


def test_installing_twice_is_refused_and_uninstall_allows_it_again(install, store_v1):
    ov = install()
    with pytest.raises(ConfigError, match="already called") as info:
        install()
    assert info.value.code == "already_installed"
    assert sum(isinstance(f, OverlayFinder) for f in sys.meta_path) == 1
    ov.uninstall()
    assert ov.finder not in sys.meta_path
    assert install().version == 1


@pytest.mark.parametrize("missing, keyword, variable", [
    ("packages", "packages=", "HABANERO_PACKAGES"),
    ("trusted_keys", "trusted_keys=", "HABANERO_TRUSTED_KEYS"),
])
def test_a_missing_setting_names_the_keyword_and_the_environment_variable(install, missing, keyword, variable):
    with pytest.raises(ConfigError) as info:
        install(**{missing: None})
    assert keyword in str(info.value) and variable in str(info.value)


@pytest.mark.parametrize("packages", [["json"], ["hbapp", "asyncio"], ["overlay"], ["packer"], ["my-app"],
                                      ["hbapp.sub"], "sitecustomize"])
def test_install_refuses_packages_that_would_shadow_python_or_habanero(install, packages):
    before = list(sys.meta_path)
    with pytest.raises(ConfigError):
        install(packages=packages)
    assert sys.meta_path == before


def test_a_failed_install_leaves_no_finder_and_may_be_retried(install, tmp_path):
    before = list(sys.meta_path)
    with pytest.raises(KeyProblem):
        install(trusted_keys=tmp_path / "no-such-file")
    assert sys.meta_path == before
    assert install().version is None


def test_environment_twins_configure_install(handles, monkeypatch, trusted_keys_file, store_v1, disk_app):
    monkeypatch.setenv("HABANERO_PACKAGES", " hbapp , extra_pkg ")
    monkeypatch.setenv("HABANERO_TRUSTED_KEYS", str(trusted_keys_file))
    monkeypatch.setenv("HABANERO_STORE", str(store_v1))
    monkeypatch.setenv("HABANERO_LISTEN", "127.0.0.1:8765")
    ov = overlay.install()
    handles.append(ov)
    status = ov.status()
    assert status["packages"] == ["hbapp", "extra_pkg"] and status["app_id"] == "hbapp"
    assert status["store"] == str(store_v1) and status["listen"] == "127.0.0.1:8765"
    assert status["version"] == 1


def test_arguments_win_over_the_environment(install, monkeypatch, tmp_path):
    monkeypatch.setenv("HABANERO_PACKAGES", "other")
    monkeypatch.setenv("HABANERO_APP_ID", "from-env")
    monkeypatch.setenv("HABANERO_LISTEN", "not a listen address")
    ov = install(packages="hbapp", app_id="from-arg", listen="[::1]:9000")
    assert ov.packages == ("hbapp",) and ov.app_id == "from-arg" and ov.listen == "[::1]:9000"


@pytest.mark.parametrize("argument, variable, expected", [
    (None, None, "background"), (None, "commit", "commit"), ("background", "commit", "background"),
])
def test_sync_comes_from_the_keyword_then_the_environment(install, monkeypatch, argument, variable, expected):
    if variable is not None:
        monkeypatch.setenv("HABANERO_SYNC", variable)
    assert install(sync=argument).store.sync == expected


def test_an_unknown_sync_mode_is_a_config_error_naming_both_settings(install, monkeypatch):
    monkeypatch.setenv("HABANERO_SYNC", "sometimes")
    with pytest.raises(ConfigError, match="'background'.*'commit'.*sync=.*HABANERO_SYNC") as info:
        install()
    assert info.value.code == "bad_config"


def test_app_id_defaults_to_the_first_package_and_store_to_dot_habanero(install, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    ov = install(packages=["hbapp", "second"], store=None)
    assert ov.app_id == "hbapp" and ov.store.path == tmp_path / ".habanero"
    monkeypatch.chdir("/")  # tree paths stay absolute after the app changes directory
    assert ov.status()["store"] == str(tmp_path / ".habanero")


def test_habanero_disable_makes_install_a_noop_with_one_warning(handles, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HABANERO_DISABLE", "1")
    before = list(sys.meta_path)
    with caplog.at_level(logging.DEBUG, logger="overlay"):
        ov = overlay.install(packages=["hbapp"], store=tmp_path / "store")  # no keys needed: nothing runs
    handles.append(ov)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "HABANERO_DISABLE" in warnings[0].getMessage()
    assert sys.meta_path == before and not (tmp_path / "store").exists()
    status = ov.status()
    assert status["disabled"] is True and status["version"] is None and ov.history() == []
    assert ov.finder is None and ov.store is None


def test_habanero_disable_zero_does_not_disable(install, monkeypatch, store_v1):
    monkeypatch.setenv("HABANERO_DISABLE", "0")
    assert install().status()["disabled"] is False


def test_already_imported_packages_are_named_loudly_and_keep_working(install, store_v1, disk_app, caplog):
    import hbapp  # from disk, before install()

    with caplog.at_level(logging.WARNING, logger="overlay"):
        ov = install()
    message = next(r.getMessage() for r in caplog.records if "imported from disk" in r.getMessage())
    assert "hbapp, hbapp.core" in message and "bundle v1" in message
    assert ov.status()["warnings"] == [message] and ov.status()["preimported"] == ["hbapp", "hbapp.core"]
    assert hbapp.ORIGIN == "disk" and hbapp.greet("x") == "hello x from disk"  # not broken
    import hbapp.boom  # a module first imported now comes from the bundle, as the warning says

    assert "v1 fails here" in hbapp.boom.__loader__.get_source("hbapp.boom")


def test_listen_and_app_are_validated_and_kept_for_the_control_plane(install):
    with pytest.raises(ConfigError, match="host:port"):
        install(listen="8765")
    with pytest.raises(ConfigError, match="aiohttp.web.Application"):
        install(app=object())
    from aiohttp import web

    with pytest.raises(ConfigError, match="not both"):
        install(listen="127.0.0.1:1", app=web.Application())
    app = web.Application()
    ov = install(app=app)
    assert ov.app is app and ov.listen is None


def test_status_and_history_describe_what_is_live(install, store_v1, trusted, make_bundle):
    ov = install()
    status = ov.status()
    assert json.loads(json.dumps(status)) == status
    assert status["active"]["version"] == 1 and status["highest"] == 1 and status["disabled"] is False
    assert status["pid"] > 0 and status["startup_problems"] == [] and status["packages"] == ["hbapp"]
    assert [e["version"] for e in ov.history()] == [1] and ov.history(limit=0) == []
    # what the upgrade transaction does: a new index through the finder, one swap
    v2 = opened(make_bundle(APP_V2, app_id="hbapp", version=2), trusted)
    ov.store.stage(v2)
    previous = ov.finder.set_index(ov.finder.index_for(v2, ov.tree_root))
    assert ov.version == 2 and ov.status()["active"]["digest"] == v2.digest
    ov.finder.set_index(previous)
    assert ov.version == 1


# ---------------------------------------------------------------------------------- fresh interpreters

CHILD = """
import inspect, json, sys, traceback, importlib.resources
import overlay
ov = overlay.install(packages=["hbapp"], trusted_keys={keys!r}, store={store!r})
import hbapp, hbapp.boom, hbapp.latin
from hbapp.sub import leaf
try:
    hbapp.boom.fail()
except RuntimeError as exc:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
print(json.dumps({{
    "version": ov.version, "origin": hbapp.ORIGIN, "greet": hbapp.greet("ann"), "leaf": leaf.LEAF,
    "file": hbapp.__file__, "core_file": sys.modules["hbapp.core"].__file__,
    "spec_origin": hbapp.__spec__.origin, "spec_name": hbapp.__spec__.name,
    "loader": type(hbapp.__loader__).__name__, "loader_is_spec_loader": hbapp.__loader__ is hbapp.__spec__.loader,
    "path": hbapp.__path__, "template": (importlib.resources.files("hbapp") / "templates" / "index.html").read_text(),
    "getsource": inspect.getsource(hbapp.core.greet), "latin": hbapp.latin.WORD,
    "tb_line": frame.line, "tb_file": frame.filename, "stats": ov.finder.code_cache.stats,
    "digest": ov.status()["active"]["digest"],
}}))
"""


def child_run(tmp_path: Path, trusted_keys_file: Path, store: Path) -> dict:
    write_disk_app(tmp_path / "app")
    proc = run_python(CHILD.format(keys=str(trusted_keys_file), store=str(store)), cwd=tmp_path / "app")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_fresh_interpreter_imports_the_app_from_the_bundle_not_from_disk(tmp_path, trusted_keys_file,
                                                                           store_v1, trusted, make_bundle):
    v1 = opened(make_bundle(APP_V1, app_id="hbapp", version=1), trusted)
    out = child_run(tmp_path, trusted_keys_file, store_v1)
    assert out["version"] == 1 and out["origin"] == "bundle v1" and out["greet"] == "hello ann from v1"
    assert out["leaf"] == "leaf of bundle v1" and out["latin"] == "café"
    tree = Path(out["file"]).parent.parent
    assert tree.name == "tree" and tree.parent.parent == Registry(store_v1).root  # the child's own tree
    assert Path(out["file"]).read_bytes() == v1.read("hbapp")
    assert Path(out["core_file"]).read_bytes() == v1.read("hbapp.core")
    assert out["spec_origin"] == out["file"] and out["spec_name"] == "hbapp"
    assert out["loader"] == "BundleLoader" and out["loader_is_spec_loader"]
    assert out["path"] == [str(tree / "hbapp")] and out["template"] == "<h1>v1 template</h1>\n"
    assert out["getsource"] == v1.read("hbapp.core").decode()
    assert out["tb_line"] == 'raise RuntimeError("v1 fails here")  # v1 line'
    assert out["tb_file"] == str(tree / "hbapp" / "boom.py")


@pytest.mark.slow
def test_a_restart_serves_the_same_version_without_recompiling(tmp_path, trusted_keys_file, store_v1):
    first = child_run(tmp_path, trusted_keys_file, store_v1)
    second = child_run(tmp_path, trusted_keys_file, store_v1)
    assert (second["version"], second["digest"], second["file"]) == (first["version"], first["digest"], first["file"])
    assert first["stats"]["compiled"] == 6  # hbapp, core, boom, latin, sub, leaf
    assert second["stats"]["compiled"] == 0 and second["stats"]["disk"] == 6


@pytest.mark.slow
def test_after_a_push_a_restart_compiles_only_what_changed(tmp_path, trusted_keys_file, store_v1, trusted,
                                                         make_bundle):
    child_run(tmp_path, trusted_keys_file, store_v1)
    populate_store(store_v1, trusted, "hbapp", make_bundle(APP_V2, app_id="hbapp", version=2))
    out = child_run(tmp_path, trusted_keys_file, store_v1)
    assert out["version"] == 2 and out["origin"] == "bundle v2"
    assert out["tb_line"] == 'raise RuntimeError("v2 fails here")  # v2 line'
    assert out["stats"]["compiled"] == 3  # hbapp, core, boom changed
    # latin, sub, leaf did not, and their cached code already names their file: paths are stable
    assert out["stats"]["retargeted"] == 0 and out["stats"]["disk"] == 3


@pytest.mark.slow
def test_python_m_style_runs_work_through_a_launcher(tmp_path, trusted_keys_file, store_v1):
    write_disk_app(tmp_path / "app")
    launcher = f"""
        import runpy, sys
        import overlay
        overlay.install(packages=["hbapp"], trusted_keys={str(trusted_keys_file)!r}, store={str(store_v1)!r})
        sys.argv = sys.argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """
    proc = run_python(launcher, cwd=tmp_path / "app", args=["hbapp.tool", "--flag", "x"])
    assert proc.stdout.startswith(f"tool ran from {Registry(store_v1).root / 'w0' / 'tree'}")
    assert proc.stdout.rstrip().endswith("args ['--flag', 'x']")


@pytest.mark.slow
def test_habanero_disable_in_a_fresh_interpreter_boots_the_code_on_disk(tmp_path, trusted_keys_file, store_v1):
    write_disk_app(tmp_path / "app")
    code = f"""
        import overlay
        ov = overlay.install(packages=["hbapp"], trusted_keys={str(trusted_keys_file)!r}, store={str(store_v1)!r})
        import hbapp
        print(hbapp.ORIGIN, ov.status()["disabled"])
    """
    proc = run_python(code, cwd=tmp_path / "app", env=child_env(HABANERO_DISABLE="1"))
    assert proc.stdout.split() == ["disk", "True"]
    assert len(proc.stderr.strip().splitlines()) == 1 and "HABANERO_DISABLE is set" in proc.stderr


@pytest.mark.slow
def test_the_planner_and_rebinder_load_at_the_first_push_not_at_start_up(tmp_path, trusted_keys_file, store_v1,
                                                                         make_bundle):
    """A worker that is never pushed to never pays for them (import time at start, memory)."""
    write_disk_app(tmp_path / "app")
    v2 = tmp_path / "v2.hbn"
    v2.write_bytes(make_bundle(APP_V2, app_id="hbapp", version=2))
    code = f"""
        import sys
        import overlay
        ov = overlay.install(packages=["hbapp"], trusted_keys={str(trusted_keys_file)!r}, store={str(store_v1)!r})
        import hbapp
        lazy = ("overlay.rebind", "overlay.transaction.plan", "overlay.transaction.diff")
        print([m for m in lazy if m in sys.modules])
        ov.apply(open({str(v2)!r}, "rb").read())
        print([m for m in lazy if m in sys.modules], ov.status()["version"])
    """
    proc = run_python(code, cwd=tmp_path / "app")
    assert proc.stdout.splitlines() == [
        "[]", "['overlay.rebind', 'overlay.transaction.plan', 'overlay.transaction.diff'] 2"]
