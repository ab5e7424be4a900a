"""Run the top-level statements a push changed, and pair what they define with old objects.

A ``def`` or ``class`` statement runs with a separate locals dict, so its new object lands
in the module only after it was paired: no thread ever calls an unpaired new function or
instantiates a class that is about to be discarded. The old object of the same qualified
name is patched in place and stays bound. Any other statement runs straight in the module's
namespace (the journal's snapshot of that namespace covers it), and a def or class it
contains (``try: ... except ImportError: def f``) is paired afterwards.

A decorated function whose decorators did not change is compiled without them and patched
into the function the old decorators wrapped: a decorator that registers (a route, a
handler) is not run twice, and everything holding the old wrapper runs the new body.
"""

from __future__ import annotations

import ast
import types
from collections.abc import Sequence
from typing import Any, TypeGuard

from overlay.rebinding.classes import conform_class, conform_for_layout, layout_changed
from overlay.rebinding.functions import Context, clear_caches, conform_function, find_inner
from overlay.rebinding.journal import MISSING
from overlay.rebinding.registrations import may_register
from overlay.rebinding.statements import Diff, Parsed, Region, binds_of, describe

__all__ = ["Runner"]

# Function decorators known to only wrap or mark the function they get, registering it nowhere.
_PURE_FUNCTION_DECORATORS = frozenset({"staticmethod", "classmethod", "property", "wraps", "lru_cache", "cache",
                                       "cached_property", "contextmanager", "asynccontextmanager", "abstractmethod",
                                       "overload", "override", "final", "setter", "getter", "deleter",
                                       "singledispatchmethod", "total_ordering"})

# Class decorators known to only transform the class they get, with no side effect elsewhere.
_PURE_CLASS_DECORATORS = frozenset({"dataclass", "total_ordering", "unique", "final",
                                    "runtime_checkable", "verify", "dataclass_transform"})


