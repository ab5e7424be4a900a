"""check_update: a change is refused exactly when the whole new source would not compile, at the
cost of the statements that changed."""

from __future__ import annotations

import builtins
import itertools

import pytest

from overlay.rebind import check_update

_names = itertools.count()

BIG = "".join(f"\n\ndef f{i}(x):\n    return x + {i}\n" for i in range(200))
OLD = '"""A module."""\nfrom __future__ import annotations\n\nimport os\n' + BIG


def check(new: str, old: str = OLD, name: str | None = None):
    return check_update(name or f"checked_{next(_names)}", new, filename="/app/m.py", old_source=old)


def test_a_one_function_change_compiles_that_function_only(monkeypatch):
    sizes: list[int] = []
    real = builtins.compile

    def recording(source, *args, **kwargs):
        sizes.append(len(source) if isinstance(source, str) else -1)  # -1: an AST, one statement
        return real(source, *args, **kwargs)

    check(OLD, name="m")  # the old version's statement table is cached, as after its own push
    monkeypatch.setattr(builtins, "compile", recording)
    diff = check(OLD.replace("return x + 7\n", "return x + 70\n"), name="m")
    assert [p.node.name for p, _ in diff.changed] == ["f7"]
    assert all(size < 200 for size in sizes), f"whole-module compiles: {sizes}"


@pytest.mark.parametrize("broken, message", [
    ("def f7(x):\n    return x +\n", "invalid syntax"),
    ("def f7(x):\n    nonlocal y\n    return x\n", "no binding for nonlocal 'y' found"),
    ("def f7(x):\n    return x\nreturn 1\n", "'return' outside function"),
    ("def f7(x):\n    '''never closed\n    return x\n", "unterminated triple-quoted string"),
    ("def f7(x):\n    for i in x:\n        pass\n    break\n", "'break' outside loop"),
])
def test_an_error_anywhere_in_the_changed_statements_is_a_syntax_error(broken, message):
    with pytest.raises(SyntaxError, match=message):
        check(OLD.replace("def f7(x):\n    return x + 7\n", broken))


def test_a_statement_inserted_above_a_future_import_is_refused_like_a_whole_compile():
    new = OLD.replace('"""A module."""\n', '"""A module."""\nX = 1\n')
    with pytest.raises(SyntaxError, match="from __future__ imports must occur at the beginning"):
        check(new)


def test_a_change_below_the_future_imports_keeps_their_flags():
    diff = check(OLD.replace("return x + 7\n", "return x + 70\n"))
    assert diff.table.future and not diff.rerun_all


def test_unknown_old_source_compiles_the_whole_module():
    with pytest.raises(SyntaxError, match="'return' outside function"):
        check(OLD + "\nreturn 3\n", old=None)


def test_the_code_checked_is_the_code_that_runs_and_each_source_is_decoded_once(monkeypatch):
    import importlib.util
    import types

    from overlay.rebinding import statements as _statements
    from overlay.rebinding.journal import Journal
    from overlay.rebind import update_module

    module = types.ModuleType("checked_runs")
    old = OLD.encode()
    exec(compile(old, "/app/m.py", "exec"), module.__dict__)
    check_update("checked_runs", old, filename="/app/m.py", old_source=None)  # as its own push did
    new = OLD.replace("return x + 7\n", "return x + 70\n").encode()
    decoded: list[int] = []
    real_decode = importlib.util.decode_source
    monkeypatch.setattr(importlib.util, "decode_source", lambda b: decoded.append(len(b)) or real_decode(b))
    diff = check_update("checked_runs", new, filename="/app/m.py", old_source=old)
    compiled: list[object] = []
    monkeypatch.setattr(builtins, "compile", lambda *a, **k: compiled.append(a[0]) or _real_compile(*a, **k))
    before = module.f7
    update_module(module, new, filename="/app/m.py", old_source=old, journal=Journal(), diff=diff)
    assert module.f7 is before and module.f7(1) == 71
    assert compiled == [], "the changed def runs the code check_update compiled"
    assert decoded == [len(new)], "the old source was decoded by its own push; the new one once"
    assert _statements._DECODED  # (the cache this relies on)


_real_compile = builtins.compile
