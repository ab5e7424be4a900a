"""The names the transaction layer calls are pinned: renaming one is a deliberate act."""

from __future__ import annotations

import dataclasses
import inspect

from overlay import rebind
from overlay.rebinding import journal as _journal


def test_rebind_exports():
    assert rebind.__all__ == ["ModuleReport", "check_update", "update_module", "one_heap_pass", "HeapPass"]


def test_update_module_signature():
    assert str(inspect.signature(rebind.update_module)) == (
        "(module: 'types.ModuleType', new_source: 'str | bytes', *, filename: 'str', "
        "old_source: 'str | bytes | None', journal: 'Journal', version: 'int | None' = None, "
        "code: 'types.CodeType | None' = None, migrate: 'bool' = True, diff: 'Diff | None' = None) "
        "-> 'ModuleReport'")


def test_check_update_signature():
    assert str(inspect.signature(rebind.check_update)) == (
        "(name: 'str', new_source: 'str | bytes', *, filename: 'str', old_source: 'str | bytes | None') "
        "-> 'Diff'")


def test_module_report_fields():
    assert [f.name for f in dataclasses.fields(rebind.ModuleReport)] == [
        "module", "reran", "patched", "replaced", "removed", "notes"]


def test_journal_methods():
    public = {n for n, v in vars(_journal.Journal).items() if not n.startswith("_")}
    assert public == {"setattr", "delattr", "setitem", "delitem", "snapshot", "call", "undo",
                      "commit"}
