"""What the transaction layer relies on, proved by use: the calls it makes, with the keywords it
passes, do what it needs; renaming any of them is a deliberate act."""

from __future__ import annotations

import dataclasses

import pytest

from overlay import rebind
from overlay.rebind import check_update, update_module
from overlay.rebinding import journal as _journal
from overlay.rebinding.journal import Journal

V1 = '''LIMIT = 10


def greet(name):
    return f"hello {name}"


def old_helper():
    return 1


class Pair:
    __slots__ = ("a",)
'''

# Every kind of change a report has a field for: a re-run constant, a patched function, a replaced
# class, a deleted function, and a migration hook (a note).
V2 = '''LIMIT = 20


def greet(name):
    return f"hi {name}"


class Pair:
    __slots__ = ("a", "b")


def __habanero_migrate__(old):
    global LIMIT
    LIMIT = old["LIMIT"] * 3
'''


def test_rebind_exports():
    assert rebind.__all__ == ["ModuleReport", "check_update", "update_module", "one_heap_pass", "HeapPass",
                              "Journal", "MISSING"]


def test_update_module_with_the_transactions_keywords_patches_in_place_and_journals_every_undo(live, tmp_path):
    m = live(V1)
    greet, old_code, old_pair = m.module.greet, m.module.greet.__code__, m.module.Pair
    journal = Journal()
    filename = str(tmp_path / "v2.py")
    # As overlay.upgrade calls it: the code and diff prepared by the plan, one journal per push.
    diff = check_update(m.module.__name__, V2, filename=filename, old_source=V1)
    update_module(m.module, V2, filename=filename, old_source=V1, journal=journal, version=2,
                  code=compile(V2, filename, "exec"), migrate=True, diff=diff)

    assert m.module.greet is greet and greet("ann") == "hi ann"  # the very object, running new code
    assert greet.__code__.co_filename == filename
    assert m.module.LIMIT == 30 and not hasattr(m.module, "old_helper")
    assert m.module.Pair is not old_pair and m.module.Pair.__slots__ == ("a", "b")

    journal.undo()

    assert m.module.greet is greet and greet.__code__ is old_code and greet("ann") == "hello ann"
    assert m.module.LIMIT == 10 and m.module.old_helper() == 1
    assert m.module.Pair is old_pair
    assert "__habanero_migrate__" not in m.ns


def test_check_update_refuses_a_syntax_error_naming_the_file_and_the_line_before_anything_runs(live):
    m = live(V1)
    before = dict(m.ns)
    broken = V1 + "\n\ndef broken(:\n    pass\n"

    with pytest.raises(SyntaxError) as info:
        check_update(m.module.__name__, broken, filename="/app/shop/views.py", old_source=V1)

    # The transaction turns these into CompileFailed(file=..., line=...), mapped onto the developer's file.
    assert (info.value.filename, info.value.lineno) == ("/app/shop/views.py", 16)
    assert info.value.text.strip() == "def broken(:"
    assert m.ns == before


def test_the_module_report_names_what_ran_was_patched_replaced_removed_and_noted(live, tmp_path):
    m = live(V1)

    report = update_module(m.module, V2, filename=str(tmp_path / "v2.py"), old_source=V1, journal=Journal(),
                           version=2)

    # The transaction hands this on as it is (UpgradeReport.to_dict() is dataclasses.asdict), and the
    # packer reads its fields by name: "patched in views: greet", "replaced views.Pair: ...".
    assert dataclasses.asdict(report) == {
        "module": m.module.__name__,
        "reran": ["LIMIT = ... (line 1)", "def greet (line 4)", "class Pair (line 8)",
                  "def __habanero_migrate__ (line 12)"],
        "patched": ["greet"],
        "replaced": [("Pair", "`__slots__` changed from ('a',) to ('a', 'b'): instances created before "
                              "version 2 keep the old class")],
        "removed": ["old_helper"],
        "notes": ["ran __habanero_migrate__ with the previous namespace"],
        "redecorated": {},
        "followed": [],
        "rebound": ["LIMIT", "Pair", "__habanero_migrate__", "old_helper"],
    }


def test_journal_methods():
    public = {n for n, v in vars(_journal.Journal).items() if not n.startswith("_")}
    assert public == {"setattr", "delattr", "setitem", "delitem", "snapshot", "call", "undo",
                      "commit"}
