"""Code objects: pairing old with new, moving line numbers, and retargeting live closures.

A function made at run time (a closure from a factory, a lambda) runs a *nested* code object
of the def that made it. After a push that def is patched, but the closures it already made
still hold the old nested code. Finding them takes a pass over the heap, and a pass costs
tens of milliseconds at a million objects, so:

* only nested code objects are ever looked for (module-level functions and methods are
  reached through the module and patched directly);
* every module of a push adds its pairs to one ``HeapPass``, which walks the heap once
  (``gc.get_referrers`` of all the old code objects together), keeping only
  ``type(o) is FunctionType`` whose ``__code__`` is queued;
* a pass over its time budget is reported (or, on request, stopped at the budget).

Pairs that only fix line numbers (an unchanged def that moved) ride along when a pass runs
anyway, but never cause one.
"""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import CodeType, FunctionType
from typing import Any, Protocol

from overlay.rebinding.journal import Journal

__all__ = ["Pairs", "children", "makes_functions", "is_function_code", "pair_nested",
           "same_logic", "moved", "HeapPass", "Report"]

DEFAULT_BUDGET_S = 0.050
_CHUNK = 1 << 16  # objects checked between two looks at the clock


def children(code: CodeType) -> Iterator[CodeType]:
    """The code objects nested directly in ``code`` (its defs, lambdas, class bodies)."""
    for const in code.co_consts:
        if type(const) is CodeType:
            yield const


def makes_functions(code: CodeType) -> bool:
    """Whether running ``code`` can leave function objects behind that hold nested code.

    Comprehensions and generator expressions are nested code too, but the function made from
    them is called at once and dropped; a running generator keeps its own frame anyway.
    """
    for child in children(code):  # noqa: SIM110  (a loop: any() over a generator costs ~60% more per call)
        if is_function_code(child) or makes_functions(child):
            return True
    return False


def is_function_code(code: CodeType) -> bool:
    """Code a live function object may hold: a def or lambda, not a comprehension."""
    name = code.co_name
    transient = name.startswith("<") and name != "<lambda>"
    return bool(code.co_flags & inspect.CO_OPTIMIZED) and not transient


Pairs = dict[int, tuple[CodeType, CodeType]]  # id(old) -> (old, new): code objects compare
# by content, and two equal code objects in two places must not be confused


class Report(Protocol):
    """What the rebinding steps tell about one module: ``rebind.ModuleReport``, which the face defines."""

    reran: list[str]
    patched: list[str]
    replaced: list[tuple[str, str]]  # (qualname, reason)
    removed: list[str]
    notes: list[str]
    redecorated: dict[str, tuple[list[str], list[str]]]
    followed: list[str]


def pair_nested(old: CodeType, new: CodeType, required: Pairs, optional: Pairs) -> None:
    """Add ``old_nested -> new_nested`` pairs, matched by qualified name.

    Pairs whose logic changed go to ``required`` (worth a heap pass); pairs that differ only
    in line numbers go to ``optional``. Siblings sharing a qualified name (two lambdas in one
    def) pair by order when both versions have the same number of them; otherwise they are
    left unpaired, since guessing would run one lambda's closure on another lambda's code.
    """
    olds: dict[str, list[CodeType]] = {}
    news: dict[str, list[CodeType]] = {}
    for c in children(old):
        olds.setdefault(c.co_qualname, []).append(c)
    for c in children(new):
        news.setdefault(c.co_qualname, []).append(c)
    for qualname, old_list in olds.items():
        new_list = news.get(qualname, [])
        if len(old_list) != len(new_list):
            continue
        for o, n in zip(old_list, new_list):
            if o == n and o.co_filename == n.co_filename:
                continue  # identical, line numbers included: nothing to retarget below either
            if is_function_code(o):
                (optional if same_logic(o, n) else required)[id(o)] = (o, n)
            pair_nested(o, n, required, optional)


def same_logic(a: CodeType, b: CodeType) -> bool:
    """Whether two code objects differ at most in line numbers and file name."""
    if (a.co_code, a.co_names, a.co_varnames, a.co_freevars, a.co_cellvars, a.co_flags,
            a.co_argcount, a.co_kwonlyargcount, a.co_exceptiontable) != (
            b.co_code, b.co_names, b.co_varnames, b.co_freevars, b.co_cellvars, b.co_flags,
            b.co_argcount, b.co_kwonlyargcount, b.co_exceptiontable):
        return False
    if len(a.co_consts) != len(b.co_consts):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if type(x) is CodeType and type(y) is CodeType:
            if not same_logic(x, y):
                return False
        # Equal floats can still differ: 0.0 == -0.0, so their reprs are compared too.
        elif type(x) is not type(y) or x != y or (type(x) in (float, complex) and repr(x) != repr(y)):
            return False
    return True


def moved(code: CodeType, lines: int, filename: str, memo: dict[int, CodeType]) -> CodeType:
    """``code`` and everything nested in it, ``lines`` further down and in ``filename``.

    The line table is relative to ``co_firstlineno``, so shifting that one number moves
    every line of a code object; nested code objects carry their own and are moved too.
    """
    done = memo.get(id(code))
    if done is not None:
        return done
    changes: dict[str, Any] = {"co_firstlineno": code.co_firstlineno + lines,
                               "co_filename": filename}
    if any(type(c) is CodeType for c in code.co_consts):
        changes["co_consts"] = tuple(moved(c, lines, filename, memo) if type(c) is CodeType
                                     else c for c in code.co_consts)
    result = memo[id(code)] = code.replace(**changes)
    return result


