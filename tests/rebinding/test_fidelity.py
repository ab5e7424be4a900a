"""A push equals a fresh start of the new version, plus the state the unchanged code owns."""

from __future__ import annotations

DERIVED = '''
TABLE = {TABLE}
RAW = {{v: k for k, v in TABLE.items()}}
calls = [0]


class Field:
    def __set_name__(self, owner, name):
        self.raw = RAW[name]


class Metadata:
{FIELDS}
'''


def test_an_unchanged_table_derived_from_a_changed_one_runs_again_before_the_class_that_reads_it(live):
    m = live(DERIVED.format(TABLE='{"a": "a"}', FIELDS="    a = Field()"))
    calls, Metadata = m.ns["calls"], m.ns["Metadata"]

    report = m.push(DERIVED.format(TABLE='{"a": "a", "b": "b"}', FIELDS="    a = Field()\n    b = Field()"))

    assert m.ns["Metadata"] is Metadata and Metadata.b.raw == "b"
    assert m.ns["calls"] is calls  # read nothing that changed: kept, with its state
    assert report.followed == ["RAW = ... (line 3) ran again: it reads TABLE"]


def test_a_statement_whose_inputs_did_not_change_keeps_its_state(live):
    m = live("LIMIT = 1\ncache = {}\n")
    cache = m.ns["cache"]

    report = m.push("LIMIT = 2\ncache = {}\n")

    assert m.ns["cache"] is cache and report.followed == []


def test_a_function_decorator_that_registers_holds_the_live_function_once(live):
    v1 = ("import functools\nREGISTRY = []\n\ndef register(fn):\n    REGISTRY.append(fn)\n    return fn\n\n"
          "@register\ndef handler():\n    return 1\n")
    m = live(v1)
    handler = m.ns["handler"]

    # The free variables change, so the decorators run again on the new function.
    m.push(v1.replace("def handler():\n    return 1", "def handler():\n    return functools.reduce"))

    assert m.ns["REGISTRY"] == [handler] and m.ns["REGISTRY"][0] is handler
    assert handler() is __import__("functools").reduce


def test_changed_slots_patch_the_methods_old_instances_can_run_and_name_the_others(live):
    v1 = ("class P:\n    __slots__ = ('x',)\n\n    def __init__(self, x):\n        self.x = x\n\n"
          "    def double(self):\n        return self.x * 2\n\n    def total(self):\n        return self.x\n")
    m = live(v1)
    old = m.ns["P"](3)

    report = m.push(v1.replace("('x',)", "('x', 'y')").replace("self.x * 2", "self.x * 20")
                    .replace("return self.x\n", "return self.x + self.y\n"))

    assert old.double() == 60  # patched in place for the instances made before the push
    assert old.total() == 3  # uses slot y, which they lack: kept, and said
    assert any("P.total kept its old code" in n and "y" in n for n in report.notes)


def test_deleting_slots_after_the_class_statement_is_not_a_layout_change(live):
    v1 = "class C:\n    __slots__ = ('a',)\n\n    def f(self):\n        return 1\n\n\ndel C.__slots__\n"
    m = live(v1)
    C = m.ns["C"]
    obj = C()
    obj.a = 5

    report = m.push(v1.replace("return 1", "return 2"))

    assert m.ns["C"] is C and report.replaced == [] and obj.f() == 2
    assert isinstance(obj, m.ns["C"]) and obj.a == 5


def test_a_name_mangled_class_attribute_keeps_its_object(live):
    v1 = "class Opt:\n    __sentinel = object()\n\n    def f(self):\n        return 1\n"
    m = live(v1)
    sentinel = m.ns["Opt"]._Opt__sentinel

    m.push(v1.replace("return 1", "return 2"))

    assert m.ns["Opt"]._Opt__sentinel is sentinel


def test_classes_that_refer_to_each_other_update_without_recursion(live):
    v1 = ("class B:\n    def f(self):\n        return 1\n\n\nclass A:\n    env_class = B\n\n"
          "    def g(self):\n        return 1\n\n\nB.template_class = A\n")
    m = live(v1)
    A = m.ns["A"]

    m.push(v1.replace("    def g(self):\n        return 1", "    def g(self):\n        return 2"))

    assert m.ns["A"] is A and A().g() == 2 and A.env_class.template_class is A
