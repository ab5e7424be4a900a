"""An app package pushed from source text, for the framework integrations' tests, and a tiny ASGI client.

``Live`` installs the overlay for one package in the test's store; ``push({"views": "..."})`` sends a
bundle of that package's modules (``""`` is the package's ``__init__``) and returns the report. The
ASGI client calls an app in this thread's event loop, with no server and no extra dependency.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from overlay.bundle import build_bundle
from overlay.keys import SigningKey


@dataclass
class Live:
    ov: Any  # overlay.Overlay
    key: SigningKey
    package: str

    def bundle(self, modules: dict[str, str]) -> bytes:
        files = {}
        for name, source in modules.items():
            dotted = f"{self.package}.{name}" if name else self.package
            files[dotted] = ("package" if not name else "module", textwrap.dedent(source).encode())
        files.setdefault(self.package, ("package", b""))
        return build_bundle(files, app_id=self.package, version=self.ov.store.highest + 1, signers=[self.key])

    def push(self, modules: dict[str, str]) -> Any:
        """Apply a version made of ``modules``; the ``UpgradeReport``."""
        return self.ov.apply(self.bundle(modules))

    def start(self, modules: dict[str, str], *imports: str) -> None:
        """Push the first version and import ``imports`` (module names relative to the package)."""
        self.push(modules)
        for name in imports:
            importlib.import_module(f"{self.package}.{name}")

    def module(self, name: str) -> Any:
        return sys.modules[f"{self.package}.{name}"]


def asgi_get(app: Any, path: str, query: str = "") -> tuple[int, Any]:
    """GET ``path`` from an ASGI app: the status and the body (parsed when it is JSON)."""
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"test")], "server": ("test", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    try:
        return out["status"], json.loads(out["body"])
    except ValueError:
        return out["status"], out["body"]
