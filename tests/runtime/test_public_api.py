"""The public face of ``overlay`` is one screen; pin it so a change to it is a decision."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import overlay

EXPECTED = {
    "install", "Overlay", "HabaneroError", "BundleRejected", "UnknownFormat", "BadSignature",
    "UntrustedKey", "WrongApp", "StaleVersion", "TooLarge", "CorruptPayload", "BadManifest",
    "BadEntryName", "ParentMissing", "CompileFailed", "KeyProblem", "StoreError", "ConfigError",
    "ActivationFailed", "ControlRejected", "DeployInProgress", "__version__", "ModuleInUse", "UploadFailed",
    "OverlayImportError", "RemoteError", "WorkerRefused",
}


def test_public_names_are_exactly_the_documented_ones():
    assert set(overlay.__all__) == EXPECTED
    for name in overlay.__all__:
        assert getattr(overlay, name) is not None


@pytest.mark.slow
def test_dir_shows_what_the_package_offers_before_it_is_loaded():
    code = "import overlay, sys; print('install' in dir(overlay), 'Overlay' in dir(overlay), " \
           "'overlay.runtime.install' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "False"]  # listed, and still not imported


def test_install_keeps_the_keyword_names_tools_and_docs_rely_on():
    params = inspect.signature(overlay.install).parameters
    assert list(params)[:5] == ["packages", "trusted_keys", "store", "listen", "app"]
    for name in ("app_id", "limits", "tls_cert", "tls_key", "public_status"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_every_error_is_a_habanero_error_with_a_code():
    for name in EXPECTED - {"install", "Overlay", "__version__"}:
        cls = getattr(overlay, name)
        assert issubclass(cls, overlay.HabaneroError)
        required = {"OverlayImportError": {"name": "m"}, "RemoteError": {"code": "unreachable"}}.get(name, {})
        error = cls("x", **required)
        assert error.code and 400 <= error.http_status < 600


@pytest.mark.slow
def test_importing_overlay_does_not_load_the_run_time_machinery():
    code = "import sys, overlay; print(sorted({'overlay.runtime.install', 'overlay.store', 'aiohttp'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
