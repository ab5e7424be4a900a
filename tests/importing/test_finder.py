"""The finder, its loader and the compiled-code cache, in this process (import state restored)."""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import os
import pkgutil
import runpy
import sys
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.overlay import APP_V1, APP_V2, lay_out, opened

from overlay.importing import codecache as _codecache
from overlay.importing.codecache import CodeCache
from overlay.transaction.diff import entry_diff
from overlay.errors import ConfigError, HabaneroError
from overlay.finder import BundleIndex, BundleLoader, OverlayFinder, OverlayImportError, check_packages


@pytest.fixture
def v1(make_bundle, trusted):
    return opened(make_bundle(APP_V1, app_id="hbapp", version=1), trusted)


@pytest.fixture
def v2(make_bundle, trusted):
    return opened(make_bundle(APP_V2, app_id="hbapp", version=2), trusted)


@pytest.fixture
def cache(tmp_path):
    return CodeCache(tmp_path / "pycache")


@pytest.fixture
def finder(import_state, v1, tmp_path, cache):
    """A finder over v1, first on sys.meta_path; import_state takes it (and hbapp.*) away afterwards."""
    finder = OverlayFinder(["hbapp"], code_cache=cache)
    finder.set_index(finder.index_for(v1, lay_out(v1, tmp_path / "v1")))
    sys.meta_path.insert(0, finder)
    return finder


def swap_to(finder, bundle, root):
    return finder.set_index(finder.index_for(bundle, lay_out(bundle, root)))


# ---------------------------------------------------------------------------------- find_spec


@pytest.mark.parametrize("name", ["json", "os.path", "pytest", "overlay", "packer", "hbappx", "hbapp.missing",
                                  "hbapp.templates", "", "hbapp..core", "hbapp/templates/index.html",
                                  "hbapp.uu", "hbapp.json"])  # not the stdlib's uu or json
def test_find_spec_returns_none_for_every_name_it_does_not_serve(finder, name):
    assert finder.find_spec(name, None) is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.one_of(st.text(), st.from_regex(r"hbapp(\.[a-z_]{0,6}){0,3}", fullmatch=True)))
def test_find_spec_never_raises_whatever_the_name(finder, name):
    spec = finder.find_spec(name, None)
    assert spec is None or name in finder.index.modules


def test_find_spec_returns_none_and_imports_fall_through_while_no_bundle_is_active(import_state):
    finder = OverlayFinder(["hbapp"])
    sys.meta_path.insert(0, finder)
    assert finder.index is None
    assert finder.find_spec("hbapp", None) is None
    import json  # noqa: F401  - the normal machinery still works behind the finder

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hbapp")


