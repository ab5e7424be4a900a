"""A push keeps a module's state: unchanged statements never run again."""

from __future__ import annotations

import traceback

import pytest


def test_module_level_cache_survives_a_change_to_the_function_using_it(live):
    v1 = "CACHE = {}\n\ndef lookup(key):\n    return CACHE.setdefault(key, len(CACHE))\n"
    m = live(v1)
    cache = m.ns["CACHE"]
    m.module.lookup("a"), m.module.lookup("b")

    report = m.push(v1.replace("len(CACHE))", "len(CACHE) * 10)"))

    assert m.module.CACHE is cache and cache == {"a": 0, "b": 1}
    assert m.module.lookup("c") == 20
    assert report.reran == ["def lookup (line 3)"]


def test_registration_side_effects_are_not_repeated(live, snippet):
    m = live(snippet("registry_v1"))
    handler = m.ns["handler"]

    m.push(snippet("registry_v2"))

    assert m.module.STARTS == ["started"]  # the unchanged top-level call did not run again
    assert m.module.REGISTRY == [handler]  # the decorator did not register a second time
    assert m.module.REGISTRY[0]() == "v2" and m.module.handler is handler


def test_changed_top_level_statement_runs_again_in_the_existing_namespace(live):
    m = live("LIMIT = 10\n\ndef limit():\n    return LIMIT\n")
    limit = m.ns["limit"]

    report = m.push("LIMIT = 20\n\ndef limit():\n    return LIMIT\n")

    assert limit() == 20 and report.reran == ["LIMIT = ... (line 1)"]


def test_names_of_a_deleted_assignment_are_removed_but_rebound_names_stay(live):
    m = live("A = 1\nB = 2\n")

    report = m.push("A = 1\n")

    assert "B" not in m.ns and m.module.A == 1
    assert report.removed == ["B"]


def test_comment_only_change_runs_nothing(live):
    m = live("STATE = []\n\ndef f():\n    return STATE\n")
    state = m.ns["STATE"]

    report = m.push("# a comment\nSTATE = []  # trailing\n\ndef f():\n    return STATE\n")

    assert report.reran == [] and m.module.STATE is state


def test_unknown_old_source_runs_everything_and_still_pairs_definitions(live):
    m = live("COUNT = 1\n\ndef f():\n    return 'v1'\n\n"
             "class K:\n    def g(self):\n        return 1\n")
    f, K = m.ns["f"], m.ns["K"]
    k = K()

    report = m.push("COUNT = 1\n\ndef f():\n    return 'v2'\n\nclass K:\n    def g(self):\n"
                    "        return 2\n", old_source=None)

    assert m.module.f is f and f() == "v2"
    assert m.module.K is K and k.g() == 2
    assert len(report.reran) == 3
    assert report.notes[0] == "every top-level statement ran again: the previous source is unknown"


def test_migration_hook_receives_the_previous_namespace_and_transforms_state(live, snippet):
    m = live(snippet("migrate_v1"))

    report = m.push(snippet("migrate_v2"))

    assert m.module.SESSIONS == {"ann": {"since": "2024-01-01"}}
    assert "ran __habanero_migrate__ with the previous namespace" in report.notes


def test_migration_hook_failure_propagates_and_undo_restores_the_previous_state(
        live, snippet):
    m = live(snippet("migrate_v1"))
    sessions, before = m.ns["SESSIONS"], dict(m.ns)

    with pytest.raises(LookupError, match="cannot migrate sessions"):
        m.push(snippet("migrate_fails_v2"))
    m.undo()

    assert m.module.SESSIONS is sessions and sessions == {"ann": "2024-01-01"}
    assert m.ns.keys() == before.keys() and all(m.ns[k] is v for k, v in before.items())


def test_migration_hook_is_skipped_when_migrate_is_false(live, snippet):
    m = live(snippet("migrate_v1"))

    report = m.push(snippet("migrate_v2"), migrate=False)

    assert m.module.SESSIONS == {} and report.notes == []


