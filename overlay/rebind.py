"""Apply a new version of a module's source to the live module, keeping its state.

``update_module`` is the in-process half of a push: the transaction layer verifies, plans
and orders modules, then calls it once per changed module with one ``Journal`` for the
whole push, and undoes that journal if anything raises.

What it does to one module:

* Top-level statements whose source did not change do not run again, so caches, pools,
  registries and counters survive. Changed and new statements run, one by one and in source
  order, in the module's existing namespace, each compiled on its own with the real file
  name and line numbers. Names whose definitions were deleted are removed.
* A ``def`` or ``class`` that ran again is paired with the old object of the same module,
  qualified name and kind, which is patched in place and stays in the namespace (see
  ``_conform`` and ``_classes``). If only the body of a decorated function changed, its
  decorators do not run again: the undecorated function is compiled and patched into the
  function the old decorators wrapped, so a registration made by a decorator is not repeated.
* Unchanged definitions that moved get their code objects' line numbers fixed, without
  running, so tracebacks point at the right lines of the new file.
* Closures made at run time from changed nested code are found in one heap pass per push
  (``one_heap_pass``), or one per call when there is no batch.
* ``__habanero_migrate__(old_namespace)``, if the module defines it, runs last.

What other threads can observe: each statement's effect lands as it runs, a function's code
swap is a single atomic store, and a class is patched attribute by attribute. A thread
calling into the module during ``update_module`` may run a mix of old and new functions; it
never sees a module-level name vanish and reappear. The caller holds the import lock so no
thread imports a half-applied module; draining requests around the apply is the caller's job.

Known limits: side effects of re-run statements on other objects (appending to another
module's list) are not undone by the journal; only this module's namespace and the objects
patched here are. A class statement's decorators (and its metaclass, and its bases'
``__init_subclass__``) run again when the class changed; what they registered is re-pointed at
the live class afterwards (``rebinding.registrations``), so a registry holds it once.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import linecache
import sys
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from overlay.rebinding import closures, dataflow
from overlay.rebinding.closures import HeapPass, children, is_function_code, makes_functions, moved, pair_nested
from overlay.rebinding.functions import Context, owned_functions, same_value
from overlay.rebinding.journal import MISSING, Journal
from overlay.rebinding.registrations import repoint
from overlay.rebinding.runner import Runner
from overlay.rebinding.statements import Diff, Parsed, Stmt, describe, normalize, plan

__all__ = ["ModuleReport", "check_update", "update_module", "one_heap_pass", "HeapPass", "Journal", "MISSING"]

# Never removed from a module even if no statement binds them: the import system set them.
_MODULE_SPECIALS = frozenset({"__name__", "__file__", "__spec__", "__loader__", "__package__",
                              "__path__", "__builtins__", "__cached__", "__doc__",
                              "__annotations__"})

#: Containers whose identity matters even when a new one is equal to the old: whoever imported the
#: old one would otherwise fill another object than the module's.
_MUTABLE = (list, dict, set, bytearray)

_ACTIVE_PASS: contextvars.ContextVar[HeapPass | None] = contextvars.ContextVar(
    "habanero_heap_pass", default=None)


@dataclass
class ModuleReport:
    """What a push did to one module. Nothing that was not applied is left out."""

    module: str
    reran: list[str] = field(default_factory=list)  # "def handler (line 12)"
    patched: list[str] = field(default_factory=list)  # qualified names patched in place
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (qualname, reason)
    removed: list[str] = field(default_factory=list)  # names whose definition was deleted
    notes: list[str] = field(default_factory=list)  # everything else, with its reason
    #: Top-level defs whose decorators the push changed (they ran again, or are gone):
    #: ``{name: (old decorators, new decorators)}``, as source text. What the old ones registered
    #: (a route) is the framework integration's to drop (see ``overlay.integrations``).
    redecorated: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    #: Unchanged statements that ran again because a name they read was rebound by this push, each
    #: with the names: ``"_RAW = ... (line 40) ran again: it reads TABLE"`` (see ``rebinding.dataflow``).
    followed: list[str] = field(default_factory=list)
    #: Module names this push bound to another value, added or removed: what ``from m import``
    #: statements elsewhere must take again (``overlay.transaction.follow``).
    rebound: list[str] = field(default_factory=list)


@contextlib.contextmanager
def one_heap_pass(journal: Journal, *, budget_s: float = closures.DEFAULT_BUDGET_S,
                  stop_at_budget: bool = False) -> Iterator[HeapPass]:
    """Batch the search for run-time closures of every ``update_module`` call inside.

    The transaction layer wraps the apply step of a push in this block; the heap is then
    walked once, when the block exits without an exception, and what it found is added to
    the reports of the modules concerned::

        with one_heap_pass(journal):
            reports = [update_module(m, src, ..., journal=journal) for m, src in todo]

    The pass is complete and reports going over ``budget_s``; ``stop_at_budget=True`` stops
    it at the budget instead (see ``HeapPass``).
    """
    batch = HeapPass(journal, budget_s, stop_at_budget)
    token = _ACTIVE_PASS.set(batch)
    try:
        yield batch
    finally:
        _ACTIVE_PASS.reset(token)
    batch.run()


def check_update(name: str, new_source: str | bytes, *, filename: str, old_source: str | bytes | None
                 ) -> Diff:
    """What :func:`update_module` will re-run, checked to compile, before anything runs.

    Raises ``SyntaxError`` (or ``ValueError``) exactly when the whole new source would not compile,
    at the cost of the change rather than of the module: the new version's statements outside the
    re-parsed slice are the old version's, which compiled, and every statement that changed is
    compiled here on its own. The one rule that spans statements, that ``from __future__`` imports
    come first, is checked by compiling the whole source whenever such an import sits at or after
    the first changed statement (or the old source is unknown). Pass the result to
    ``update_module(diff=...)``.
    """
    new_text = normalize(new_source)
    old_text = normalize(old_source) if old_source is not None else None
    diff = plan(name, old_text, new_text, filename)
    first = min((p.stmt.lo for p, _ in diff.changed), default=len(new_text))
    if diff.rerun_all or "__future__" in new_text[first:]:
        compile(new_text, filename, "exec", dont_inherit=True)
    else:
        for parsed, _ in diff.changed:  # kept: update_module runs this very code
            diff.compiled[id(parsed.node)] = compile(ast.Module(body=[parsed.node], type_ignores=[]), filename,
                                                     "exec", flags=diff.table.future, dont_inherit=True)
    return diff


def update_module(module: types.ModuleType, new_source: str | bytes, *, filename: str,
                  old_source: str | bytes | None, journal: Journal, version: int | None = None,
                  code: types.CodeType | None = None, migrate: bool = True,
                  diff: Diff | None = None, dirty: Iterable[str] = ()) -> ModuleReport:
    """Bring the live ``module`` to ``new_source``, recording every mutation in ``journal``.

    ``old_source`` is the source the module currently runs. When it is None (unknown), every
    top-level statement runs again, one by one, and every definition is paired with the old
    object of the same qualified name; nothing can be known to be deleted, so nothing is
    removed, and module-level state is reset by its statements running again.
    ``code`` (the whole module compiled by the caller) is accepted but not needed: only the
    statements that changed are compiled, each on its own. ``diff`` is :func:`check_update`'s
    answer for the same sources, when the caller has it. ``dirty`` names what other modules rebound
    that this one imports (``"pkg.mod:name"``, see ``rebinding.dataflow``): the statements reading
    them run again, with the ones that changed.

    Exceptions from the module's own code (a re-run statement, the migration hook) propagate
    unchanged; the caller undoes the journal. A ``SyntaxError`` is raised before anything is
    changed.

    Example::

        journal = Journal()
        report = update_module(sys.modules["app.views"], new_text, filename=path,
                               old_source=old_text, journal=journal, version=7)
        report.patched      # ['handler', 'Greeter.hello']
    """
    del code  # see the docstring: statements are compiled one by one
    namespace = module.__dict__
    report = ModuleReport(module.__name__)
    new_text = normalize(new_source)
    old_text = normalize(old_source) if old_source is not None else None
    if diff is None:
        diff = plan(module.__name__, old_text, new_text, filename)
    ctx = Context(journal, namespace, report, version)

    previous = journal.snapshot(namespace)
    journal.setitem(linecache.cache, filename,
                    (len(new_text), None, new_text.splitlines(True), filename))
    if diff.rerun_all:
        report.notes.append(f"every top-level statement ran again: {diff.reason}")
    _remove_deleted(diff, ctx)
    _fix_moved(diff, ctx, filename, _file_moved(diff, ctx, filename), diff.table.future)
    runner = Runner(ctx, filename, diff, old_text, new_text)
    rebound = _run_statements(runner, diff, ctx, new_text, {*dirty, *report.removed})
    report.rebound = sorted(name for name in rebound if ":" not in name)
    _queue_heap_pass(ctx)
    if ctx.registered:
        places = repoint(ctx.registered, journal)
        if places:
            names = ", ".join(dict.fromkeys(new.__qualname__ for new, _ in ctx.registered))
            report.notes.append(f"definitions ran again ({names}): {len(places)} reference(s) to the "
                                "new objects (registries, tables) now hold the live ones")
    hook = namespace.get("__habanero_migrate__")
    if migrate and callable(hook):
        hook(dict(previous))  # a copy: the hook must not edit what undo restores
        report.notes.append("ran __habanero_migrate__ with the previous namespace")
    return report


def _run_statements(runner: Runner, diff: Diff, ctx: Context, text: str, dirty: set[str]) -> set[str]:
    """Run the changed statements in source order, and every unchanged one that reads a name an
    earlier statement (or another module, ``dirty`` on entry) rebound; return every dirty name."""
    stmts = diff.table.stmts
    namespace = ctx.namespace
    module = str(namespace.get("__name__", ""))
    is_package = "__path__" in namespace
    index: dict[int, int] | None = None
    last = -1  # the last statement run (or looked at) once something was dirty

    def run(new: Parsed, old: Parsed | None, forced: bool) -> None:
        stmt = new.stmt
        before = dict(namespace) if stmt.star else {n: namespace.get(n, MISSING) for n in stmt.binds}
        runner.run(new, old, forced=forced)
        for name, value in before.items():
            now = namespace.get(name, MISSING)
            if now is not value and (type(now) in _MUTABLE or not same_value(now, value)):
                dirty.add(name)  # an equal new list is still another object: its importers need it
        if stmt.star:
            dirty.update(namespace.keys() - before.keys())
            if forced:
                _drop_unexported(new.node, module, is_package, stmts, ctx, dirty)

    def follow(start: int, stop: int) -> None:
        for stmt in stmts[start:stop]:
            piece = text[stmt.lo:stmt.hi]
            if not dataflow.mentions(piece, dirty):
                continue
            node = ast.parse("\n" * (stmt.start - 1) + piece, runner.filename).body[0]
            why = dataflow.reads(node, module, is_package) & dirty
            if why:
                ctx.report.followed.append(f"{describe(node)} ran again: it reads {', '.join(sorted(why))}")
                parsed = Parsed(stmt, node)
                run(parsed, parsed, True)

    for new, old in diff.changed:
        if dirty and not diff.rerun_all:
            if index is None:
                index = {id(s): i for i, s in enumerate(stmts)}
            at = index[id(new.stmt)]
            follow(last + 1, at)
            last = at
        run(new, old, False)
        if dirty and index is None and not diff.rerun_all:
            index = {id(s): i for i, s in enumerate(stmts)}
            last = index[id(new.stmt)]
    if dirty and not diff.rerun_all:
        follow(last + 1, len(stmts))
    return dirty


def _drop_unexported(node: ast.stmt, module: str, is_package: bool, stmts: list[Stmt], ctx: Context,
                     dirty: set[str]) -> None:
    """A ``from m import *`` that ran again because ``m`` changed: the names ``m`` no longer has
    (and no other statement of this module binds) go, as after a fresh start."""
    if not isinstance(node, ast.ImportFrom):
        return
    base = dataflow.resolve(node, module, is_package)
    source = sys.modules.get(base) if base is not None else None
    if source is None:
        return
    for key in sorted(dirty):
        of, _, name = key.partition(":")
        if (of == base and name != "*" and name not in source.__dict__ and name in ctx.namespace
                and not any(name in s.binds for s in stmts)):
            ctx.journal.delitem(ctx.namespace, name)
            ctx.report.removed.append(name)
            dirty.add(name)


def _queue_heap_pass(ctx: Context) -> None:
    batch = _ACTIVE_PASS.get()
    own = batch is None or batch.journal is not ctx.journal
    if own:
        batch = HeapPass(ctx.journal)
    assert batch is not None  # a new one whenever none was active
    batch.add(ctx.required, ctx.report, required=True)
    batch.add(ctx.optional, ctx.report, required=False)
    if own:
        batch.run()


def _remove_deleted(diff: Diff, ctx: Context) -> None:
    """Remove names only deleted statements bound; before new code runs, as a fresh import."""
    candidates: set[str] = set()
    namespace = ctx.namespace
    for gone in diff.gone:
        candidates |= gone.stmt.binds
        node = gone.node
        text = node.value.value if isinstance(node, ast.Expr) and isinstance(
            node.value, ast.Constant) else None
        if isinstance(text, str) and namespace.get("__doc__") == text:
            ctx.journal.setitem(namespace, "__doc__", None)  # the docstring was deleted or edited
        if gone.stmt.star:
            ctx.report.notes.append(
                f"{describe(gone.node)} was deleted; the names it bound were kept, since "
                "which ones they are cannot be known from the source")
    candidates -= _MODULE_SPECIALS
    if not candidates:
        return
    for stmt in diff.table.stmts:
        candidates -= stmt.binds
    for name in sorted(candidates):
        if name in namespace:
            ctx.journal.delitem(namespace, name)
            ctx.report.removed.append(name)


def _file_moved(diff: Diff, ctx: Context, filename: str) -> bool:
    """Whether the live code objects carry another file name than the new version's.

    Known from the previous push when there was one; otherwise (a module first imported from
    disk) one of its functions says. Not ``__file__``: the caller may have updated it already.
    """
    if diff.old_filename is not None:
        return diff.old_filename != filename
    for old, _ in diff.same:
        if old.kind != "other":
            for fn in _functions_in(old, ctx, set()):
                return fn.__code__.co_filename != filename
    return False


def _fix_moved(diff: Diff, ctx: Context, filename: str, refile: bool, flags: int) -> None:
    """Give unchanged definitions that moved the line numbers of the new file, without running."""
    done: set[int] = set()
    memo: dict[int, types.CodeType] = {}
    for old, new in diff.same:
        lines = new.start - old.start
        if lines or refile:
            for fn in _functions_in(old, ctx, done):
                code = fn.__code__
                shifted = moved(code, lines, filename, memo)
                ctx.journal.setattr(fn, "__code__", shifted)
                if makes_functions(code):
                    _pair_tree(code, shifted, ctx)
    for old, parsed in diff.relayout:
        _relayout(old, parsed, ctx, filename, flags, done)


def _functions_in(stmt: Stmt, ctx: Context, done: set[int]) -> Iterator[types.FunctionType]:
    """Live functions whose code an (old) top-level statement compiled."""
    for name in stmt.binds:
        value = ctx.namespace.get(name, MISSING)
        if value is MISSING:
            continue
        for fn in owned_functions(value, ctx.namespace):
            code = fn.__code__
            if (id(fn) not in done and stmt.start <= code.co_firstlineno <= stmt.end
                    and not code.co_filename.startswith("<")):
                done.add(id(fn))
                yield fn


def _pair_tree(old: types.CodeType, new: types.CodeType, ctx: Context) -> None:
    for o, n in zip(children(old), children(new)):
        if is_function_code(o):
            ctx.optional[id(o)] = (o, n)
        _pair_tree(o, n, ctx)


def _relayout(old: Stmt, new: Parsed, ctx: Context, filename: str, flags: int,
              done: set[int]) -> None:
    """Same AST, other comments or blank lines: recompile (not run) and take the line tables."""
    live = list(_functions_in(old, ctx, done))
    if not live:
        return
    compiled: types.CodeType = compile(ast.Module(body=[new.node], type_ignores=[]), filename, "exec",
                                       flags=flags, dont_inherit=True)
    fresh: dict[str, list[types.CodeType]] = {}
    stack = list(children(compiled))
    while stack:
        code = stack.pop(0)
        fresh.setdefault(code.co_qualname, []).append(code)
        stack.extend(children(code))
    by_name: dict[str, list[types.FunctionType]] = {}
    for fn in live:
        by_name.setdefault(fn.__code__.co_qualname, []).append(fn)
    for qualname, fns in by_name.items():
        fns.sort(key=lambda f: f.__code__.co_firstlineno)
        codes = fresh.get(qualname, [])
        if len(codes) != len(fns):
            ctx.report.notes.append(f"line numbers of {qualname} were not updated: its code "
                                    "objects could not be paired one to one")
            continue
        for fn, code in zip(fns, codes):
            if closures.same_logic(fn.__code__, code):
                pair_nested(fn.__code__, code, ctx.optional, ctx.optional)
                ctx.journal.setattr(fn, "__code__", code)
