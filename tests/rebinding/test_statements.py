"""The statement diff: only the changed slice is parsed, and only changed statements run."""

from __future__ import annotations

import itertools

import pytest

from overlay.rebinding import statements as _statements
from overlay.rebinding.statements import plan

_keys = itertools.count()

V1 = """import os

CACHE = {}


def f():
    return 1


def g():
    return 2


class K:
    def m(self):
        return 3
"""


def key() -> str:
    return f"test_statements_{next(_keys)}"


def changed(diff) -> list[str]:
    return [_statements.describe(p.node) for p, _ in diff.changed]


def test_editing_one_function_changes_only_that_statement_and_shifts_the_rest():
    diff = plan(key(), V1, V1.replace("return 2", "x = 2\n    return x"), "m.py")

    assert changed(diff) == ["def g (line 10)"]
    assert [p.stmt.name for p in diff.gone] == ["g"]
    shifts = {old.name or old.start: new.start - old.start for old, new in diff.same}
    assert shifts == {1: 0, 3: 0, "f": 0, "K": 1}


def test_comment_and_blank_line_edits_change_nothing():
    diff = plan(key(), V1, V1.replace("CACHE = {}", "CACHE = {}  # shared\n\n"), "m.py")

    assert diff.changed == [] and diff.gone == []
    assert [(old.start, p.stmt.start) for old, p in diff.relayout] == [(3, 3)]


def test_inserted_and_deleted_statements_are_found():
    new = V1.replace("def g():\n    return 2\n", "def h():\n    return 4\n\nLIMIT = 3\n")
    diff = plan(key(), V1, new, "m.py")

    assert changed(diff) == ["def h (line 10)", "LIMIT = ... (line 13)"]
    assert [p.stmt.name for p in diff.gone] == ["g"]


def test_a_change_that_swallows_the_rest_of_the_file_in_a_string_falls_back_to_a_full_parse():
    new = 'TEXT = """\n' + V1 + '"""\n'
    diff = plan(key(), V1, new, "m.py")

    assert changed(diff) == ["TEXT = ... (line 1)"]
    assert len(diff.gone) == 5


def test_changed_future_imports_make_every_statement_run_again():
    diff = plan(key(), V1, "from __future__ import annotations\n" + V1, "m.py")

    assert diff.rerun_all and "__future__" in diff.reason
    assert len(diff.changed) == 6 and diff.table.future


def test_unknown_old_source_makes_every_statement_changed():
    diff = plan(key(), None, V1, "m.py")

    assert diff.rerun_all and len(diff.changed) == 5 and diff.gone == []


def test_the_old_version_is_parsed_once_then_only_slices(monkeypatch):
    name = key()
    v2 = V1.replace("return 1", "return 10")
    plan(name, V1, v2, "m.py")
    calls = []
    monkeypatch.setattr(_statements, "_parse_all", lambda *a: calls.append(a) or pytest.fail())

    diff = plan(name, v2, v2.replace("return 10", "return 100"), "m.py")

    assert calls == [] and changed(diff) == ["def f (line 6)"]


def test_statements_sharing_a_line_are_diffed_together():
    diff = plan(key(), "a = 1; b = 2\nc = 3\n", "a = 1; b = 20\nc = 3\n", "m.py")

    assert changed(diff) == ["b = ... (line 1)"]
    assert [p.stmt.binds for p in diff.gone] == [frozenset({"b"})]


def test_bytes_are_decoded_and_line_endings_normalized():
    assert _statements.normalize(b"# -*- coding: latin-1 -*-\nX = '\xe9'\r\n") == (
        "# -*- coding: latin-1 -*-\nX = '\u00e9'\n")


@pytest.mark.parametrize("source, names", [
    ("import a.b as c, d.e", {"c", "d"}),
    ("from m import x, y as z", {"x", "z"}),
    ("for i, (j, *k) in []:\n    w = 1\nelse:\n    v = 2", {"i", "j", "k", "w", "v"}),
    ("try:\n    import fast as impl\nexcept ImportError:\n    impl = None", {"impl"}),
    ("with open('f') as fh:\n    pass", {"fh"}),
    ("x: int", set()),
    ("x: int = 1", {"x"}),
    ("@deco\ndef f(): pass", {"f"}),
])
def test_names_bound_by_a_statement(source, names):
    import ast
    assert _statements.binds_of(ast.parse(source).body[0]) == names
