"""Sample apps for the finder, install and restart tests: bundles, trees, stores, fresh interpreters."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from support import ROOT

from overlay.bundle import Bundle, open_bundle
from overlay.keys import TrustedKeys

SUBPROCESS_TIMEOUT = 60

# A small app, in the jurigged style of "before/after" snapshots: version 1 and version 2 of the same
# package, differing in what they say and in the line a function raises from.
APP_V1: dict[str, tuple[str, bytes]] = {
    "hbapp": ("package", b'ORIGIN = "bundle v1"\nfrom .core import greet\n'),
    "hbapp.core": ("module", b'def greet(name):\n    return f"hello {name} from v1"\n'),
    "hbapp.boom": ("module", b'def fail():\n    raise RuntimeError("v1 fails here")  # v1 line\n'),
    "hbapp.sub": ("package", b"from ..core import greet as parent_greet\nfrom . import leaf\n"),
    "hbapp.sub.leaf": ("module", b'from .. import ORIGIN\nLEAF = "leaf of " + ORIGIN\n'),
    "hbapp.tool": ("module", b'import sys\nif __name__ == "__main__":\n'
                             b'    print("tool ran from", __file__, "args", sys.argv[1:])\n'),
    "hbapp.latin": ("module", "# -*- coding: latin-1 -*-\nWORD = 'caf\xe9'\n".encode("latin-1")),
    "hbapp/templates/index.html": ("data", b"<h1>v1 template</h1>\n"),
    "hbapp/templates/partials/row.html": ("data", b"<tr>v1</tr>\n"),
}

APP_V2 = dict(APP_V1)
APP_V2.update({
    "hbapp": ("package", b'ORIGIN = "bundle v2"\nfrom .core import greet\n'),
    "hbapp.core": ("module", b'def greet(name):\n    return f"hello {name} from v2"\n'),
    "hbapp.boom": ("module", b'\n\ndef fail():\n    raise RuntimeError("v2 fails here")  # v2 line\n'),
    "hbapp/templates/index.html": ("data", b"<h1>v2 template</h1>\n"),
})

# The same package on disk, saying something else: proves what was imported came from the bundle.
DISK_APP: dict[str, str] = {
    "hbapp/__init__.py": 'ORIGIN = "disk"\nfrom .core import greet\n',
    "hbapp/core.py": 'def greet(name):\n    return f"hello {name} from disk"\n',
    "hbapp/tool.py": 'print("tool ran from disk")\n',
    "hbapp/templates/index.html": "<h1>disk template</h1>\n",
}


def opened(data: bytes, trusted: TrustedKeys) -> Bundle:
    return open_bundle(data, trusted)


def lay_out(bundle: Bundle, root: Path) -> Path:
    """Write ``bundle`` as a read-only tree at ``root`` (what ``Store.tree`` provides), for unit tests."""
    for entry in bundle.entries.values():
        path = root.joinpath(*entry.path.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bundle.read(entry.name))
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return root


def write_disk_app(root: Path, files: dict[str, str] = DISK_APP) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def populate_store(path: Path, trusted: TrustedKeys, app_id: str, *bundles: bytes) -> None:
    """Accept and activate each bundle in turn, through the store's own API."""
    from overlay.store import Store

    store = Store.open(path, trusted=trusted, app_id=app_id)
    try:
        for data in bundles:
            bundle = open_bundle(data, trusted, app_id=app_id)
            store.check_fresh(bundle)
            store.stage(bundle)
            store.commit(bundle)
    finally:
        store.close()


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a fresh interpreter: no HABANERO_* leaking in, habanero importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HABANERO_") or k == "HABANERO_RUNTIME_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_python(code: str, *, cwd: Path, env: dict[str, str] | None = None,
               args: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with a timeout; fail with its output when it fails."""
    script = cwd / "_child.py"
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), *(args or [])], cwd=cwd, env=env or child_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def package_files(package: str) -> dict[str, tuple[str, bytes]]:
    """Bundle entries for an installed pure-Python package, laid out the way the packer would."""
    module = __import__(package)
    return tree_entries(Path(module.__file__).parent)


def tree_entries(base: Path, top: Path | None = None) -> dict[str, tuple[str, bytes]]:
    """Bundle entries for the files under ``base``, named relative to ``top`` (default: its parent).

    ``.py`` files become modules (``__init__.py`` a package), everything else data; bytecode
    caches and hidden files are skipped.
    """
    top = base.parent if top is None else top
    files: dict[str, tuple[str, bytes]] = {}
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(top)
        if not path.is_file() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo"):
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix == ".py":
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                files[".".join(parts[:-1])] = ("package", path.read_bytes())
            else:
                files[".".join(parts)] = ("module", path.read_bytes())
        else:
            files[rel.as_posix()] = ("data", path.read_bytes())
    return files
