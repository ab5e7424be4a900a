"""What a push changes, decided before anything runs.

The plan diffs the target bundle against what the process runs now, entry hash by entry hash,
compiles every module that will run again (a ``SyntaxError`` anywhere refuses the whole bundle),
refuses a bundle that removes a module other modules still import, and orders the modules to
re-execute so that a module runs after the modules whose new names it needs.
"""

from __future__ import annotations

import ast
import hashlib
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypedDict, TypeVar

from overlay.bundle import Bundle
from overlay.errors import CompileFailed, ModuleInUse
from overlay.transaction.diff import EntryDiff

if TYPE_CHECKING:
    from overlay.rebinding.statements import Diff

_T = TypeVar("_T")

Compiler = Callable[[str, bytes, str], types.CodeType]


class Checker(Protocol):
    """``rebind.check_update``: the statements of a live module that changed, compiled one by one."""

    def __call__(self, name: str, new_source: bytes, /, *, filename: str, old_source: bytes) -> Diff: ...


@dataclass
class ModuleChange:
    name: str
    kind: str                  # "module" or "package"
    new_source: bytes
    old_source: bytes | None   # None: the module is not live, or its old source is unknown
    filename: str              # the new version's file for tracebacks
    code: types.CodeType | None = None
    checked: Diff | None = None  # the statement diff a Checker answered (then ``code`` is None)


