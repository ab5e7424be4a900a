"""Classes keep their identity: instances, bound methods and subclasses see the new code."""

from __future__ import annotations

import dataclasses


def test_existing_instance_runs_the_changed_method(live, snippet):
    m = live(snippet("greeter_v1"))
    Greeter = m.ns["Greeter"]
    ann = Greeter("ann")

    report = m.push(snippet("greeter_v2"))

    assert m.module.Greeter is Greeter and type(ann) is Greeter
    assert isinstance(ann, m.module.Greeter)
    assert ann.greet() == "howdy, ann!"
    assert "Greeter" in report.patched and "Greeter.greet" in report.patched
    assert report.reran == ["class Greeter (line 1)"]


def test_bound_method_taken_before_the_push_runs_the_new_code(live, snippet):
    m = live(snippet("greeter_v1"))
    greet = m.ns["Greeter"]("ann").greet

    m.push(snippet("greeter_v2"))

    assert greet() == "howdy, ann!"


def test_added_method_is_available_on_existing_instances(live, snippet):
    m = live(snippet("greeter_v1"))
    ann = m.ns["Greeter"]("ann")

    report = m.push(snippet("greeter_v2"))

    assert ann.wave() == "*waves at ann*"
    assert "Greeter.wave (added)" in report.patched


def test_removed_method_is_gone_from_the_class(live, snippet):
    m = live(snippet("greeter_v1"))
    ann = m.ns["Greeter"]("ann")

    report = m.push(snippet("greeter_v2"))

    assert not hasattr(ann, "farewell") and "farewell" not in vars(m.module.Greeter)
    assert report.removed == ["Greeter.farewell"]


def test_property_classmethod_and_staticmethod_are_patched_in_place(live, snippet):
    m = live(snippet("greeter_v1"))
    Greeter = m.ns["Greeter"]
    shout, make, punctuation = (vars(Greeter)[n] for n in ("shout", "make", "punctuation"))
    getter, maker, punct = shout.fget, make.__func__, punctuation.__func__
    ann = Greeter("ann")

    report = m.push(snippet("greeter_v2"))

    assert vars(Greeter)["shout"] is shout and shout.fget is getter
    assert vars(Greeter)["make"] is make and make.__func__ is maker
    assert vars(Greeter)["punctuation"] is punctuation and punctuation.__func__ is punct
    assert ann.shout == "HOWDY, ANN!!!"
    assert Greeter.make("bob").name == "Bob"
    assert Greeter.punctuation() == "!"
    assert {"Greeter.shout", "Greeter.make", "Greeter.punctuation"} <= set(report.patched)


def test_changed_class_attribute_is_updated_and_unchanged_one_keeps_its_run_time_value(
        live, snippet):
    m = live(snippet("greeter_v1"))
    Greeter = m.ns["Greeter"]
    Greeter("ann"), Greeter("bob")  # Greeter.created is now 2: run-time state

    report = m.push(snippet("greeter_v2"))

    assert Greeter.greeting == "howdy"
    assert Greeter.created == 2  # `created = 0` did not change, so it did not run again
    assert "Greeter.greeting" in report.patched and "Greeter.created" not in report.patched


def test_subclass_inherits_the_change_of_its_base_without_being_defined_again(live, snippet):
    m = live(snippet("subclass_v1"))
    Dog = m.ns["Dog"]
    rex = Dog()

    report = m.push(snippet("subclass_v2"))

    assert m.module.Dog is Dog and rex.describe() == "Dog: woof"
    assert report.reran == ["class Animal (line 1)"]


def test_super_in_a_changed_method_keeps_working_on_existing_instances(live, snippet):
    m = live(snippet("super_v1"))
    Child = m.ns["Child"]
    kid = Child()
    hello = vars(Child)["hello"]

    report = m.push(snippet("super_v2"))

    assert vars(Child)["hello"] is hello  # both versions use super(): patched in place
    assert kid.hello() == "CHILD+base"
    assert "Child.hello" in report.patched


def test_method_that_starts_using_super_is_replaced_with_the_reason_and_still_works(
        live, snippet):
    m = live(snippet("super_v1"))
    Child = m.ns["Child"]
    kid = Child()
    plain_before = kid.plain  # bound before the push: keeps the old code, as reported

    report = m.push(snippet("super_v2"))

    assert kid.plain() == "plain+base"  # the new function found the old class in __class__
    assert plain_before() == "plain"
    (name, reason), = report.replaced
    assert name == "Child.plain"
    assert "free variables changed from () to ('__class__',)" in reason
    assert "zero-argument super()" in reason


def test_dataclass_gaining_a_field_with_a_default_works_for_new_and_old_instances(
        live, snippet):
    m = live(snippet("dataclass_v1"))
    Point = m.ns["Point"]
    old_point = Point(1, -2)

    report = m.push(snippet("dataclass_v2"))

    assert m.module.Point is Point
    assert Point(1, 2, -3).norm1() == 6
    assert [f.name for f in dataclasses.fields(Point)] == ["x", "y", "z"]
    assert Point.__match_args__ == ("x", "y", "z")
    assert vars(old_point) == {"x": 1, "y": -2}  # its __init__ never ran again
    assert old_point.norm1() == 3 and repr(old_point) == "Point(x=1, y=-2, z=0)"
    assert {"Point.z (added)", "Point.__init__", "Point.norm1"} <= set(report.patched)


