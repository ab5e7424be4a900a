"""A tiny app for the tests of the processes of one store (``tests/cluster``)."""

from __future__ import annotations

from overlay.bundle import build_bundle
from overlay.keys import SigningKey

APP = "clusterapp"


def app_bundle(key: SigningKey, version: int, greeting: str) -> bytes:
    files = {APP: ("package", f"def greet():\n    return {greeting!r}\n".encode()),
             f"{APP}/banner.txt": ("data", f"{greeting}\n".encode())}
    return build_bundle(files, app_id=APP, version=version, signers=[key])
