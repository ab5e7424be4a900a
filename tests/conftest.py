"""Fixtures every layer uses: keys, a bundle factory, import state, app processes; and the slow guard.

Each layer's own fixtures live in its folder's ``conftest.py``; helpers that are not fixtures live
in ``support/`` and are imported by name. A test that starts a process (an app, the CLI, a fresh
interpreter, ``git``, ``ssh-keygen``) is marked ``slow``, so that ``pytest -m "not slow"`` runs the
unit tests alone: the ``pytest_runtest_*`` hooks below fail any unmarked test that starts one
(``support.processes``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from support.e2e import Launcher
from support.processes import refusing_processes

from overlay.bundle import build_bundle
from overlay.keys import SigningKey, TrustedKeys, generate_signing_key, load_trusted_keys

# Private keys load cryptography when first used. Loaded here, before any test: the import_state
# fixture drops what a test imported, and cryptography's compiled core cannot be loaded twice (its
# classes would then no longer be the ones it checks against).
__import__("cryptography.hazmat.primitives.serialization")
__import__("cryptography.hazmat.primitives.asymmetric.ed25519")


@pytest.fixture(autouse=True, scope="session")
def _runtime_dir() -> Iterator[Path]:
    """Every process of every test (and the processes they start) registers its worker directory
    and source tree here, not in the machine's runtime directory; removed at the end. Short: a
    Unix socket's path must stay under 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="hbrt-"))
    saved = os.environ.get("HABANERO_RUNTIME_DIR")
    os.environ["HABANERO_RUNTIME_DIR"] = str(root)
    try:
        yield root
    finally:
        if saved is None:
            os.environ.pop("HABANERO_RUNTIME_DIR", None)
        else:
            os.environ["HABANERO_RUNTIME_DIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def signing_key(tmp_path: Path) -> SigningKey:
    return generate_signing_key(tmp_path / "keys" / "deploy", comment="tests@habanero")


@pytest.fixture
def other_key(tmp_path: Path) -> SigningKey:
    return generate_signing_key(tmp_path / "keys" / "intruder", comment="intruder")


@pytest.fixture
def trusted_keys_file(tmp_path: Path, signing_key: SigningKey) -> Path:
    path = tmp_path / "keys" / "trusted_keys"
    path.write_text(f"# deployers\n{signing_key.public.line()}\n", encoding="utf-8")
    return path


@pytest.fixture
def trusted(trusted_keys_file: Path) -> TrustedKeys:
    return load_trusted_keys(trusted_keys_file)


@pytest.fixture
def make_bundle(signing_key: SigningKey) -> Callable[..., bytes]:
    """``make_bundle({"app": ("package", b"...")}, version=2)`` -> signed bundle bytes."""

    def make(files=None, *, app_id: str = "app", version: int = 1, signers=None, **kw) -> bytes:
        files = files if files is not None else {"app": ("package", b"VALUE = 1\n")}
        return build_bundle(files, app_id=app_id, version=version, signers=signers or [signing_key], **kw)

    return make


@pytest.fixture
def import_state() -> Iterator[None]:
    """Put ``sys.modules``, ``sys.meta_path`` and ``sys.path`` back after a test, even when it fails."""
    modules = dict(sys.modules)
    meta_path = list(sys.meta_path)
    path = list(sys.path)
    path_importer_cache = dict(sys.path_importer_cache)
    try:
        yield
    finally:
        sys.meta_path[:] = meta_path
        sys.path[:] = path
        for name in set(sys.modules) - set(modules):
            del sys.modules[name]
        sys.modules.update(modules)
        sys.path_importer_cache.clear()
        sys.path_importer_cache.update(path_importer_cache)


# ------------------------------------------------------------------------------ app processes


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    """Starts app processes (``support.e2e``); kills and reaps every one of them at teardown."""
    launch = Launcher()
    try:
        yield launch
    finally:
        launch.stop_all()


@pytest.fixture(scope="module")
def module_launcher() -> Iterator[Launcher]:
    """The same, for apps a whole module shares."""
    launch = Launcher()
    try:
        yield launch
    finally:
        launch.stop_all()


# ------------------------------------------------------------------------------- the slow guard


def _no_processes_unless_slow(item: pytest.Item) -> Generator[None, object, object]:
    """Run one phase of ``item`` (setup, call or teardown) refusing to start a process, unless the
    test is marked slow; fail the phase if it tried, even from another thread or past an ``except``."""
    if item.get_closest_marker("slow") is not None:
        return (yield)
    with refusing_processes() as started:
        result = yield  # a phase that already fails with the refusal is reported once, as it is
    if started:
        pytest.fail(f"this test starts a subprocess ({', '.join(started)}): mark it slow", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _no_processes_unless_slow(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _no_processes_unless_slow(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _no_processes_unless_slow(item))