class PlanSummary(TypedDict):
    """What a push adds, changes and removes: the fields of ``UpgradeReport`` of the same names."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    data_changed: list[str]


@dataclass
class Plan:
    target: Bundle
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    data_changed: list[str] = field(default_factory=list)
    rerun: list[ModuleChange] = field(default_factory=list)  # live modules to update, in order

    def summary(self) -> PlanSummary:
        return {"added": self.added, "changed": self.changed, "removed": self.removed,
                "data_changed": self.data_changed}


def make_plan(
    current: Bundle | None,
    target: Bundle,
    diff: EntryDiff,
    *,
    live: Callable[[str], types.ModuleType | None],
    old_source_of: Callable[[types.ModuleType], bytes | None],
    filename_of: Callable[[str], str],
    compile_module: Compiler,
    check_update: Checker | None = None,
) -> Plan:
    """Diff, compile and order. Raises ``CompileFailed`` or ``BundleRejected``; runs nothing.

    Only the entries in ``diff`` are looked at: a push costs what it changed. ``live`` answers
    whether a module of the target is imported (its module object, or None). A live module whose
    old source is known is checked by ``check_update`` (the statements that changed, compiled one
    by one: a one-function change in a 2,000-line module costs one function's compile), the others
    are compiled whole by ``compile_module``.
    """
    new_entries = target.entries
    old_entries = current.entries if current is not None else {}

    def is_data(name: str) -> bool:
        entry = new_entries.get(name) or old_entries[name]
        return entry.kind == "data"

    plan = Plan(target)
    plan.added = sorted(n for n in diff.added if not is_data(n))
    plan.changed = sorted(n for n in diff.changed if not is_data(n))
    plan.removed = sorted(n for n in diff.removed if not is_data(n))
    plan.data_changed = sorted(n for n in diff.names if is_data(n))
    _refuse_removed_in_use(plan.removed, target)

    changes: dict[str, ModuleChange] = {}
    for name in sorted((*plan.added, *plan.changed)):
        module = live(name)
        entry = new_entries[name]
        if name in old_entries:
            old_source = current.read(name) if current is not None else None
        elif module is not None:
            # Live but not in the current bundle: imported from disk (before the first push, or
            # a module the bundle lacked until now).
            old_source = old_source_of(module)
            if old_source is not None and hashlib.sha256(old_source).hexdigest() == entry.sha256:
                continue
        else:
            old_source = None
        filename = filename_of(name)
        source = target.read(name)
        change = ModuleChange(name, entry.kind, source, old_source, filename)
        if module is not None and old_source is not None and check_update is not None:
            change.checked = _compile(
                lambda n, s, f: check_update(n, s, filename=f, old_source=old_source),  # noqa: B023  (called at once)
                name, source, filename)
        else:
            change.code = _compile(compile_module, name, source, filename)
        if module is not None:
            changes[name] = change
    plan.rerun = [changes[n] for n in dependency_order(changes, target)]
    return plan


def _compile(compile_module: Callable[[str, bytes, str], _T], name: str, source: bytes, filename: str) -> _T:
    try:
        return compile_module(name, source, filename)
    except SyntaxError as exc:
        where = f"{exc.filename or filename}, line {exc.lineno}"
        raise CompileFailed(
            f"{name} does not compile: {exc.msg} ({where}); fix it and push again — nothing ran",
            module=name, file=exc.filename or filename, line=exc.lineno, text=(exc.text or "").rstrip(),
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # NUL bytes, bad encoding cookie
        raise CompileFailed(f"{name} does not compile: {exc}; nothing ran", module=name) from None


def imported_names(name: str, is_package: bool, source: bytes) -> set[str]:
    """Absolute names of the modules a module's source imports (relative imports resolved)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_statements(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                if node.level - 1 > len(anchor):
                    continue
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if not base:
                continue
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


_WORD = re.compile(rb"\w+")


def import_words(source: bytes) -> set[bytes]:
    """Every word of the lines that mention ``import`` (with a parenthesised name list that
    continues on later lines): a superset of the names a module imports, found without parsing.
    A prefilter for :func:`imported_names`."""
    words: set[bytes] = set()
    at = source.find(b"import")
    while at != -1:
        start = source.rfind(b"\n", 0, at) + 1
        end = source.find(b"\n", at)
        end = len(source) if end == -1 else end
        line = source[start:end]
        if b"(" in line and b")" not in line:
            close = source.find(b")", end)
            end = len(source) if close == -1 else close
            line = source[start:end]
        elif line.rstrip().endswith(b"\\"):
            nl = source.find(b"\n", end + 1)
            end = len(source) if nl == -1 else nl
            line = source[start:end]
        words.update(_WORD.findall(line))
        at = source.find(b"import", max(end, at + 6))
    return words


def _import_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth; only statement bodies are walked, since an
    import is always a statement (a tenth of the nodes ``ast.walk`` would visit)."""
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(getattr(node, block, ()))


def _refuse_removed_in_use(removed: Iterable[str], target: Bundle) -> None:
    removed = set(removed)
    if not removed:
        return
    # Any import of a.b.c spells "c" somewhere; sources without it need no parsing.
    tails = {dep.rpartition(".")[2].encode() for dep in removed}
    users: dict[str, list[str]] = {}
    for name, entry in target.entries.items():
        if entry.kind == "data":
            continue
        source = target.read(name)
        if not any(tail in source for tail in tails):
            continue
        for dep in imported_names(name, entry.kind == "package", source) & removed:
            users.setdefault(dep, []).append(name)
    for dep in sorted(users):
        raise ModuleInUse(
            f"module {dep} was removed from the bundle but {', '.join(sorted(users[dep]))} still "
            "import it; remove those imports or keep the module — nothing ran",
            code="removed_module_in_use", module=dep, importers=sorted(users[dep]),
        )


def dependency_order(changes: Mapping[str, ModuleChange], target: Bundle) -> list[str]:
    """Order modules so that each runs after the changed modules it imports (cycles: by name)."""
    if len(changes) < 2:
        return list(changes)  # nothing to order: skip parsing the source
    # Any import of a.b.c spells "c" in an import statement: a source whose import lines name no
    # other changed module's last part needs no parsing, which is most of them.
    tails: dict[bytes, set[str]] = {}
    for name in changes:
        tails.setdefault(name.rpartition(".")[2].encode(), set()).add(name)
    deps: dict[str, set[str]] = {}
    for name, change in changes.items():
        named = {n for word in import_words(change.new_source) for n in tails.get(word, ())} - {name}
        deps[name] = (imported_names(name, change.kind == "package", change.new_source) & changes.keys() - {name}
                      if named else set())
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str) -> None:
        if state.get(name) == 2 or state.get(name) == 1:
            return  # done, or a cycle: leave the rest of the cycle in name order
        state[name] = 1
        for dep in sorted(deps[name]):
            visit(dep)
        state[name] = 2
        order.append(name)

    for name in sorted(changes):
        visit(name)
    return order
