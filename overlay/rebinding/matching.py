"""Pair the statements of two versions of a block: same text, same AST, or changed.

Used for a module's top-level statements and for a class body. Deciding "same AST" with
``ast.dump`` is exact but slow (pure Python, proportional to the statement's size), so it
is the last resort: statements are compared by source text first, and a compound
statement (a ``def``, a ``class``, an ``if``) whose text differs is compared field by field,
its header by dump and its body statement by statement, recursively. Editing one method of
a 60-method class then dumps that one method, not the class.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

__all__ = ["Region", "same_ast", "match"]

_BLOCKS = ("body", "orelse", "finalbody", "handlers")
# What those blocks hold: statements, and the ``except`` clauses of a ``try``.
Node = ast.stmt | ast.excepthandler


class Region:
    """The source lines of a block, addressed by their line numbers in the whole file."""

    __slots__ = ("lines", "first")

    def __init__(self, source: str, lo: int, hi: int, first_line: int) -> None:
        self.lines = source[lo:hi].split("\n")
        self.first = first_line

    def text(self, node: Node) -> tuple[int, int, str] | None:
        """The lines a node spans (decorators included) and its columns, or None."""
        lineno = getattr(node, "lineno", None)
        if lineno is None:
            return None
        start = min([d.lineno for d in getattr(node, "decorator_list", ())] + [lineno])
        end = getattr(node, "end_lineno", None) or lineno
        lo, hi = start - self.first, end - self.first + 1
        if lo < 0 or hi > len(self.lines):
            return None
        return node.col_offset, getattr(node, "end_col_offset", 0), "\n".join(self.lines[lo:hi])


def _dump(value: object) -> object:
    if isinstance(value, ast.AST):
        return ast.dump(value)
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def same_ast(a: Node, b: Node, ra: Region | None, rb: Region | None) -> bool:
    """Whether two nodes are equal ignoring positions, comments and layout."""
    if type(a) is not type(b):
        return False
    if ra is not None and rb is not None:
        text = ra.text(a)
        if text is not None and text == rb.text(b):
            return True
    if not any(hasattr(a, field) for field in _BLOCKS):
        return ast.dump(a) == ast.dump(b)
    for field in a._fields:  # for a def, ``name`` comes first: a cheap early exit
        va, vb = getattr(a, field), getattr(b, field)
        if field in _BLOCKS:
            if len(va) != len(vb) or not all(same_ast(x, y, ra, rb) for x, y in zip(va, vb)):
                return False
        elif _dump(va) != _dump(vb):
            return False
    return True


def _key(node: ast.AST) -> tuple[str, str] | None:
    """Defs and classes are paired by kind and name; other statements by content only."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return "def", node.name
    if isinstance(node, ast.ClassDef):
        return "class", node.name
    return None


def match(olds: list[ast.stmt], news: list[ast.stmt], ra: Region | None, rb: Region | None
          ) -> tuple[list[tuple[int | None, str]], list[int]]:
    """Pair each new statement with an old one.

    Returns, for each new statement in order, ``(old index or None, how)`` where ``how`` is
    ``"same"`` (identical text), ``"relayout"`` (same AST, other comments or layout) or
    ``"changed"``; a changed def or class carries the index of its previous version (same
    kind and name) when there is one. Also returns the indexes of old statements left
    unmatched (deleted, or the previous version of a changed one).
    """
    taken: set[int] = set()
    result: list[tuple[int | None, str] | None] = [None] * len(news)
    i: int | None  # an old statement's index; None where ``_first_free`` finds none
    if ra is not None and rb is not None:
        by_text: dict[tuple[int, int, str] | None, list[int]] = {}
        for i, node in enumerate(olds):
            by_text.setdefault(ra.text(node), []).append(i)
        for j, node in enumerate(news):
            i = _first_free(by_text.get(rb.text(node), ()), taken)
            if i is not None:
                taken.add(i)
                result[j] = (i, "same")
    by_name: dict[tuple[str, str], list[int]] = {}
    for i, node in enumerate(olds):
        key = _key(node)
        if key is not None and i not in taken:
            by_name.setdefault(key, []).append(i)
    by_dump: dict[str, list[int]] | None = None
    for j, node in enumerate(news):
        if result[j] is not None:
            continue
        key = _key(node)
        if key is not None:
            i = _first_free(by_name.get(key, ()), taken)
            if i is not None and same_ast(olds[i], node, ra, rb):
                taken.add(i)
                result[j] = (i, "relayout")
            continue
        if by_dump is None:  # dump the other old statements once, only if needed
            by_dump = {}
            for i, old in enumerate(olds):
                if i not in taken and _key(old) is None:
                    by_dump.setdefault(ast.dump(old), []).append(i)
        i = _first_free(by_dump.get(ast.dump(node), ()), taken)
        if i is not None:
            taken.add(i)
            result[j] = (i, "relayout")
    gone = [i for i in range(len(olds)) if i not in taken]
    used: set[int] = set()
    for j, node in enumerate(news):
        if result[j] is None:
            key = _key(node)
            i = _first_free(by_name.get(key, ()), taken | used) if key is not None else None
            if i is not None:
                used.add(i)
            result[j] = (i, "changed")
    return [r for r in result if r is not None], gone


def _first_free(candidates: Iterable[int], taken: set[int]) -> int | None:
    for c in candidates:
        if c not in taken:
            return c
    return None
