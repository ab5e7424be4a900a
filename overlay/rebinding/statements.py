"""Top-level statements of a module's source, and what changed between two versions.

A push re-runs only the top-level statements whose source changed, so the first job is a
diff at statement granularity. Parsing a whole large module costs milliseconds, more than
the whole budget of a one-function push, so a version's statement table (lines, character
offsets, the names each statement binds; no AST kept) is cached, and a new version is
derived from the previous one by parsing only the *slice* of source that changed:

1. the common prefix and suffix of the two texts are found by C-speed string comparisons;
2. the old statements touching the changed lines, widened to whole statements, bound a slice
   that starts and ends on a top-level statement boundary in both versions;
3. only that slice is parsed (preceded by blank lines so line numbers are the real ones).
   If it does not parse on its own, the boundary assumption broke (say, a string opened in
   the changed lines swallows what follows) and everything is parsed instead.

Within the slice, statements are matched by exact text first (unchanged, maybe shifted) and
by AST second (only comments or layout changed, see ``_matching``), so a whitespace edit
never re-runs anything.
"""

from __future__ import annotations
import __future__

import ast
import bisect
import contextlib
import importlib.util
import types
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

from overlay.rebinding.matching import Region, match

__all__ = ["Stmt", "StatementTable", "Parsed", "Diff", "Region", "normalize", "plan", "describe",
           "binds_of"]

_CACHE: OrderedDict[tuple[str, int, int], StatementTable] = OrderedDict()
_CACHE_SIZE = 256  # tables are small (a few ints per statement); this covers large pushes
# Decoded sources by their bytes: a push decodes a module's new source to plan it and again to run
# it, and the next push decodes the same bytes object as the old source.
_DECODED: OrderedDict[bytes, str] = OrderedDict()
_DECODED_SIZE = 32


class Stmt(NamedTuple):
    """One top-level statement: where it is and which module names it binds.

    A tuple, not a dataclass: every push re-creates the statements after the change (they
    moved), hundreds of them, and a frozen dataclass's ``__init__`` costs five times more.
    Compared by identity where it matters (``is``), never by value.
    """

    start: int  # first line, 1-based, decorators included
    end: int  # last line
    lo: int  # character offset where line `start` begins
    hi: int  # character offset just past line `end`
    kind: str  # "def", "class" or "other"
    name: str | None  # the def/class name
    binds: frozenset[str]
    star: bool  # a ``from m import *``: binds names nobody can list from the source

    def moved(self, lines: int, chars: int) -> Stmt:
        return Stmt(self[0] + lines, self[1] + lines, self[2] + chars, self[3] + chars,
                    self[4], self[5], self[6], self[7])


@dataclass(slots=True)
class StatementTable:
    """The statements of one version of a module's source (no AST: cheap to keep)."""

    filename: str
    stmts: list[Stmt]
    future: int  # compile flags from ``from __future__`` imports
    source: str = ""  # the text it describes, to verify a cache hit (usually the same str)
    # AST of the statements this version changed, by id(stmt): the next push's old slice is
    # usually the same statements, and parsing them again would cost as much as the new ones.
    nodes: dict[int, ast.stmt] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)  # for bisect; statements never overlap,
    ends: list[int] = field(default_factory=list)  # so both lists are sorted

    def __post_init__(self) -> None:
        self.starts = [s.start for s in self.stmts]
        self.ends = [s.end for s in self.stmts]


class Parsed:
    """A statement together with its AST node (only for the statements a push touches)."""

    __slots__ = ("stmt", "node")

    def __init__(self, stmt: Stmt, node: ast.stmt) -> None:
        self.stmt = stmt
        self.node = node


@dataclass(slots=True)
class Diff:
    """What a push does to a module's top-level statements."""

    table: StatementTable  # the new version's statements
    same: list[tuple[Stmt, Stmt]]  # (old, new) identical text, maybe at other lines
    relayout: list[tuple[Stmt, Parsed]]  # (old, new) same AST, other comments or layout
    changed: list[tuple[Parsed, Parsed | None]]  # (new, old counterpart of same kind and name)
    gone: list[Parsed]  # old statements with no equal in the new source
    rerun_all: bool = False  # every statement runs again (old source unknown, futures changed)
    reason: str = ""  # why rerun_all
    old_filename: str | None = None  # the file name the old version was applied under, if known
    compiled: dict[int, types.CodeType] = field(default_factory=dict)  # changed statements' code, by id(node)