def test_exception_half_way_propagates_unchanged_and_undo_restores_identical_objects(
        live, snippet):
    m = live(snippet("failing_v1"))
    ns_before = dict(m.ns)
    helper, Service, Mode = m.ns["helper"], m.ns["Service"], m.ns["Mode"]
    fn_state = (helper.__code__, helper.__defaults__, helper.__dict__)
    class_dict = dict(vars(Service))
    enum_tables = (Mode._member_map_, Mode._member_names_, Mode._value2member_map_)
    member_a = Mode.A

    with pytest.raises(RuntimeError, match="boom during import") as info:
        m.push(snippet("failing_v2"))
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (frame.filename, frame.lineno) == (str(m.path(2)), 26)  # the raise in failing_v2
    assert m.module.helper() == "v2" and m.module.Mode.B  # it had got that far
    m.undo()

    assert m.ns.keys() == ns_before.keys()
    assert all(m.ns[k] is v for k, v in ns_before.items())
    assert (helper.__code__, helper.__defaults__, helper.__dict__) == fn_state
    assert all(a is b for a, b in zip((helper.__code__, helper.__defaults__, helper.__dict__),
                                      fn_state))
    assert vars(Service).keys() == class_dict.keys()
    assert all(vars(Service)[k] is v for k, v in class_dict.items())
    assert (Mode._member_map_, Mode._member_names_, Mode._value2member_map_) == enum_tables
    assert all(a is b for a, b in zip(
        (Mode._member_map_, Mode._member_names_, Mode._value2member_map_), enum_tables))
    assert list(Mode) == [member_a] and Mode.A is member_a
    assert helper() == "v1" and Service().run() == "v1" and not hasattr(Service, "extra")


def test_syntax_error_changes_nothing(live):
    m = live("def f():\n    return 1\n")
    before = dict(m.ns)

    with pytest.raises(SyntaxError):
        m.push("def f(:\n    return 2\n")

    assert len(m.journal) == 0 and m.ns == before


def test_changed_module_docstring_becomes_the_new_doc(live):
    m = live('"""Old doc."""\nX = 1\n')

    m.push('"""New doc."""\nX = 1\n')

    assert m.module.__doc__ == "New doc."


def test_changed_string_statement_in_the_middle_does_not_become_the_module_doc(live):
    m = live('"""Module doc."""\nX = 1\n"""Doc of X."""\n')

    report = m.push('"""Module doc."""\nX = 1\n"""Doc of X, edited."""\n')

    assert m.module.__doc__ == "Module doc." and len(report.reran) == 1


def test_module_first_imported_from_disk_gets_the_new_file_name_even_if_file_was_updated(
        live, tmp_path):
    v1 = "class Steady:\n    def boom(self):\n        raise ValueError\n\ndef other():\n    return 1\n"
    m = live(v1)
    target = tmp_path / "bundle_copy.py"
    new = v1.replace("return 1", "return 2")
    target.write_text(new)
    m.module.__file__ = str(target)  # as the transaction layer does before update_module

    from overlay.rebind import update_module
    update_module(m.module, new, filename=str(target), old_source=v1, journal=m.journal)

    assert m.module.Steady.boom.__code__.co_filename == str(target)


def test_comment_inside_a_decorated_class_reruns_nothing(live):
    v1 = ("SEEN = []\n\ndef register(cls):\n    SEEN.append(cls)\n    return cls\n\n"
          "@register\nclass K:\n    def f(self):\n        return 1\n")
    m = live(v1)

    report = m.push(v1.replace("    def f(self):", "    # a comment\n    def f(self):"))

    assert report.reran == [] and m.module.SEEN == [m.module.K]


def test_sources_given_as_bytes_are_decoded_like_imports(live, tmp_path):
    from overlay.rebind import update_module

    m = live("def f():\n    return 'v1'\n")
    f = m.ns["f"]

    update_module(m.module, "# -*- coding: latin-1 -*-\r\ndef f():\r\n    return '\xe9'\r\n"
                  .encode("latin-1"), filename=str(tmp_path / "f.py"),
                  old_source=m.source.encode(), journal=m.journal)

    assert m.module.f is f and f() == "\u00e9"