def test_find_spec_does_no_file_system_io(finder, monkeypatch):
    def no_io(*args, **kwargs):
        raise AssertionError("find_spec touched the file system")

    for name in ("stat", "listdir", "scandir", "open", "lstat"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr("builtins.open", no_io)
    spec = finder.find_spec("hbapp.sub.leaf", None)
    assert spec is not None and spec.name == "hbapp.sub.leaf"


def test_spec_of_a_package_has_file_in_the_tree_and_a_search_path(finder, tmp_path):
    spec = finder.find_spec("hbapp.sub", None)
    tree = tmp_path / "v1"
    assert isinstance(spec.loader, BundleLoader)
    assert spec.origin == str(tree / "hbapp" / "sub" / "__init__.py")
    assert spec.has_location and spec.parent == "hbapp.sub"
    assert spec.submodule_search_locations == [str(tree / "hbapp" / "sub")]
    assert spec.cached == finder.code_cache.path_for(finder.index.entry("hbapp.sub").sha256)
    module_spec = finder.find_spec("hbapp.core", None)
    assert module_spec.submodule_search_locations is None and module_spec.parent == "hbapp"


def test_imported_module_gets_file_spec_and_loader_from_the_import_machinery(finder, tmp_path, v1):
    import hbapp
    import hbapp.core

    tree = tmp_path / "v1"
    assert hbapp.ORIGIN == "bundle v1"
    assert hbapp.__file__ == str(tree / "hbapp" / "__init__.py")
    assert Path(hbapp.__file__).read_bytes() == v1.read("hbapp")
    assert hbapp.__path__ == [str(tree / "hbapp")]
    assert hbapp.__spec__.name == "hbapp" and hbapp.__loader__ is finder.index.loader
    assert hbapp.core.__package__ == "hbapp" and hbapp.core.__spec__.origin == hbapp.core.__file__
    assert hbapp.core.greet("ann") == "hello ann from v1"


def test_relative_imports_and_subpackages_work(finder):
    from hbapp.sub import leaf, parent_greet

    assert leaf.LEAF == "leaf of bundle v1"
    assert parent_greet("bo") == "hello bo from v1"
    assert sys.modules["hbapp.sub.leaf"].__spec__.parent == "hbapp.sub"


def test_the_finder_sits_first_and_wins_over_a_copy_on_sys_path(finder, tmp_path):
    from support.overlay import write_disk_app

    sys.path.insert(0, str(write_disk_app(tmp_path / "disk")))
    import hbapp

    assert hbapp.ORIGIN == "bundle v1"


# ---------------------------------------------------------------------------------- loader


def test_loader_answers_the_loader_protocol(finder, v1):
    loader = finder.index.loader
    assert loader.is_package("hbapp") and loader.is_package("hbapp.sub")
    assert not loader.is_package("hbapp.core")
    assert loader.get_filename("hbapp.core").endswith(os.path.join("v1", "hbapp", "core.py"))
    code = loader.get_code("hbapp.core")
    assert code.co_filename == loader.get_filename("hbapp.core")
    assert loader.get_source("hbapp.core") == v1.read("hbapp.core").decode()
    assert loader.create_module(finder.find_spec("hbapp.core", None)) is None


def test_loader_raises_an_import_error_with_name_for_a_module_it_lacks(finder):
    with pytest.raises(ImportError) as info:
        finder.index.loader.get_code("hbapp.nope")
    assert isinstance(info.value, OverlayImportError) and isinstance(info.value, HabaneroError)
    assert info.value.name == "hbapp.nope" and info.value.code == "not_in_bundle"


def test_get_source_decodes_the_pep_263_encoding_declaration(finder):
    assert "WORD = 'café'" in finder.index.loader.get_source("hbapp.latin")
    import hbapp.latin

    assert hbapp.latin.WORD == "café"


def test_get_code_compiles_the_bundle_bytes_not_the_tree_file(finder, tmp_path):
    target = tmp_path / "v1" / "hbapp" / "core.py"
    target.chmod(0o644)
    target.write_text("def greet(name):\n    return 'tampered tree'\n")
    import hbapp.core

    assert hbapp.core.greet("x") == "hello x from v1"


def test_inspect_getsource_and_pkgutil_get_data_return_the_bundle_version(finder):
    import hbapp.core

    assert inspect.getsource(hbapp.core.greet).strip().endswith('return f"hello {name} from v1"')
    assert pkgutil.get_data("hbapp", "templates/index.html") == b"<h1>v1 template</h1>\n"
    with pytest.raises(FileNotFoundError):
        pkgutil.get_data("hbapp", "templates/missing.html")


def test_resources_files_reads_data_files_in_directories_without_init(finder):
    import hbapp

    root = importlib.resources.files("hbapp")
    assert (root / "templates" / "index.html").read_text() == "<h1>v1 template</h1>\n"
    assert (root / "templates" / "partials" / "row.html").read_bytes() == b"<tr>v1</tr>\n"
    assert sorted(p.name for p in (root / "templates").iterdir()) == ["index.html", "partials"]
    with importlib.resources.as_file(root / "templates" / "index.html") as path:
        assert path.read_text() == "<h1>v1 template</h1>\n"
    # what Flask's root_path and Django's BASE_DIR do: paths next to __file__
    assert (Path(hbapp.__file__).parent / "templates" / "index.html").read_text() == "<h1>v1 template</h1>\n"
    assert finder.index.loader.get_resource_reader("hbapp.core") is None


def test_a_data_directory_without_init_imports_as_a_namespace_package(finder, tmp_path):
    templates = importlib.import_module("hbapp.templates")
    assert templates.__file__ is None
    assert list(templates.__path__) == [str(tmp_path / "v1" / "hbapp" / "templates")]


def test_runpy_runs_a_bundle_module_as_main(finder, capsys):
    runpy.run_module("hbapp.tool", run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("tool ran from ") and os.path.join("v1", "hbapp", "tool.py") in out


def test_traceback_shows_the_pushed_line_and_old_frames_keep_their_own_lines(finder, v2, tmp_path):
    import hbapp.boom

    fail_v1 = hbapp.boom.fail
    swap_to(finder, v2, tmp_path / "v2")
    del sys.modules["hbapp.boom"]
    import hbapp.boom as boom_v2

    for fail, text, version in ((boom_v2.fail, "v2 line", "v2"), (fail_v1, "v1 line", "v1")):
        with pytest.raises(RuntimeError) as info:
            fail()
        frame = traceback.extract_tb(info.value.__traceback__)[-1]
        assert frame.line.endswith(f"# {text}") and f"{os.sep}{version}{os.sep}" in frame.filename


# ---------------------------------------------------------------------------------- index swap


def test_set_index_swaps_the_version_new_imports_see_and_returns_the_previous(finder, v2, tmp_path):
    import hbapp

    first = finder.index
    previous = swap_to(finder, v2, tmp_path / "v2")
    assert previous is first and finder.index.version == 2
    import hbapp.boom  # first imported after the swap: v2, while hbapp itself stays the v1 module

    with pytest.raises(RuntimeError, match="v2 fails here"):
        hbapp.boom.fail()
    assert f"{os.sep}v2{os.sep}" in hbapp.boom.__file__ and hbapp.boom.__loader__ is finder.index.loader
    # hbapp did not run again, but its loader (the finder's, for every version) serves the active one
    assert hbapp.ORIGIN == "bundle v1" and hbapp.__loader__.get_source("hbapp").startswith('ORIGIN = "bundle v2"')
    assert finder.set_index(previous).version == 2 and finder.index is first
    assert finder.set_index(None) is first and finder.find_spec("hbapp", None) is None


def test_reload_after_a_swap_loads_the_active_version(finder, v2, tmp_path):
    import hbapp.core

    swap_to(finder, v2, tmp_path / "v2")
    reloaded = importlib.reload(hbapp.core)
    assert reloaded is hbapp.core and hbapp.core.greet("r") == "hello r from v2"
    assert hbapp.core.__loader__ is finder.index.loader and f"{os.sep}v2{os.sep}" in hbapp.core.__file__


def test_set_index_refuses_an_index_for_undeclared_packages(import_state, make_bundle, trusted, tmp_path):
    both = opened(make_bundle({**APP_V1, "other": ("module", b"X = 1\n")}, app_id="hbapp"), trusted)
    finder = OverlayFinder(["hbapp"])
    with pytest.raises(ConfigError, match="other"):
        finder.set_index(BundleIndex(both, lay_out(both, tmp_path / "t")))
    assert finder.index is None
    index = finder.index_for(both, tmp_path / "t")  # through the finder: narrowed to what it declared
    assert "other" not in index.modules and index.ignored == {"other"}
    finder.set_index(index)
    assert finder.find_spec("other", None) is None and finder.find_spec("hbapp", None) is not None


@pytest.mark.parametrize("change", ["edit", "add and remove", "module becomes a package", "other package"])
def test_an_index_derived_from_the_previous_equals_one_built_from_scratch(make_bundle, trusted, tmp_path,
                                                                         v1, change):
    files = dict(APP_V1)
    if change == "edit":
        files["hbapp.core"] = ("module", b"X = 'edited'\n")
    elif change == "add and remove":
        del files["hbapp.boom"]
        files["hbapp.fresh"] = ("module", b"X = 1\n")
    elif change == "module becomes a package":
        files["hbapp.boom"] = ("package", files["hbapp.boom"][1])  # same bytes, another kind
    else:
        files["other"] = ("module", b"X = 1\n")
    v2 = opened(make_bundle(files, app_id="hbapp", version=2), trusted)
    finder = OverlayFinder(["hbapp"])
    finder.set_index(finder.index_for(v1, tmp_path))
    diff = entry_diff(v1, v2)
    derived = finder.index_for(v2, tmp_path, changed=diff.names)
    scratch = BundleIndex(v2, tmp_path, packages=["hbapp"])
    assert derived.modules == scratch.modules and derived.ignored == scratch.ignored
    assert derived.loader is finder.loader and diff.names, "a derived index shares the finder's loader"


def test_an_index_never_serves_the_standard_library_or_habanero(make_bundle, trusted, tmp_path):
    sneaky = opened(make_bundle({"json": ("package", b"X = 'evil'\n"), "overlay": ("module", b""),
                                 "sitecustomize": ("module", b""), "mine": ("module", b"")}), trusted)
    index = BundleIndex(sneaky, tmp_path)
    assert index.module_names() == ["mine"]
    assert {"json", "overlay", "sitecustomize"} <= index.ignored


def test_an_index_built_without_a_cache_adopts_the_finders_when_activated(import_state, v1, tmp_path, cache):
    index = BundleIndex(v1, lay_out(v1, tmp_path / "v1"))
    assert index.spec("hbapp.core").loader is index.loader and index.code_cache is None
    finder = OverlayFinder(["hbapp"], code_cache=cache)
    finder.set_index(index)
    assert index.code_cache is cache


@pytest.mark.parametrize("name, fragment", [
    ("json", "standard library"), ("os", "standard library"), ("sys", "standard library"),
    ("overlay", "reserved"), ("packer", "reserved"), ("sitecustomize", "reserved"),
    ("my-app", "did you mean 'my_app'"), ("myapp.sub", "top-level package 'myapp'"),
    ("class", "not an importable"), ("", "not a package name"), (3, "not a package name"),
])
def test_check_packages_refuses_names_that_would_shadow_python_or_habanero(name, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_packages([name])


def test_check_packages_keeps_order_and_drops_duplicates():
    assert check_packages(["b", "a", " b "]) == ("b", "a")
    with pytest.raises(ConfigError, match="at least one"):
        check_packages([])


# ---------------------------------------------------------------------------------- code cache


@pytest.fixture
def compiles(monkeypatch):
    """Count calls to the cache's compiler."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return compile(*args, **kwargs)

    monkeypatch.setattr(_codecache, "_compile", counting)
    return calls


SOURCE = b"def f():\n    return 41 + 1\n"
SHA = __import__("hashlib").sha256(SOURCE).hexdigest()


def test_code_cache_hit_on_disk_avoids_compiling_after_a_restart(tmp_path, compiles):
    CodeCache(tmp_path).get(SHA, "/v1/m.py", lambda: SOURCE)
    assert len(compiles) == 1
    fresh = CodeCache(tmp_path)  # a new process: empty memory, same directory
    code = fresh.get(SHA, "/v1/m.py", lambda: pytest.fail("source read on a cache hit"))
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["f"]() == 42 and len(compiles) == 1 and fresh.stats["disk"] == 1
    assert fresh.get(SHA, "/v1/m.py", lambda: SOURCE) is code and fresh.stats["memory"] == 1


def test_code_cache_keeps_only_the_most_recent_code_in_memory_and_the_rest_on_disk(tmp_path, compiles):
    cache = CodeCache(tmp_path)
    sources = [f"X = {i}\n".encode() for i in range(_codecache.MEMORY_ENTRIES + 10)]
    shas = [__import__("hashlib").sha256(s).hexdigest() for s in sources]
    for sha, source in zip(shas, sources):
        cache.get(sha, f"/v1/m{sha[:8]}.py", lambda source=source: source)
    assert len(cache._by_key) == _codecache.MEMORY_ENTRIES  # bounded, whatever the app's size
    cache.get(shas[-1], f"/v1/m{shas[-1][:8]}.py", lambda: pytest.fail("recompiled"))
    assert cache.stats["memory"] == 1
    oldest = cache.get(shas[0], f"/v1/m{shas[0][:8]}.py", lambda: pytest.fail("recompiled"))
    assert cache.stats["disk"] == 1 and len(compiles) == len(sources)  # back from disk, not compiled
    namespace: dict = {}
    exec(oldest, namespace)
    assert namespace["X"] == 0


def test_unchanged_source_in_a_new_version_is_retargeted_not_recompiled(tmp_path, compiles):
    cache = CodeCache(tmp_path)
    old = cache.get(SHA, "/v1/m.py", lambda: SOURCE)
    new = cache.get(SHA, "/v2/m.py", lambda: SOURCE)
    assert len(compiles) == 1 and cache.stats["retargeted"] == 1
    inner = [c for c in new.co_consts if hasattr(c, "co_filename")]
    assert new.co_filename == "/v2/m.py" and inner and inner[0].co_filename == "/v2/m.py"
    assert old.co_filename == "/v1/m.py"  # the old version's code still names the old file
    assert CodeCache(tmp_path).get(SHA, "/v3/m.py", lambda: SOURCE).co_filename == "/v3/m.py"
    assert len(compiles) == 1


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif how == "truncated":
        path.write_bytes(data[: len(data) - 5])
    elif how == "foreign_magic":
        path.write_bytes(b"\x00\x00\r\n" + data[4:])
    elif how == "other_source":
        path.write_bytes(data[:8] + bytes(32) + data[40:])
    elif how == "bad_marshal":
        path.write_bytes(data[:44] + b"\xff" * (len(data) - 44))
    elif how == "group_writable":
        path.chmod(0o666)
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["garbage", "truncated", "foreign_magic", "other_source", "bad_marshal",
                                 "group_writable", "empty"])
def test_a_bad_cache_file_is_ignored_and_rewritten(tmp_path, compiles, how):
    cache_file = Path(CodeCache(tmp_path).path_for(SHA))
    CodeCache(tmp_path).get(SHA, "/v1/m.py", lambda: SOURCE)
    _corrupt(cache_file, how)
    code = CodeCache(tmp_path).get(SHA, "/v1/m.py", lambda: SOURCE)
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["f"]() == 42 and len(compiles) == 2
    assert CodeCache(tmp_path).get(SHA, "/v1/m.py", lambda: SOURCE) and len(compiles) == 2  # rewritten
    assert oct(cache_file.stat().st_mode & 0o077) == "0o0"


def test_cache_files_are_written_atomically_and_leave_no_temp_files(tmp_path):
    cache = CodeCache(tmp_path / "c")
    for i in range(5):
        src = f"X = {i}\n".encode()
        cache.compile(src, f"/v1/m{i}.py")
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(names) == 5 and not [n for n in names if n.startswith(".tmp")]
    assert all(n.endswith(f".{sys.implementation.cache_tag}.pyc") for n in names)


def test_an_unwritable_cache_directory_costs_speed_not_correctness(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = CodeCache(blocker / "pycache")
    for i in range(3):
        code = cache.compile(f"X = {i}\n".encode(), f"/m{i}.py")
        assert code.co_filename == f"/m{i}.py"
    assert len([r for r in caplog.records if "cannot write compiled code" in r.message]) == 1


def test_importing_twice_from_a_fresh_cache_compiles_each_module_once(import_state, v1, tmp_path, compiles):
    def import_all(cache_dir):
        for name in [n for n in sys.modules if n.startswith("hbapp")]:
            del sys.modules[name]
        finder = OverlayFinder(["hbapp"], code_cache=CodeCache(cache_dir))
        finder.set_index(finder.index_for(v1, tmp_path / "v1"))
        sys.meta_path.insert(0, finder)
        try:
            import hbapp.sub.leaf  # noqa: F401
            import hbapp.latin  # noqa: F401
        finally:
            sys.meta_path.remove(finder)

    lay_out(v1, tmp_path / "v1")
    import_all(tmp_path / "cache")
    first = len(compiles)
    import_all(tmp_path / "cache")
    assert first == 5 and len(compiles) == first  # hbapp, core, sub, leaf, latin; then none