def normalize(source: str | bytes | bytearray | memoryview) -> str:
    """Source text with ``\\n`` line ends, decoded as the import system would."""
    if isinstance(source, bytes):
        text = _DECODED.get(source)
        if text is None:
            text = _DECODED[source] = importlib.util.decode_source(source)
        with contextlib.suppress(KeyError):  # another thread may have moved or dropped it
            _DECODED.move_to_end(source)
            while len(_DECODED) > _DECODED_SIZE:
                _DECODED.popitem(last=False)
        return text
    if isinstance(source, (bytearray, memoryview)):
        return importlib.util.decode_source(bytes(source))
    if "\r" in source:
        source = source.replace("\r\n", "\n").replace("\r", "\n")
    return source


def plan(key: str, old: str | None, new: str, filename: str) -> Diff:
    """Diff two normalized sources of module ``key`` statement by statement.

    ``old=None`` (unknown previous source) makes every statement of ``new`` "changed".
    Raises ``SyntaxError`` if ``new`` does not parse.
    """
    if old is None:
        table, parsed = _parse_all(new, filename)
        _remember(key, new, table)
        return Diff(table, [], [], [(p, None) for p in parsed], [], True,
                    "the previous source is unknown")
    cached = _lookup(key, old)
    old_table = cached or _parse_all(old, filename)[0]
    diff = _derive(old_table, old, new, filename)
    if diff is None:  # the slice did not parse on its own: compare whole files
        diff = _whole(old, new, filename)
    diff.old_filename = cached.filename if cached is not None else None
    _remember(key, new, diff.table)
    return diff


def binds_of(node: ast.stmt) -> frozenset[str]:
    """Names a statement binds in the namespace it runs in (a module's or a class body's)."""
    return _binds(node)[0]


def describe(node: ast.stmt) -> str:
    """A short human label for a statement, as shown in reports: ``def handler (line 12)``."""
    match node:
        case ast.FunctionDef(name=name) | ast.ClassDef(name=name):
            word = "def" if isinstance(node, ast.FunctionDef) else "class"
            text = f"{word} {name}"
        case ast.AsyncFunctionDef(name=name):
            text = f"async def {name}"
        case ast.Assign(targets=targets):
            text = " = ".join(ast.unparse(t) for t in targets) + " = ..."
        case ast.AugAssign(target=target, op=op):
            text = f"{ast.unparse(target)} {_OPS.get(type(op), '?')}= ..."
        case ast.AnnAssign(target=target, value=value):
            text = ast.unparse(target) + (" = ..." if value is not None else ": ...")
        case ast.Import() | ast.ImportFrom() | ast.Expr() | ast.Delete():
            text = _clip(ast.unparse(node))
        case _:
            text = type(node).__name__.lower() + " ..."
    return f"{text} (line {node.lineno})"


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.BitOr: "|",
        ast.BitAnd: "&", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.Pow: "**",
        ast.LShift: "<<", ast.RShift: ">>", ast.BitXor: "^"}


def _clip(text: str, width: int = 60) -> str:
    text = text.splitlines()[0] if text else text
    return text if len(text) <= width else text[: width - 3] + "..."


# -- caching ----------------------------------------------------------------------------------


def _cache_key(key: str, source: str) -> tuple[str, int, int]:
    # str caches its hash, so a source handed over again costs nothing to key.
    return key, len(source), hash(source)


def _lookup(key: str, source: str) -> StatementTable | None:
    entry = _cache_key(key, source)
    table = _CACHE.get(entry)
    if table is None or table.source != source:  # an identity check when it is the same str
        return None
    _CACHE.move_to_end(entry)
    return table


def _remember(key: str, source: str, table: StatementTable) -> None:
    table.source = source
    _CACHE[_cache_key(key, source)] = table
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


# -- parsing ----------------------------------------------------------------------------------


def _parse_all(source: str, filename: str) -> tuple[StatementTable, list[Parsed]]:
    parsed = _parse_slice(source, 0, len(source), 1, filename)
    stmts = [p.stmt for p in parsed]
    return StatementTable(filename, stmts, _future_flags(p.node for p in parsed)), parsed


