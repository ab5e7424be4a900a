"""Functions keep their identity across a push and run the new code everywhere."""

from __future__ import annotations

import traceback

import pytest


def test_changed_body_runs_through_the_same_function_object(live):
    m = live("def greet(name):\n    return 'hello ' + name\n")
    greet, old_code = m.ns["greet"], m.ns["greet"].__code__

    report = m.push("def greet(name):\n    return 'howdy ' + name\n")

    assert m.module.greet is greet
    assert greet.__code__ is not old_code
    assert greet("ann") == "howdy ann"
    assert report.reran == ["def greet (line 1)"]
    assert report.patched == ["greet"]
    assert report.replaced == [] and report.removed == []


def test_changed_defaults_apply_to_the_existing_function(live):
    m = live("def total(x, y=1, *, z=2):\n    return x + y + z\n")
    total = m.ns["total"]

    m.push("def total(x, y=10, *, z=20):\n    return x + y + z\n")

    assert m.module.total is total
    assert total(0) == 30
    assert total.__defaults__ == (10,) and total.__kwdefaults__ == {"z": 20}


def test_unchanged_default_expressions_keep_their_objects_and_the_state_in_them(live):
    m = live("def remember(x, seen=[]):\n    seen.append(x)\n    return len(seen)\n")
    remember = m.ns["remember"]
    remember("a"), remember("b")
    seen = remember.__defaults__[0]

    m.push("def remember(x, seen=[]):\n    seen.append(x)\n    return len(seen) * 10\n")

    assert remember.__defaults__[0] is seen
    assert remember("c") == 30


def test_annotations_docstring_and_attributes_follow_the_new_definition(live):
    m = live("def f(x: int) -> int:\n    '''Old.'''\n    return x\n")
    f = m.ns["f"]
    f.calls = 7  # state attached at run time

    m.push("def f(x: str) -> str:\n    '''New.'''\n    return x\nf.tag = 'v2'\n")

    assert f.__annotations__ == {"x": str, "return": str}
    assert f.__doc__ == "New."
    assert f.calls == 7 and f.tag == "v2"


def test_from_import_in_another_module_sees_the_new_code(live):
    m = live("def greet():\n    return 'v1'\n")
    other = live(f"from {m.module.__name__} import greet\n")

    m.push("def greet():\n    return 'v2'\n")

    assert other.module.greet is m.module.greet
    assert other.module.greet() == "v2"


def test_wraps_decorator_does_not_run_again_and_its_wrapper_runs_the_new_code(live, snippet):
    m = live(snippet("decorated_v1"))
    wrapper, inner = m.ns["double"], m.ns["double"].__wrapped__

    report = m.push(snippet("decorated_v2"))

    assert m.module.double is wrapper and wrapper.__wrapped__ is inner
    assert wrapper(2) == ("traced", 6)
    assert m.module.DECORATED == ["double"]  # the decorator ran once, at import
    assert report.patched == ["double"]


def test_changed_decorators_rebind_the_name_and_still_patch_the_old_function(live):
    m = live("import functools\n\ndef f(x):\n    return x\n")
    old = m.ns["f"]

    report = m.push("import functools\n\n@functools.lru_cache\ndef f(x):\n    return -x\n")

    assert m.module.f is not old and m.module.f.__wrapped__ is not old
    assert m.module.f(2) == -2 and old(2) == -2  # references taken before run the new code
    assert [name for name, _ in report.replaced] == ["f"]
    assert "decorators changed" in report.replaced[0][1]


def test_lru_cache_of_a_patched_function_is_cleared(live, snippet):
    m = live(snippet("lru_v1"))
    square = m.ns["square"]
    assert square(3) == 9 and square.cache_info().currsize == 1

    report = m.push(snippet("lru_v2"))

    assert m.module.square is square
    assert square(3) == 10
    assert any("cleared the cache of square" in note for note in report.notes)


def test_undo_clears_again_a_cache_filled_by_the_new_code(live, snippet):
    m = live(snippet("lru_v1"))
    square = m.ns["square"]
    m.push(snippet("lru_v2"))
    assert square(3) == 10

    m.undo()

    assert square(3) == 9


def test_deleted_function_is_removed_from_the_module(live):
    m = live("def keep():\n    return 1\n\ndef drop():\n    return 2\n")

    report = m.push("def keep():\n    return 1\n")

    assert "drop" not in m.ns and m.module.keep() == 1
    assert report.removed == ["drop"]
    assert report.reran == []


def test_a_definition_is_never_paired_through_an_alias_of_another_function(live):
    m = live("def original():\n    return 'original'\n\nalias = original\n")
    original, bytecode = m.ns["original"], m.ns["original"].__code__.co_code

    report = m.push("def original():\n    return 'original'\n\ndef alias():\n    return 'alias'\n")

    assert m.module.original is original and original.__code__.co_code == bytecode
    assert original() == "original" and m.module.alias() == "alias"
    assert m.module.alias is not original
    assert report.patched == [] and report.replaced == []


def test_lambda_bound_to_a_name_is_patched_in_place(live):
    m = live("scale = lambda x: x * 2\n")
    scale = m.ns["scale"]

    report = m.push("scale = lambda x: x * 3\n")

    assert m.module.scale is scale and scale(2) == 6
    assert report.patched == ["scale"]


