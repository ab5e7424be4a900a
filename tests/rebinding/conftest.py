"""Fixtures for the rebinding scenarios: a real module loaded from v1, pushed to v2.

Each scenario is a pair of source files, ``snippets/NAME_v1.py`` and ``NAME_v2.py`` (or
inline strings where a couple of lines say it better). ``live(...)`` writes v1 to a real file,
executes it as a module registered in ``sys.modules`` under a unique name, and returns a
handle whose ``push(v2)`` calls ``update_module`` with a journal. ``sys.modules`` and
``linecache`` are restored after every test, even a failing one.
"""

from __future__ import annotations

import itertools
import linecache
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from overlay.rebinding.journal import Journal
from overlay.rebind import ModuleReport, update_module

SNIPPETS = Path(__file__).parent / "snippets"
_names = itertools.count()


@pytest.fixture
def snippet():
    """``snippet("greeter_v1") -> str``: the text of ``snippets/greeter_v1.py``."""
    return lambda name: (SNIPPETS / f"{name}.py").read_text()


@dataclass
class Live:
    """A module running some version of its source, that can be pushed to the next one."""

    module: types.ModuleType
    source: str
    directory: Path
    journal: Journal = field(default_factory=Journal)
    version: int = 1

    @property
    def ns(self) -> dict:
        return self.module.__dict__

    def path(self, version: int) -> Path:
        return self.directory / f"{self.module.__name__}_v{version}.py"

    def push(self, new_source: str, *, old_source: str | None | bool = True,
             migrate: bool = True) -> ModuleReport:
        """Apply ``new_source`` like a deploy would; the journal keeps the undos."""
        version = self.version + 1
        path = self.path(version)
        path.write_text(new_source)
        report = update_module(
            self.module, new_source, filename=str(path), journal=self.journal,
            old_source=self.source if old_source is True else old_source, version=version,
            migrate=migrate)
        self.source, self.version = new_source, version
        return report

    def undo(self) -> None:
        self.journal.undo()


@pytest.fixture
def live(tmp_path, request):
    """``live(v1_source) -> Live``: a fresh module running ``v1_source``."""
    saved_modules = dict(sys.modules)
    saved_lines = dict(linecache.cache)

    def make(source: str, name: str | None = None) -> Live:
        name = name or f"habanero_scenario_{request.node.name.split('[')[0]}_{next(_names)}"
        module = types.ModuleType(name)
        path = tmp_path / f"{name}_v1.py"
        path.write_text(source)
        module.__file__ = str(path)
        sys.modules[name] = module
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)
        return Live(module, source, tmp_path)

    yield make
    for name in [n for n in sys.modules if n not in saved_modules]:
        del sys.modules[name]
    sys.modules.update(saved_modules)
    linecache.cache.clear()
    linecache.cache.update(saved_lines)