def _parse_slice(source: str, lo: int, hi: int, first_line: int, filename: str) -> list[Parsed]:
    """Parse ``source[lo:hi]``, which starts at line ``first_line``, into Parsed statements."""
    text = source[lo:hi]
    # Leading newlines give every node its real line number, so nothing needs renumbering.
    tree = ast.parse("\n" * (first_line - 1) + text, filename)
    line_starts = [0, *accumulate(len(line) + 1 for line in text.split("\n"))]
    out = []
    for node in tree.body:
        start = min([d.lineno for d in getattr(node, "decorator_list", ())] + [node.lineno])
        end = node.end_lineno or start
        s_lo = lo + line_starts[start - first_line]
        s_hi = min(lo + line_starts[min(end - first_line + 1, len(line_starts) - 1)], hi)
        kind, name = _kind(node)
        binds, star = _binds(node)
        out.append(Parsed(Stmt(start, end, s_lo, s_hi, kind, name, binds, star), node))
    return out


def _kind(node: ast.stmt) -> tuple[str, str | None]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return "def", node.name
    if isinstance(node, ast.ClassDef):
        return "class", node.name
    return "other", None


def _future_flags(nodes: Iterable[ast.stmt]) -> int:
    flags = 0
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                feature = getattr(__future__, alias.name, None)
                flags |= getattr(feature, "compiler_flag", 0)
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            break  # futures must come first (after the docstring)
    return flags


def _is_future(p: Parsed) -> bool:
    return isinstance(p.node, ast.ImportFrom) and p.node.module == "__future__"


