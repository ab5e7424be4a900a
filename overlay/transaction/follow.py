"""Imports follow their sources: ``from m import ...`` elsewhere takes again what a push rebound in ``m``.

A fresh start of the new version runs ``from .recipes import *`` in ``__init__`` after the new
``recipes`` ran, so a function ``recipes`` gained is in the package's namespace, and a removed one is
not. A push re-runs the changed modules only; the import statements of the modules that did not
change still hold what they took before. So, after each module runs, the names it bound to another
value, added or removed (``ModuleReport.rebound``) are handed to every live module of the bundle
that imports from it with ``from m import *`` or ``from m import name``: those statements run again
there, and whatever they rebind in turn reaches the statements and modules after them
(``rebinding.dataflow``), in dependency order: a module that the plan will run anyway gets the names
before its turn; one that is unchanged, or ran already, runs its affected statements right away.

Limits: modules outside the bundle's packages are not followed (their imports keep the old
objects), nor is ``import m`` (it binds the module, whose attributes are the new ones anyway).
"""

from __future__ import annotations

import collections
import re
import types
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from overlay.bundle import Bundle
from overlay.rebinding.dataflow import import_key
from overlay.transaction.plan import ModuleChange, Plan, import_words, imported_names

__all__ = ["run_plan", "importers"]

#: How often one module may be followed in one push: star imports that feed each other settle after
#: a round or two (a statement that takes the same objects again rebinds nothing).
_MAX_ROUNDS = 4


class _Report(Protocol):  # the part of ``rebind.ModuleReport`` this module reads
    module: str
    rebound: list[str]


_R = TypeVar("_R", bound=_Report)


def run_plan(plan: Plan, run: Callable[[ModuleChange, set[str]], _R], *,
             live: Callable[[str], types.ModuleType | None], filename_of: Callable[[str], str]) -> list[_R]:
    """Run ``plan.rerun`` in order through ``run(change, dirty)``, and follow rebound names into the
    modules that import them (see the module docstring). Returns every module's report, in order."""
    queue = collections.deque(plan.rerun)
    pending = collections.Counter(c.name for c in queue)
    seeds: dict[str, set[str]] = {}
    rounds: collections.Counter[str] = collections.Counter()
    reports = []
    while queue:
        change = queue.popleft()
        pending[change.name] -= 1
        report = run(change, seeds.pop(change.name, set()))
        reports.append(report)
        if not report.rebound:
            continue
        for name, keys in importers(plan.target, change.name, report.rebound, live).items():
            if name == change.name:
                continue
            seeds.setdefault(name, set()).update(keys)
            if pending[name] > 0:
                continue  # runs later in this push, and takes the names then
            rounds[name] += 1
            if rounds[name] > _MAX_ROUNDS:
                continue
            entry = plan.target.entries[name]
            source = plan.target.read(name)
            queue.appendleft(ModuleChange(name, entry.kind, source, source, filename_of(name)))
            pending[name] += 1
    return reports


#: Per source (module name, kind, sha256): the words of its import lines, and whether it has a
#: relative import. Enough to rule out a module as an importer without reading its source again:
#: a push that rebinds a name asks about every live module, and reading a thousand sources from
#: the store each time cost milliseconds per push in every process. Holds the last target's
#: modules only (a few hundred bytes each).
_SCANS: dict[tuple[str, str, str], tuple[frozenset[bytes], bool]] = {}


def importers(target: Bundle, module: str, names: Iterable[str],
              live: Callable[[str], types.ModuleType | None]) -> dict[str, set[str]]:
    """The live modules of ``target`` that import from ``module`` by name or with ``*``, each with
    the dirty keys to run with (``"module:name"``, ``"module:*"``)."""
    names = list(names)
    keys = {import_key(module, n) for n in names} | {import_key(module, "*")}
    tail = module.rpartition(".")[2].encode()
    words = re.compile(rb"import\s*\*|\b(?:" + b"|".join(re.escape(n.encode()) for n in names) + rb")\b")
    found: dict[str, set[str]] = {}
    scans: dict[tuple[str, str, str], tuple[frozenset[bytes], bool]] = {}
    for name, entry in target.entries.items():
        if entry.kind == "data" or live(name) is None:
            continue
        key = (name, entry.kind, entry.sha256)
        source: bytes | None = None
        scan = _SCANS.get(key)
        if scan is None:
            source = target.read(name)
            scan = (frozenset(import_words(source)), b"from ." in source)
        scans[key] = scan
        # An import of ``module`` names its last part on an import line, or is relative.
        if tail not in scan[0] and not scan[1]:
            continue
        if source is None:
            source = target.read(name)
        if not words.search(source):
            continue
        if module in imported_names(name, entry.kind == "package", source):
            found[name] = set(keys)
    _SCANS.clear()
    _SCANS.update(scans)
    return found
