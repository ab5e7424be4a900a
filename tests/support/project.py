"""Small projects on disk for the packer's tests: a pyproject with [tool.habanero] and some packages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The console script next to the interpreter running the tests (.venv/bin/habanero-pack).
HABANERO_PACK = Path(sys.executable).with_name("habanero-pack")

SHOP = {
    "shop/__init__.py": "VERSION = 1\n",
    "shop/cart.py": "def total(items):\n    return sum(items)\n",
    "shop/admin/__init__.py": "",
    "shop/admin/views.py": "def index():\n    return 'admin'\n",
    "shop/templates/index.html": "<h1>shop</h1>\n",
    "shop/static/site.css": "body { color: red }\n",
}


def make_project(root: Path, files: dict[str, str | bytes] | None = None, *,
                 table: str = 'packages = ["shop"]\n') -> Path:
    """Write ``root/pyproject.toml`` with ``[tool.habanero]`` holding ``table``, and ``files``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "demo"\n\n[tool.habanero]\n{table}',
                                         encoding="utf-8")
    write_files(root, SHOP if files is None else files)
    return root


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)


def age(root: Path, seconds: float = 3600) -> None:
    """Make every file under ``root`` look ``seconds`` old, past the snapshot's settle window."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def clean_env(home: Path) -> dict[str, str]:
    """The environment for a ``habanero-pack`` child: no HABANERO_* leaking in, an empty HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HABANERO_") or k == "HABANERO_RUNTIME_DIR"}
    env["HOME"] = str(home)
    return env