def _binds(node: ast.stmt) -> tuple[frozenset[str], bool]:
    """Names a top-level statement binds in the module (not inside def/class bodies)."""
    names: set[str] = set()
    star = False
    stack: list[ast.AST] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.Import):
            names.update((a.asname or a.name.partition(".")[0]) for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                if a.name == "*":
                    star = True
                else:
                    names.add(a.asname or a.name)
        elif isinstance(n, ast.Assign):
            for t in n.targets:
                _targets(t, names)
        elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
            if not (isinstance(n, ast.AnnAssign) and n.value is None):
                _targets(n.target, names)
        elif isinstance(n, (ast.For, ast.AsyncFor)):
            _targets(n.target, names)
            stack.extend(n.body + n.orelse)
        elif isinstance(n, (ast.With, ast.AsyncWith)):
            for item in n.items:
                if item.optional_vars is not None:
                    _targets(item.optional_vars, names)
            stack.extend(n.body)
        elif isinstance(n, (ast.If, ast.While)):
            stack.extend(n.body + n.orelse)
        elif isinstance(n, (ast.Try, ast.TryStar)):
            stack.extend(n.body + n.orelse + n.finalbody)
            for handler in n.handlers:
                stack.extend(handler.body)
        elif isinstance(n, ast.Match):
            for case in n.cases:
                names.update(x.name for x in ast.walk(case.pattern)
                             if isinstance(x, (ast.MatchAs, ast.MatchStar)) and x.name)
                names.update(x.rest for x in ast.walk(case.pattern)
                             if isinstance(x, ast.MatchMapping) and x.rest)
                stack.extend(case.body)
    return frozenset(names), star


def _targets(t: ast.expr, names: set[str]) -> None:
    if isinstance(t, ast.Name):
        names.add(t.id)
    elif isinstance(t, (ast.Tuple, ast.List)):
        for e in t.elts:
            _targets(e, names)
    elif isinstance(t, ast.Starred):
        _targets(t.value, names)


# -- diffing ----------------------------------------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on memcmp-speed slice comparisons
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    la, lb = len(a), len(b)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[la - mid: la - lo] == b[lb - mid: lb - lo]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _at_line_start(s: str, i: int) -> bool:
    return i == 0 or s[i - 1] == "\n"


def _derive(old_table: StatementTable, old: str, new: str, filename: str) -> Diff | None:
    """Diff by parsing only the changed slice; None if the slice does not parse alone."""
    i = _common_prefix(old, new)
    prefix_lines = old.count("\n", 0, i)
    k = _common_suffix(old, new, min(len(old), len(new)) - i)
    j_old, j_new = len(old) - k, len(new) - k
    if not (_at_line_start(old, j_old) and _at_line_start(new, j_new)):
        nl = old.find("\n", j_old)  # the suffix texts are equal, so their newlines line up
        step = (nl + 1 - j_old) if nl != -1 else k
        j_old, j_new = j_old + step, j_new + step
    first_suffix_old = old.count("\n", 0, j_old) + 1
    line_delta = (new.count("\n", 0, j_new) + 1) - first_suffix_old
    char_delta = j_new - j_old

    stmts = old_table.stmts
    # Old statements touching the changed lines [prefix_lines + 1, first_suffix_old - 1], or
    # spanning the insertion point when that range is empty: stmts[a:b].
    last_changed = max(first_suffix_old - 1, prefix_lines)
    a = bisect.bisect_right(old_table.ends, prefix_lines)
    b = max(a, bisect.bisect_right(old_table.starts, last_changed))
    while a > 0 and b > a and stmts[a - 1].end >= stmts[a].start:  # shares a line
        a -= 1
    while b < len(stmts) and b > a and stmts[b].start <= stmts[b - 1].end:
        b += 1

    lo_char = stmts[a - 1].hi if a > 0 else 0
    lo_line = stmts[a - 1].end + 1 if a > 0 else 1
    hi_old = stmts[b].lo if b < len(stmts) else len(old)
    hi_new = hi_old + char_delta if b < len(stmts) else len(new)
    try:
        new_parsed = _parse_slice(new, lo_char, hi_new, lo_line, filename)
    except SyntaxError:
        return None
    cached = [old_table.nodes.get(id(s)) for s in stmts[a:b]]
    old_parsed = [Parsed(s, node) for s, node in zip(stmts[a:b], cached) if node is not None]
    if len(old_parsed) < len(cached):  # an old statement's AST is not cached: parse them all
        old_parsed = _parse_slice(old, lo_char, hi_old, lo_line, filename)

    pairs, gone = _match(old_parsed, new_parsed, Region(old, lo_char, hi_old, lo_line),
                         Region(new, lo_char, hi_new, lo_line))
    if any(_is_future(p) for p, _, how in pairs if how == "changed") or any(
            _is_future(p) for p in gone):
        return _whole(old, new, filename, rerun_reason="its `from __future__` imports changed")
    prefix = [(s, s) for s in stmts[:a]]
    suffix = ([(s, s.moved(line_delta, char_delta)) for s in stmts[b:]] if line_delta or char_delta
              else [(s, s) for s in stmts[b:]])  # an edit of the same length moves nothing
    new_stmts = [s for s, _ in prefix] + [p.stmt for p in new_parsed] + [n for _, n in suffix]
    diff = _diff(StatementTable(filename, new_stmts, old_table.future,
                       nodes={id(p.stmt): p.node for p in new_parsed}), pairs, gone)
    diff.same[:0] = prefix
    diff.same.extend(suffix)
    return diff


def _whole(old: str, new: str, filename: str, rerun_reason: str = "") -> Diff:
    """Diff two whole files (the slow path: both are parsed completely)."""
    _, old_parsed = _parse_all(old, filename)
    new_table, new_parsed = _parse_all(new, filename)
    pairs, gone = _match(old_parsed, new_parsed, Region(old, 0, len(old), 1),
                         Region(new, 0, len(new), 1))
    if not rerun_reason and any(_is_future(p) for p, _, how in pairs if how == "changed"):
        rerun_reason = "its `from __future__` imports changed"
    if not rerun_reason and any(_is_future(p) for p in gone):
        rerun_reason = "its `from __future__` imports changed"
    if rerun_reason:  # compile flags changed for every statement: all of them run again
        return Diff(new_table, [], [], [(p, o) for p, o, _ in pairs], gone, True, rerun_reason)
    return _diff(new_table, pairs, gone)


def _diff(table: StatementTable, pairs: list[tuple[Parsed, Parsed | None, str]],
          gone: list[Parsed]) -> Diff:
    same = [(o.stmt, p.stmt) for p, o, how in pairs if how == "same" and o is not None]
    relayout = [(o.stmt, p) for p, o, how in pairs if how == "relayout" and o is not None]
    changed = [(p, o) for p, o, how in pairs if how == "changed"]
    return Diff(table, same, relayout, changed, gone)


def _match(old_parsed: list[Parsed], new_parsed: list[Parsed], ra: Region, rb: Region
           ) -> tuple[list[tuple[Parsed, Parsed | None, str]], list[Parsed]]:
    pairs, gone = match([p.node for p in old_parsed], [p.node for p in new_parsed], ra, rb)
    return ([(p, old_parsed[i] if i is not None else None, how)
             for p, (i, how) in zip(new_parsed, pairs)], [old_parsed[i] for i in gone])