def test_closure_made_by_a_factory_runs_the_new_code(live, snippet):
    m = live(snippet("closure_v1"))
    add5, factory = m.ns["add5"], m.ns["make_adder"]

    report = m.push(snippet("closure_v2"))

    assert m.module.add5 is add5 and add5(1) == 1006
    assert m.module.make_adder is factory and factory(1)(1) == 1002
    assert "make_adder.<locals>.add (1 function made at run time)" in report.patched
    assert "add5 = ... (line 8)" not in report.reran  # the statement that made it did not run


def test_closure_whose_free_variables_changed_keeps_old_code_and_is_reported(live, snippet):
    m = live(snippet("closure_v1"))
    add5 = m.ns["add5"]

    report = m.push(snippet("closure_freevars_v2"))

    assert add5(1) == 6  # made before the push: its cells cannot take the new layout
    assert m.module.make_adder(5)(1) == 1006  # new closures run the new code
    (name, reason), = report.replaced
    assert name == "make_adder.<locals>.add"
    assert "free variables changed from ('n',) to ('bonus', 'n')" in reason
    assert "1 function made before the push" in reason


def _raise_and_catch(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return traceback.extract_tb(info.value.__traceback__)[-1]


def test_traceback_of_a_changed_function_points_at_the_new_file_and_line(live):
    m = live("def boom():\n    raise ValueError('v1')\n")

    m.push("\n\n# moved down\ndef boom():\n    x = 1\n    raise ValueError('v2')\n")

    frame = _raise_and_catch(m.module.boom)
    assert (frame.filename, frame.lineno) == (str(m.path(2)), 6)
    assert frame.line == "raise ValueError('v2')"


def test_traceback_of_an_unchanged_function_that_moved_points_at_its_new_line(live):
    v1 = "def changed():\n    return 1\n\ndef steady():\n    raise ValueError('x')\n"
    v2 = "def changed():\n    y = 2\n    return y\n\ndef steady():\n    raise ValueError('x')\n"
    m = live(v1)
    steady, bytecode = m.ns["steady"], m.ns["steady"].__code__.co_code

    report = m.push(v2)

    assert report.reran == ["def changed (line 1)"]  # steady did not run again
    assert m.module.steady is steady and steady.__code__.co_code == bytecode
    frame = _raise_and_catch(steady)
    assert (frame.filename, frame.lineno) == (str(m.path(2)), 6)


def test_comment_inside_an_unchanged_function_reruns_nothing_but_fixes_lines(live):
    v1 = "def steady():\n    x = 1\n    raise ValueError(x)\n"
    v2 = "def steady():\n    x = 1\n    # a new comment\n    raise ValueError(x)\n"
    m = live(v1)

    report = m.push(v2)

    assert report.reran == [] and report.patched == []
    assert _raise_and_catch(m.module.steady).lineno == 4


def test_renamed_keyword_only_parameter_gets_its_default(live):
    m = live("def f(*, a=1):\n    return a\n")

    m.push("def f(*, b=1):\n    return b\n")

    assert m.module.f() == 1 and m.module.f.__kwdefaults__ == {"b": 1}


def test_def_inside_a_compound_statement_is_paired_by_its_qualified_name(live):
    v1 = ("try:\n    import no_such_module_xyz\nexcept ImportError:\n"
          "    def fallback():\n        return 1\n")
    m = live(v1)
    fallback = m.ns["fallback"]

    report = m.push(v1.replace("return 1", "return 2"))

    assert m.module.fallback is fallback and fallback() == 2
    assert report.patched == ["fallback"]


def test_function_turned_into_a_class_is_reported(live):
    m = live("def thing():\n    return 1\n")

    report = m.push("class thing:\n    pass\n")

    assert isinstance(m.module.thing, type)
    assert report.replaced == [("thing", "changed from a function to a class: references "
                                         "taken before the push keep the old one")]


def test_future_annotations_of_the_module_apply_to_rerun_statements(live):
    v1 = "from __future__ import annotations\n\ndef f(x: Undefined) -> int:\n    return 1\n"
    m = live(v1)

    m.push(v1.replace("return 1", "return 2"))

    assert m.module.f.__annotations__ == {"x": "Undefined", "return": "int"}
    assert m.module.f(0) == 2


def test_successive_pushes_to_the_same_function_each_apply(live):
    m = live("def f():\n    return 1\n")
    f = m.ns["f"]

    for n in range(2, 6):
        m.push(f"def f():\n    return {n}\n")
        assert f() == n


def test_functions_sharing_a_name_are_paired_by_their_own_statement(live):
    v1 = ("import functools\n\n@functools.singledispatch\ndef show(x):\n    return 'any'\n\n"
          "@show.register\ndef _(x: int):\n    return 'int'\n\n"
          "@show.register\ndef _(x: str):\n    return 'str'\n")
    m = live(v1)
    last = m.ns["_"]

    m.push(v1.replace("return 'int'", "return 'INT'"))

    assert m.module.show(1) == "INT" and m.module.show("s") == "str"
    assert m.module._ is last and last("s") == "str"  # the later definition still owns `_`