@dataclass
class _Target:
    old: CodeType  # kept alive here, so its id stays unique while queued
    new: CodeType
    sink: Report  # the ModuleReport to tell
    required: bool  # False: only line numbers change; never worth a pass on its own
    patched: int = 0
    refused: int = 0


@dataclass
class HeapPass:
    """Old→new code pairs from one or more modules, applied to live functions in one pass.

    By default the pass is complete: one ``gc.get_referrers`` call walks the heap in C (about
    18 ms per million tracked objects, half the cost of a Python loop over
    ``gc.get_objects()``), and exceeding ``budget_s`` is reported, not enforced. Stopping
    early would leave some closures on the old code, a half-applied push. With
    ``stop_at_budget=True`` the walk is a Python loop over ``gc.get_objects()`` that checks the
    clock every 65,536 objects and stops at the budget, reporting what it did not reach.
    """

    journal: Journal
    budget_s: float = DEFAULT_BUDGET_S
    stop_at_budget: bool = False
    _targets: dict[int, _Target] = field(default_factory=dict)

    def add(self, pairs: Pairs, sink: Report, *, required: bool = True) -> None:
        """Queue ``pairs``; ``sink`` is the report that hears about what happened to them."""
        for key, (old, new) in pairs.items():
            if old is not new and (required or key not in self._targets):
                self._targets[key] = _Target(old, new, sink, required)

    def run(self) -> None:
        """Retarget every live function running a queued old code object, then report."""
        targets, self._targets = self._targets, {}
        if not targets:
            return
        if not any(t.required for t in targets.values()):
            _report_skipped(targets)
            return
        started = time.perf_counter()
        if self.stop_at_budget:
            hits, unreached = _walk_objects(targets, started + self.budget_s)
        else:
            olds = [t.old for t in targets.values()]
            hits = [o for o in gc.get_referrers(*olds)
                    if type(o) is FunctionType and id(o.__code__) in targets]
            unreached = ""
        elapsed_ms = (time.perf_counter() - started) * 1000
        for fn in hits:
            target = targets[id(fn.__code__)]
            if fn.__code__.co_freevars == target.new.co_freevars:
                self.journal.setattr(fn, "__code__", target.new)
                target.patched += 1
            else:
                target.refused += 1
        _report(targets)
        budget_ms = self.budget_s * 1000
        if unreached:
            note = (f"the search for closures made at run time stopped at its {budget_ms:.0f} ms "
                    f"budget after {elapsed_ms:.0f} ms, {unreached}: closures there may still "
                    "run old code until they are made again")
        elif elapsed_ms > budget_ms:
            note = (f"the search for closures made at run time took {elapsed_ms:.0f} ms, over "
                    f"its {budget_ms:.0f} ms budget (it is proportional to the number of live "
                    "objects); it still covered the whole heap")
        else:
            return
        for sink in {id(t.sink): t.sink for t in targets.values()}.values():
            sink.notes.append(note)


def _walk_objects(targets: dict[int, _Target], deadline: float) -> tuple[list[FunctionType], str]:
    """The interruptible walk: functions running a queued code, and what was not reached."""
    hits: list[FunctionType] = []
    lookup = targets.get
    objects = gc.get_objects()
    total, scanned = len(objects), 0
    try:
        for begin in range(0, total, _CHUNK):
            chunk = objects[begin:begin + _CHUNK]
            hits.extend([o for o in chunk
                         if type(o) is FunctionType and lookup(id(o.__code__)) is not None])
            scanned = begin + len(chunk)
            if time.perf_counter() > deadline:
                break
    finally:
        del objects  # a list of every object in the process: drop it before anything else
    unreached = f"{total - scanned} of {total} objects not searched" if scanned < total else ""
    return hits, unreached


def _report(targets: dict[int, _Target]) -> None:
    for t in targets.values():
        old, name = t.old, t.old.co_qualname
        if t.patched and t.required:
            t.sink.patched.append(f"{name} ({_plural(t.patched, 'function')} made at run time)")
        if t.refused:
            t.sink.replaced.append((name, (
                f"free variables changed from {old.co_freevars} to {t.new.co_freevars}: "
                f"{_plural(t.refused, 'function')} made before the push from this code keep "
                f"the old code (a closure's cells cannot be reshaped in place); functions "
                f"made from now on run the new code")))


def _report_skipped(targets: dict[int, _Target]) -> None:
    by_sink: dict[int, tuple[Report, set[str]]] = {}
    for t in targets.values():
        by_sink.setdefault(id(t.sink), (t.sink, set()))[1].add(t.old.co_qualname)
    for sink, names in by_sink.values():
        sink.notes.append(
            "line numbers not updated in closures already made from moved, unchanged code ("
            + ", ".join(sorted(names)) + "): no search of the heap was needed for this push; "
            "their tracebacks may show old line numbers until they are made again")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