def test_enum_gaining_a_member_keeps_the_existing_members(live, snippet):
    m = live(snippet("enum_v1"))
    Color, Level = m.ns["Color"], m.ns["Level"]
    red, green, low, high = Color.RED, Color.GREEN, Level.LOW, Level.HIGH

    report = m.push(snippet("enum_v2"))

    assert m.module.Color is Color and Color.RED is red and Color(2) is green
    assert list(Color) == [red, green, Color.BLUE]
    assert Color(3) is Color.BLUE and Color["BLUE"] is Color.BLUE
    assert type(Color.BLUE) is Color and isinstance(Color.BLUE, Color)
    assert red.label() == "Red"
    assert list(Level) == [low, Level.MEDIUM, high] and Level(2) == 2 and Level.MEDIUM < high
    assert {"Color.BLUE (added)", "Level.MEDIUM (added)", "Color.label"} <= set(report.patched)


def test_enum_member_deleted_from_the_source_is_removed_and_reported(live):
    m = live("import enum\n\nclass Mode(enum.Enum):\n    A = 1\n    B = 2\n")
    Mode = m.ns["Mode"]
    a = Mode.A

    report = m.push("import enum\n\nclass Mode(enum.Enum):\n    A = 1\n")

    assert list(Mode) == [a] and "B" not in Mode.__members__
    assert report.removed == ["Mode.B (enum member; existing references keep the object)"]


def test_slots_change_replaces_the_class_and_says_which_instances_keep_the_old_one(
        live, snippet):
    m = live(snippet("slots_v1"))
    OldPair = m.ns["Pair"]
    before = OldPair(1)

    report = m.push(snippet("slots_v2"))

    assert m.module.Pair is not OldPair and m.module.Pair(1, 2).total() == 3
    assert type(before) is OldPair and before.total() == 1
    assert report.replaced == [("Pair", "`__slots__` changed from ('a',) to ('a', 'b'): "
                                        "instances created before version 2 keep the old class")]


def test_changed_bases_replace_the_class_with_the_reason(live):
    m = live("class A:\n    pass\n\nclass B:\n    pass\n\nclass C(A):\n    pass\n")
    OldC = m.ns["C"]

    report = m.push("class A:\n    pass\n\nclass B:\n    pass\n\nclass C(A, B):\n    pass\n")

    assert m.module.C is not OldC and m.module.C.__bases__ == (m.module.A, m.module.B)
    assert report.replaced == [("C", "its base classes changed from (A,) to (A, B): "
                                     "instances created before version 2 keep the old class")]


def test_changed_metaclass_replaces_the_class_with_the_reason(live):
    v1 = "import abc\n\nclass Plugin:\n    pass\n"
    m = live(v1)

    report = m.push("import abc\n\nclass Plugin(metaclass=abc.ABCMeta):\n    pass\n")

    assert report.replaced == [("Plugin", "its metaclass changed from type to ABCMeta: "
                                          "instances created before version 2 keep the old class")]


def test_a_subclass_statement_runs_again_on_its_replaced_base_as_after_a_fresh_start(live, snippet):
    v1 = "class Base:\n    __slots__ = ()\n\nclass Leaf(Base):\n    pass\n"
    m = live(v1)

    report = m.push("class Base:\n    __slots__ = ('x',)\n\nclass Leaf(Base):\n    pass\n")

    assert [name for name, _ in report.replaced] == ["Base", "Leaf"]
    assert m.ns["Leaf"].__bases__ == (m.ns["Base"],)
    assert report.followed == ["class Leaf (line 4) ran again: it reads Base"]


def test_nested_class_is_patched_in_place(live):
    v1 = "class Outer:\n    class Inner:\n        def f(self):\n            return 1\n"
    m = live(v1)
    Inner = m.ns["Outer"].Inner

    report = m.push(v1.replace("return 1", "return 2"))

    assert m.module.Outer.Inner is Inner and Inner().f() == 2
    assert "Outer.Inner.f" in report.patched


def test_enum_member_value_change_keeps_the_member_object(live):
    m = live("import enum\n\nclass Code(enum.Enum):\n    OK = 1\n")
    ok = m.ns["Code"].OK

    report = m.push("import enum\n\nclass Code(enum.Enum):\n    OK = 200\n")

    assert m.module.Code.OK is ok and ok.value == 200 and m.module.Code(200) is ok
    assert "Code.OK (value 1 -> 200)" in report.patched


def test_traceback_of_a_method_in_a_moved_class_points_at_its_new_line(live):
    v1 = "def f():\n    return 1\n\nclass K:\n    def boom(self):\n        raise ValueError\n"
    m = live(v1)

    m.push(v1.replace("return 1", "x = 1\n    return x"))

    import traceback
    try:
        m.module.K().boom()
    except ValueError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
    assert (frame.filename, frame.lineno) == (str(m.path(2)), 7)


def test_class_decorator_that_registers_leaves_the_live_class_registered_once_and_says_so(live):
    v1 = ("SEEN = []\n\ndef register(cls):\n    SEEN.append(cls)\n    return cls\n\n"
          "@register\nclass K:\n    def f(self):\n        return 1\n")
    m = live(v1)

    report = m.push(v1.replace("return 1", "return 2"))

    assert m.module.K().f() == 2
    assert m.module.SEEN == [m.module.K] and m.module.SEEN[0] is m.module.K
    assert any("definitions ran again (K): 1 reference(s)" in n for n in report.notes)
