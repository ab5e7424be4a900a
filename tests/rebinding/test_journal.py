"""The undo journal restores the very same objects, and never stops half-way."""

from __future__ import annotations

import enum

import pytest

from overlay.rebinding.journal import Journal, UndoIncomplete


def sample(x, y=1, *, z=2):
    """Doc."""
    return x


def test_function_attributes_are_restored_to_the_same_objects():
    def other(a, b=5, *, c=6) -> int:
        """Other doc."""
        return -a

    saved = {a: getattr(sample, a) for a in ("__code__", "__defaults__", "__kwdefaults__",
                                            "__annotations__", "__doc__", "__dict__")}
    journal = Journal()
    for attr in saved:
        journal.setattr(sample, attr, getattr(other, attr) if attr != "__dict__" else {"k": 1})
    assert sample(3) == -3 and sample.k == 1

    journal.undo()

    assert all(getattr(sample, attr) is value for attr, value in saved.items())
    assert sample(3) == 3


def test_class_attributes_go_through_type_setattr_and_come_back():
    class Color(enum.Enum):
        RED = 1

        def label(self):
            return "old"

    red, label = Color.RED, vars(Color)["label"]
    journal = Journal()
    journal.setattr(Color, "RED", "not a member")  # EnumType.__setattr__ would refuse this
    journal.delattr(Color, "label")
    journal.setattr(Color, "added", 42)

    journal.undo()

    assert vars(Color)["RED"] is red and vars(Color)["label"] is label
    assert "added" not in vars(Color)


def test_attribute_inherited_from_a_base_is_not_copied_into_the_subclass_on_undo():
    class Base:
        x = 1

    class Sub(Base):
        pass

    journal = Journal()
    journal.setattr(Sub, "x", 2)
    journal.undo()

    assert "x" not in vars(Sub) and Sub.x == 1


def test_mapping_items_are_restored_and_added_keys_removed():
    data = {"a": [1], "b": [2]}
    a = data["a"]
    journal = Journal()
    journal.setitem(data, "a", [9])
    journal.delitem(data, "b")
    journal.setitem(data, "c", 3)

    journal.undo()

    assert data.keys() == {"a", "b"} and data["a"] is a


def test_snapshot_restores_a_dict_mutated_behind_the_journal_s_back():
    namespace = {"keep": object(), "change": object()}
    before = dict(namespace)
    journal = Journal()
    journal.snapshot(namespace)
    namespace["change"] = 1
    namespace["new"] = 2
    del namespace["keep"]

    journal.undo()

    assert namespace.keys() == before.keys()
    assert all(namespace[k] is v for k, v in before.items())


def test_class_dict_cannot_be_used_as_a_mapping():
    class K:
        pass

    with pytest.raises(TypeError, match="journal.setattr"):
        Journal().setitem(vars(K), "x", 1)


def test_call_records_its_undo_only_when_the_action_succeeded():
    log = []
    journal = Journal()
    result = journal.call(lambda: log.append("do") or "result", lambda: log.append("undo"))
    assert result == "result"
    with pytest.raises(ZeroDivisionError):
        journal.call(lambda: 1 / 0, lambda: log.append("never"))

    journal.undo()

    assert log == ["do", "undo"]


def test_undo_keeps_going_past_failures_and_raises_them_together_at_the_end():
    data = {"a": 1}
    journal = Journal()
    journal.setitem(data, "a", 2)
    journal.call(lambda: None, lambda: 1 / 0)
    journal.call(lambda: None, lambda: [][0])

    with pytest.raises(UndoIncomplete) as info:
        journal.undo()

    assert data == {"a": 1}  # the oldest step still ran after two failures
    assert [type(e) for e in info.value.exceptions] == [IndexError, ZeroDivisionError]
    assert len(journal) == 0


def test_commit_forgets_the_undos():
    data = {"a": 1}
    journal = Journal()
    journal.setitem(data, "a", 2)
    journal.commit()
    journal.undo()
    assert data == {"a": 2}


def test_closure_cell_contents_can_be_journaled():
    def make():
        value = "old"

        def get():
            return value

        return get

    get = make()
    cell = get.__closure__[0]
    journal = Journal()
    journal.setattr(cell, "cell_contents", "new")
    assert get() == "new"
    journal.undo()
    assert get() == "old"