class Runner:
    """Runs changed top-level statements and pairs what they define with the old objects."""

    def __init__(self, ctx: Context, filename: str, diff: Diff, old_text: str | None,
                 new_text: str) -> None:
        self.ctx = ctx
        self.filename = filename
        self.future = diff.table.future
        self.compiled = diff.compiled
        self.stmts = diff.table.stmts
        self.rerun_all = diff.rerun_all
        # Without the old source there are no old line ranges: pair by qualified name alone.
        self.by_name = old_text is None
        self.old_text = old_text
        self.new_text = new_text
        self._index: dict[int, int] | None = None
        self.forced = False

    def run(self, new: Parsed, old: Parsed | None, *, forced: bool = False) -> None:
        """Run one changed statement (``old`` is its previous version, if it has one).

        ``forced``: the statement did not change but reads a name this push rebound (see
        ``rebinding.dataflow``): a def takes its defaults anew, a class body counts as changed
        throughout (its attributes take the values it computes from the new inputs).
        """
        node = new.node
        self.ctx.report.reran.append(describe(node))
        self.current, self.previous = new, old
        self.forced = forced
        old_node = old.node if old is not None and type(old.node) is type(node) else None
        if self.rerun_all or (forced and isinstance(node, ast.ClassDef)):
            old_node = None  # compile flags may have changed: every definition is new code
        # old_node is None or of node's very type (checked above): mypy cannot see the latter.
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self._def(node, old_node)  # type: ignore[arg-type]
        elif isinstance(node, ast.ClassDef):
            regions = None
            if old_node is not None and old is not None and self.old_text is not None:
                regions = (Region(self.old_text, old.stmt.lo, old.stmt.hi, old.stmt.start),
                           Region(self.new_text, new.stmt.lo, new.stmt.hi, new.stmt.start))
            self._class(node, old_node, regions)  # type: ignore[arg-type]
        else:
            self._other(node, new.stmt is self.stmts[0])

    # -- which objects belong to this statement ----------------------------------------------

    def _find_old(self, obj: Any, name: str) -> tuple[types.FunctionType, list[Any]] | None:
        """The function the old version of this statement defined, found inside ``obj``.

        Its code must lie within that statement's old lines: two statements may define the
        same name (``@f.register def _``), and the name then holds the other one's function.
        """
        found = find_inner(obj, name, self.ctx.namespace) if obj is not MISSING else None
        if found is None or self.by_name:
            return found
        old = self.previous
        first = found[0].__code__.co_firstlineno
        return found if old is not None and old.stmt.start <= first <= old.stmt.end else None

    def _bind(self, name: str, value: Any) -> None:
        """Bind a name as the statement would, unless a later, unchanged statement binds it
        again: in a fresh import that later binding is what the name ends up holding."""
        if not self.rerun_all:
            if self._index is None:
                self._index = {id(s): i for i, s in enumerate(self.stmts)}
            later = self.stmts[self._index[id(self.current.stmt)] + 1:]
            shadow = next((s for s in later if name in s.binds), None)
            if shadow is not None:
                self.ctx.report.notes.append(
                    f"{name} keeps the object bound by the later statement at line "
                    f"{shadow.start}, which did not change; the one from line "
                    f"{self.current.node.lineno} was not bound")
                return
        self.ctx.journal.setitem(self.ctx.namespace, name, value)

    # -- compiling and running ---------------------------------------------------------------

    def _compile(self, node: ast.stmt, *, docstring: bool = False) -> types.CodeType:
        body = [node]
        if (not docstring and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            # Alone in a module, a string statement would become the module's __doc__.
            body = [ast.Pass(lineno=node.lineno, col_offset=0, end_lineno=node.lineno,
                             end_col_offset=0), node]
        else:
            code = self.compiled.get(id(node))  # check_update compiled it, the same way
            if code is not None and code.co_filename == self.filename:
                return code
        module: types.CodeType = compile(ast.Module(body=body, type_ignores=[]), self.filename, "exec",
                                         flags=self.future, dont_inherit=True)
        return module

    def _scratch(self, node: ast.stmt) -> dict[str, Any]:
        """Run a def/class statement with a separate locals dict: its new object is bound
        only once it was paired, so no thread ever sees an unpaired new class or function."""
        scratch: dict[str, Any] = {}
        exec(self._compile(node), self.ctx.namespace, scratch)
        for key, value in scratch.items():
            if key != getattr(node, "name", None):  # e.g. a := in a decorator
                self.ctx.journal.setitem(self.ctx.namespace, key, value)
        return scratch

    # -- kinds of statements -----------------------------------------------------------------

    def _def(self, node: ast.FunctionDef | ast.AsyncFunctionDef,
             old_node: ast.FunctionDef | ast.AsyncFunctionDef | None) -> None:
        ctx, name = self.ctx, node.name
        old_obj = ctx.namespace.get(name, MISSING)
        same_decorators = old_node is not None and _dumps(old_node.decorator_list) == _dumps(
            node.decorator_list)
        same_defaults = (old_node is not None and not self.forced
                         and _defaults(old_node) == _defaults(node))
        if old_node is not None and not same_decorators:
            ctx.report.redecorated[name] = ([ast.unparse(d) for d in old_node.decorator_list],
                                            [ast.unparse(d) for d in node.decorator_list])
        refused = None
        if same_decorators and node.decorator_list:
            found = self._find_old(old_obj, name)
            if found is not None:
                bare = _undecorated(node)
                refused = conform_function(found[0], self._scratch(bare)[name], ctx,
                                           same_defaults=same_defaults)
                if refused is None:
                    clear_caches(found[1], name, ctx)
                    ctx.report.patched.append(name)
                    return
        new_obj = self._scratch(node).get(name)
        impure = any(_decorator_name(d) not in _PURE_FUNCTION_DECORATORS for d in node.decorator_list)
        self._bind_function(name, old_obj, new_obj, same_defaults, refused, impure)

    def _bind_function(self, name: str, old_obj: Any, new_obj: Any, same_defaults: bool,
                       refused: str | None, registers: bool = False) -> None:
        ctx, report = self.ctx, self.ctx.report
        found_old = self._find_old(old_obj, name)
        found_new = find_inner(new_obj, name, ctx.namespace)
        if found_old is None or found_new is None:
            self._bind(name, new_obj)
            other = find_inner(old_obj, name, ctx.namespace) if old_obj is not MISSING else None
            if other is not None and self.previous is not None:
                report.replaced.append((name, (
                    f"the {name} bound in the module was defined at line "
                    f"{other[0].__code__.co_firstlineno}, not by this statement's previous "
                    f"version (lines {self.previous.stmt.start}-{self.previous.stmt.end}), so "
                    "it was left alone and this statement's decorators ran again; references to "
                    "the function this statement made before the push keep the old code")))
            elif isinstance(old_obj, type):
                _report_kind_change(name, old_obj, new_obj, ctx)
            elif old_obj is not MISSING and name in (getattr(old_obj, "__qualname__", None),
                                                     getattr(old_obj, "__name__", None)):
                report.replaced.append((name, (
                    f"the function defined as {name} could not be found inside the "
                    f"{type(old_obj).__name__} bound to it, so it was not patched: references "
                    "taken before the push keep the old object")))
            return
        reason = refused or conform_function(found_old[0], found_new[0], ctx,
                                             same_defaults=same_defaults)
        if reason is not None:
            self._bind(name, new_obj)
            report.replaced.append((name, reason))
            return
        clear_caches(found_old[1], name, ctx)
        report.patched.append(name)
        if registers:
            # Its decorators ran again on the new function: what they registered must be the live
            # one, once (``rebinding.registrations``).
            ctx.registered.append((found_new[0], found_old[0]))
        if old_obj is found_old[0] and new_obj is found_new[0]:
            return  # no wrapper on either side: the old function stays, now running new code
        self._bind(name, new_obj)
        report.replaced.append((name, (
            "its decorators changed and ran again, so the name now refers to the newly "
            "decorated object; references taken before the push keep the old decorated "
            "object, whose function was patched and runs the new code")))

    def _class(self, node: ast.ClassDef, old_node: ast.ClassDef | None,
               regions: tuple[Region, Region] | None) -> None:
        ctx, name = self.ctx, node.name
        new_obj = self._scratch(node).get(name)
        impure = [ast.unparse(d) for d in node.decorator_list
                  if _decorator_name(d) not in _PURE_CLASS_DECORATORS]
        old_obj = ctx.namespace.get(name, MISSING)
        if not (_ours(old_obj, name, ctx) and _ours(new_obj, name, ctx)):
            self._bind(name, new_obj)
            if not isinstance(old_obj, type):
                _report_kind_change(name, old_obj, new_obj, ctx)
            return
        at = len(ctx.report.patched)
        reason = conform_class(old_obj, new_obj, old_node, node, ctx, regions)
        if reason is None:
            ctx.report.patched.insert(at, name)
            if may_register(new_obj, bool(impure)):
                ctx.registered.append((new_obj, old_obj))
            return
        if impure:
            ctx.report.notes.append(
                f"class {name}: its decorators ran again on the new class ("
                + ", ".join("@" + d for d in impure) + "), which replaced the old one; what they "
                "registered now names the new class")
        self._bind(name, new_obj)
        ctx.report.replaced.append((name, reason))
        if layout_changed(old_obj, new_obj):
            conform_for_layout(old_obj, new_obj, old_node, node, ctx, regions)
        for sub in old_obj.__subclasses__():
            ctx.report.notes.append(
                f"{sub.__module__}.{sub.__qualname__} still derives from the previous {name}: "
                "it was not defined again (change its class statement to rebuild it)")

    def _other(self, node: ast.stmt, first: bool) -> None:
        """Any other statement runs straight in the namespace (the journal's snapshot covers
        it); a def or class inside it (``try: ... except: def f``) is still paired."""
        ctx = self.ctx
        binds = binds_of(node)
        before = {name: ctx.namespace.get(name, MISSING) for name in binds}
        exec(self._compile(node, docstring=first), ctx.namespace)
        for name, old in before.items():
            new = ctx.namespace.get(name, MISSING)
            if old is MISSING or new is MISSING or old is new:
                continue
            if _pairable_function(old, new, name, node, ctx):
                reason = conform_function(old, new, ctx)
                if reason is None:
                    ctx.journal.setitem(ctx.namespace, name, old)
                    ctx.report.patched.append(name)
                else:
                    ctx.report.replaced.append((name, reason))
            elif _ours(old, name, ctx) and _ours(new, name, ctx):
                defs = [n for n in ast.walk(node) if isinstance(n, ast.ClassDef) and n.name == name]
                reason = conform_class(old, new, None, defs[-1] if defs else None, ctx)
                if reason is None:
                    ctx.journal.setitem(ctx.namespace, name, old)
                    ctx.report.patched.append(name)
                else:
                    ctx.report.replaced.append((name, reason))


def _dumps(nodes: Sequence[ast.expr | None]) -> list[str]:
    return [ast.dump(n) if n is not None else "" for n in nodes]


def _defaults(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[list[str], list[tuple[str, str]]]:
    """What ``__defaults__``/``__kwdefaults__`` are made of: equal means keep the old objects.

    Keyword-only defaults are keyed by parameter name, so the names count too.
    """
    args = node.args
    return _dumps(args.defaults), [(a.arg, ast.dump(d)) for a, d in
                                   zip(args.kwonlyargs, args.kw_defaults) if d is not None]


def _kind_of(obj: Any) -> str:
    return "class" if isinstance(obj, type) else "function" if callable(obj) else "value"


def _report_kind_change(name: str, old: Any, new: Any, ctx: Context) -> None:
    """A top-level definition now makes another kind of object: say so."""
    if old is MISSING or name not in (getattr(old, "__qualname__", None),
                                      getattr(old, "__name__", None)):
        return  # not this name's definition before (an alias, a plain value): a rebinding
    ctx.report.replaced.append((name, f"changed from a {_kind_of(old)} to a {_kind_of(new)}: "
                                      "references taken before the push keep the old one"))


def _undecorated(node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.stmt:
    """The def without decorators, keeping the first line where a decorated def starts."""
    bare = type(node)(**{f: getattr(node, f) for f in node._fields})
    bare.decorator_list = []
    ast.copy_location(bare, node)
    bare.lineno = min(d.lineno for d in node.decorator_list)
    return bare


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _ours(obj: object, name: str, ctx: Context) -> TypeGuard[type[object]]:
    """A class this module defined under this top-level name (not an alias of another)."""
    return (isinstance(obj, type) and obj.__qualname__ == name
            and obj.__module__ == ctx.namespace.get("__name__"))


def _pairable_function(old: Any, new: Any, name: str, node: ast.stmt, ctx: Context) -> bool:
    if not (type(old) is types.FunctionType and type(new) is types.FunctionType):
        return False
    if old.__globals__ is not ctx.namespace or new.__globals__ is not ctx.namespace:
        return False
    if old.__code__.co_qualname == new.__code__.co_qualname == name:
        return True
    # ``name = lambda ...``: the lambda is this name's definition, though it is not named.
    return (old.__code__.co_qualname == new.__code__.co_qualname == "<lambda>"
            and isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Lambda) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name))
