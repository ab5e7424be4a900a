"""Real libraries, upgraded live: a push must equal a fresh start of the newer release.

Each case is two consecutive releases of a pure-Python library none of habanero's code knows about,
vendored under ``dists/`` (the older one as its wheel, the newer one as its sdist, which ships its
tests), so the suite needs no network. For each, two child interpreters run the newer release's own
test suite (``live_upgrade.py``): one on a fresh import of it, one in a process that imported every
module of the older release and was then pushed the newer one as a signed bundle. The push must be
accepted, and the upgraded process may fail no test the fresh import passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DISTS = HERE / "dists"
DRIVER = HERE / "live_upgrade.py"
TIMEOUT = 240


@dataclass(frozen=True)
class Pair:
    """Two consecutive releases, and where the newer sdist keeps its sources and tests."""

    packages: tuple[str, ...]
    old_wheel: str
    new_sdist: str
    src: str = ""  # the sources' directory inside the sdist ("" or "src")
    tests: str = "tests"
    version: str = ""  # what the upgraded package's version must say
    #: Where the version is read: toolz computes its ``__version__`` at import by calling
    #: ``_version.get_versions()``, a statement a push does not re-run when only that function's
    #: code changed (see README, "What a push does"); the function itself answers the new version.
    version_of: str = "{package}.__version__"
    path: tuple[str, ...] = field(default=())  # vendored test dependencies (wheels)
    deselect: tuple[str, ...] = field(default=())  # tests left out, in both runs (see PAIRS)


PAIRS = {
    "packaging 24.1 -> 24.2": Pair(("packaging",), "packaging-24.1-py3-none-any.whl", "packaging-24.2.tar.gz",
                                   src="src", version="24.2", path=("pretend-1.0.9-py2.py3-none-any.whl",)),
    "more-itertools 10.6.0 -> 10.7.0": Pair(("more_itertools",), "more_itertools-10.6.0-py3-none-any.whl",
                                            "more_itertools-10.7.0.tar.gz", version="10.7.0",
                                            # 22 s of number crunching in functions neither release changed
                                            deselect=("tests/test_recipes.py::PrimeFunctionTests::test_primes",
                                                      "tests/test_more.py::DiscreteFourierTransformTests")),
    "cachetools 5.4.0 -> 5.5.0": Pair(("cachetools",), "cachetools-5.4.0-py3-none-any.whl",
                                      "cachetools-5.5.0.tar.gz", src="src", version="5.5.0"),
    # tlz, toolz's alias package (made by its own import hook), did not change and is not pushed.
    "toolz 0.12.0 -> 0.12.1": Pair(("toolz",), "toolz-0.12.0-py3-none-any.whl", "toolz-0.12.1.tar.gz",
                                   tests="toolz/tests", version="0.12.1",
                                   version_of="toolz._version.get_versions()['version']"),
    "jmespath 1.0.0 -> 1.0.1": Pair(("jmespath",), "jmespath-1.0.0-py3-none-any.whl", "jmespath-1.0.1.tar.gz",
                                    version="1.0.1"),
}


def _unpack(pair: Pair, where: Path) -> tuple[Path, Path]:
    """The older release's sources and the newer sdist's root."""
    old = where / "old"
    with zipfile.ZipFile(DISTS / pair.old_wheel) as wheel:
        wheel.extractall(old)
    with tarfile.open(DISTS / pair.new_sdist) as sdist:
        sdist.extractall(where / "new", filter="data")
    (root,) = (where / "new").iterdir()
    return old, root


def _run(mode: str, pair: Pair, old: Path, root: Path, where: Path, run: Path) -> subprocess.Popen[bytes]:
    spec = {"mode": mode, "packages": list(pair.packages), "old": str(old), "new": str(root / pair.src),
            "tests": str(root / pair.tests), "rootdir": str(root), "store": str(where / mode / "store"),
            "path": [str(DISTS / p) for p in pair.path], "deselect": list(pair.deselect),
            "version_of": pair.version_of.format(package=pair.packages[0])}
    (where / mode).mkdir()
    (where / mode / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HABANERO_RUNTIME_DIR": str(run), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    log = (where / mode / "log").open("wb")
    return subprocess.Popen([sys.executable, str(DRIVER), str(where / mode / "spec.json"), str(where / mode / "out.json")],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def _result(proc: subprocess.Popen[bytes], where: Path, mode: str) -> dict[str, object]:
    try:
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = where / mode / "out.json"
    if not out.exists():
        log = (where / mode / "log").read_text(errors="replace")
        pytest.fail(f"the {mode} run ended without a result (exit {proc.returncode}):\n{log[-4000:]}")
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("name", list(PAIRS))
def test_live_upgrade_fails_no_test_a_fresh_import_passes(name: str, tmp_path: Path) -> None:
    pair = PAIRS[name]
    old, root = _unpack(pair, tmp_path)
    run = Path(tempfile.mkdtemp(prefix="hb-"))  # short: the workers' sockets live there
    procs = {mode: _run(mode, pair, old, root, tmp_path, run) for mode in ("fresh", "live")}
    try:
        fresh = _result(procs["fresh"], tmp_path, "fresh")
        live = _result(procs["live"], tmp_path, "live")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(run, ignore_errors=True)
    assert live.get("refused") is None, f"the push was refused: {live['refused']}\n{live.get('traceback')}"
    assert live["version"] == fresh["version"] == pair.version, "the live process does not run the newer release"
    assert isinstance(fresh["passed"], int) and fresh["passed"] > 0, f"the fresh run passed nothing: {fresh}"
    beyond = sorted(set(live["failed"]) - set(fresh["failed"]))  # type: ignore[arg-type]
    assert not beyond, (f"{len(beyond)} test(s) fail after the live upgrade but not on a fresh import: {beyond}\n"
                        f"re-ran: {json.dumps(live.get('reran'), indent=1)[:3000]}")
    assert live["passed"] == fresh["passed"], (live["passed"], fresh["passed"])
