"""Closures made at run time are found in one heap pass per push, within a budget."""

from __future__ import annotations

import gc

import pytest

from overlay.rebinding import closures as _codes
from overlay.rebinding.journal import Journal
from overlay.rebind import one_heap_pass, update_module


@pytest.fixture
def count_heap_walks(monkeypatch):
    calls = []
    for name in ("get_objects", "get_referrers"):
        real = getattr(gc, name)

        def counting(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_codes.gc, name, counting)
    return calls


def test_one_function_change_without_nested_code_never_walks_the_heap(live, count_heap_walks):
    m = live("def f():\n    return 1\n\ndef g():\n    return [x for x in range(3)]\n")

    m.push("def f():\n    return 2\n\ndef g():\n    return [x * 2 for x in range(3)]\n")

    assert count_heap_walks == [] and m.module.f() == 2 and m.module.g() == [0, 2, 4]


def test_change_outside_the_nested_function_does_not_walk_the_heap(live, snippet,
                                                                   count_heap_walks):
    v1 = snippet("closure_v1")
    m = live(v1)

    report = m.push(v1.replace("def make_adder(n):", "def make_adder(n):\n    n = n + 0"))

    assert count_heap_walks == []
    assert any("line numbers not updated in closures" in note for note in report.notes)


def test_two_modules_in_one_push_share_a_single_heap_pass(live, snippet, tmp_path,
                                                          count_heap_walks):
    first, second = live(snippet("closure_v1")), live(snippet("closure_v1"))
    journal = Journal()

    with one_heap_pass(journal):
        reports = [update_module(m.module, snippet("closure_v2"), filename=str(tmp_path / "x.py"),
                                 old_source=m.source, journal=journal) for m in (first, second)]

    assert len(count_heap_walks) == 1
    assert first.module.add5(0) == second.module.add5(0) == 1005
    for report in reports:
        assert "make_adder.<locals>.add (1 function made at run time)" in report.patched


def test_heap_pass_is_skipped_when_the_batch_fails(live, snippet, tmp_path, count_heap_walks):
    m = live(snippet("closure_v1"))
    journal = Journal()

    with pytest.raises(KeyError), one_heap_pass(journal):
        update_module(m.module, snippet("closure_v2"), filename=str(tmp_path / "x.py"),
                      old_source=m.source, journal=journal)
        raise KeyError("a later module failed")
    journal.undo()

    assert count_heap_walks == [] and m.module.add5(1) == 6


def test_pass_over_its_budget_still_covers_the_heap_and_says_so(live, snippet, tmp_path):
    m = live(snippet("closure_v1"))
    journal = Journal()

    with one_heap_pass(journal, budget_s=0.0):
        report = update_module(m.module, snippet("closure_v2"), filename=str(tmp_path / "x.py"),
                               old_source=m.source, journal=journal)

    assert m.module.add5(0) == 1005
    assert any("over its 0 ms budget" in note and "covered the whole heap" in note
               for note in report.notes)


def test_pass_asked_to_stop_at_its_budget_reports_what_it_did_not_search(live, snippet,
                                                                          tmp_path):
    m = live(snippet("closure_v1"))
    ballast = [[i] for i in range(3 * _codes._CHUNK)]  # more than one chunk to walk
    journal = Journal()

    with one_heap_pass(journal, budget_s=0.0, stop_at_budget=True):
        report = update_module(m.module, snippet("closure_v2"), filename=str(tmp_path / "x.py"),
                               old_source=m.source, journal=journal)

    del ballast
    assert any("stopped at its 0 ms budget" in note and "objects not searched" in note
               for note in report.notes)


def test_pass_stopping_at_a_generous_budget_finds_everything(live, snippet, tmp_path):
    m = live(snippet("closure_v1"))
    journal = Journal()

    with one_heap_pass(journal, budget_s=10.0, stop_at_budget=True):
        report = update_module(m.module, snippet("closure_v2"), filename=str(tmp_path / "x.py"),
                               old_source=m.source, journal=journal)

    assert m.module.add5(0) == 1005
    assert not any("budget" in note for note in report.notes)
