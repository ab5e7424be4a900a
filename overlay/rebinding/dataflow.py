"""Which unchanged top-level statements must run again because what they read changed.

A fresh start of the new version runs every statement on the new values of the names it reads. A
push runs only the statements whose text changed, which is the same thing as long as no changed
statement rebinds a name that an unchanged one reads: ``_RAW = {v: k for k, v in TABLE.items()}``
after ``TABLE`` gained a key, ``__all__ = [*base.__all__, "x"]``, ``from .recipes import *`` after
``recipes`` gained a function. So the rule is dataflow, not text: an unchanged statement runs again
when a name it reads at run time was rebound by this push to a different value (``dirty``), in
source order with the changed statements, and what it rebinds in turn is dirty for the statements
after it. A statement whose inputs did not change does not run: caches, pools, counters and
registries keep their state.

What a statement reads is what its execution evaluates at the top level: expressions, a class
body, a def's decorators and defaults; not a function's body (it reads the module's globals when
called, and sees the new values then). Imports are read as ``"<module>:<name>"`` (``"<module>:*"``
for a star import), so that the transaction layer can mark names another module rebound
(``overlay.transaction.follow``).

"Different" is identity, except for plain data that compares equal (``same_value``): rebuilding
``__all__`` with the same names dirties nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable

__all__ = ["reads", "mentions", "import_key", "resolve"]


def import_key(module: str, name: str) -> str:
    """How a ``from module import name`` statement's input is named in a dirty set."""
    return f"{module}:{name}"


def mentions(text: str, dirty: Iterable[str]) -> bool:
    """A cheap prefilter: whether ``text`` spells any dirty name (or imported module's last part)
    as a word. False means the statement cannot read one; True needs :func:`reads`."""
    words = {d.rpartition(".")[2].partition(":")[0] if ":" in d else d for d in dirty}
    words |= {d.partition(":")[0].rpartition(".")[2] for d in dirty if ":" in d}
    # The imported name itself: ``from . import LIMIT`` spells neither module part.
    words |= {d.partition(":")[2] for d in dirty if ":" in d}
    words.discard("")
    words.discard("*")
    if not words:
        return False
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(words))) + r")\b")
    return pattern.search(text) is not None


def reads(node: ast.stmt, module: str, is_package: bool) -> set[str]:
    """Names a top-level statement reads while it runs (see the module docstring)."""
    found: set[str] = set()
    stack: list[ast.AST] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load):
                found.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            stack.extend(n.decorator_list)
            stack.extend(n.args.defaults)
            stack.extend(d for d in n.args.kw_defaults if d is not None)
        elif isinstance(n, ast.Lambda):
            stack.extend(n.args.defaults)
            stack.extend(d for d in n.args.kw_defaults if d is not None)
        elif isinstance(n, ast.ClassDef):
            stack.extend(n.decorator_list)
            stack.extend(n.bases)
            stack.extend(k.value for k in n.keywords)
            stack.extend(n.body)
        elif isinstance(n, ast.ImportFrom):
            base = resolve(n, module, is_package)
            if base is not None:
                found.update(import_key(base, a.name) for a in n.names)
        elif isinstance(n, ast.AugAssign):
            # ``x += y`` reads x too, which ast marks as a Store.
            if isinstance(n.target, ast.Name):
                found.add(n.target.id)
            stack.append(n.target)
            stack.append(n.value)
        else:
            stack.extend(ast.iter_child_nodes(n))
    return found


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute name of the module a ``from ... import`` statement imports from."""
    base = node.module or ""
    if not node.level:
        return base or None
    anchor = (module if is_package else module.rpartition(".")[0]).split(".")
    if node.level - 1 > len(anchor) or not anchor[0]:
        return None
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, base] if base else anchor)
