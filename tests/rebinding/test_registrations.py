"""One registration per class: what a re-run class statement registered names the live class, once.

A changed class statement runs again (its metaclass, its bases' ``__init_subclass__`` and its
decorators with it) and the old class is patched in place from the result. Registries that took the
new, throwaway class object must end up holding the live class, exactly once, as after a fresh start.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import sys
import types

import pytest

from overlay.rebinding.registrations import may_register

REGISTRY = '''
import sys
TABLE = sys.modules["registry_probe"].TABLE
LIST = sys.modules["registry_probe"].LIST
BY_CLASS = sys.modules["registry_probe"].BY_CLASS
'''

METACLASS = REGISTRY + '''
class Registering(type):
    def __new__(mcs, name, bases, ns):
        cls = super().__new__(mcs, name, bases, ns)
        TABLE[name] = cls
        BY_CLASS[cls] = ns.get("ROUTE")
        return cls

class Product(metaclass=Registering):
    ROUTE = "/v{price}"

    def price(self):
        return {price}
'''

SUBCLASS_HOOK = REGISTRY + '''
class Plugin:
    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        LIST.append(cls)

class Csv(Plugin):
    def load(self):
        return {value!r}
'''

DECORATOR = REGISTRY + '''
def register(cls):
    LIST.append(cls)
    TABLE[cls.__name__] = cls
    return cls

@register
class Handler:
    def handle(self):
        return {value!r}
'''


@pytest.fixture
def probe():
    """The registries live in another module, as a framework's do: re-running the app's module
    does not reset them."""
    module = types.ModuleType("registry_probe")
    module.TABLE, module.LIST, module.BY_CLASS = {}, [], {}
    sys.modules["registry_probe"] = module
    yield module
    del sys.modules["registry_probe"]


def test_a_metaclass_registry_holds_the_live_class_after_its_statement_ran_again(live, probe):
    m = live(METACLASS.format(price=1))
    Product = m.ns["Product"]
    bought = Product()

    report = m.push(METACLASS.format(price=2))

    assert m.ns["Product"] is Product and probe.TABLE == {"Product": Product}
    assert probe.TABLE["Product"] is Product and probe.BY_CLASS == {Product: "/v2"}
    assert bought.price() == 2 and isinstance(bought, probe.TABLE["Product"])
    assert any("reference(s) to the new objects" in note for note in report.notes)


def test_init_subclass_registers_the_live_class_once(live, probe):
    m = live(SUBCLASS_HOOK.format(value="v1"))
    Csv = m.ns["Csv"]

    m.push(SUBCLASS_HOOK.format(value="v2"))

    assert probe.LIST == [Csv] and probe.LIST[0] is Csv
    assert Csv().load() == "v2"


def test_a_registering_class_decorator_leaves_one_live_entry(live, probe):
    m = live(DECORATOR.format(value="v1"))
    Handler = m.ns["Handler"]

    report = m.push(DECORATOR.format(value="v2"))

    assert probe.LIST == [Handler] and probe.LIST[0] is Handler and probe.TABLE["Handler"] is Handler
    assert "Handler" in report.patched and Handler().handle() == "v2"


def test_the_throwaway_class_is_not_left_in_the_plugin_registry_base(live, probe):
    m = live(SUBCLASS_HOOK.format(value="v1"))
    Plugin = m.ns["Plugin"]

    m.push(SUBCLASS_HOOK.format(value="v2"))
    m.journal.commit()  # as the transaction does once the push is in
    gc.collect()

    assert Plugin.__subclasses__() == [m.ns["Csv"]]


def test_undo_puts_the_registries_back_exactly(live, probe):
    m = live(METACLASS.format(price=1) + DECORATOR.split(REGISTRY)[1].format(value="v1"))
    before = (dict(probe.TABLE), list(probe.LIST), dict(probe.BY_CLASS))

    m.push(METACLASS.format(price=2) + DECORATOR.split(REGISTRY)[1].format(value="v2"))
    m.undo()

    assert probe.TABLE == before[0] and all(probe.TABLE[k] is v for k, v in before[0].items())
    assert probe.LIST == before[1] and all(a is b for a, b in zip(probe.LIST, before[1]))
    assert list(probe.BY_CLASS) == list(before[2]) and probe.BY_CLASS == before[2]  # {Product: "/v1"}


@pytest.mark.parametrize("kind", ["plain", "dataclass", "enum", "abc"])
def test_classes_that_cannot_register_cost_no_heap_walk(kind):
    import abc

    classes = {
        "plain": type("Plain", (), {}),
        "dataclass": dataclasses.dataclass(type("Data", (), {"__annotations__": {"x": int}})),
        "enum": enum.Enum("Color", "RED"),
        "abc": abc.ABCMeta("Shape", (abc.ABC,), {}),
    }

    assert may_register(classes[kind], impure_decorators=False) is False


def test_a_metaclass_a_subclass_hook_or_an_impure_decorator_may_register():
    class Meta(type):
        pass

    class Base:
        def __init_subclass__(cls):
            pass

    assert may_register(Meta("A", (), {}), impure_decorators=False)
    assert may_register(type("B", (Base,), {}), impure_decorators=False)
    assert may_register(type("C", (), {}), impure_decorators=True)
