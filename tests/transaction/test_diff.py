"""What differs between two versions: one pass, or none when opening the push already knew."""

from __future__ import annotations

import pytest
from support.bundles import FILES, PUSHES, delta_push, held, open_base

from overlay.transaction.diff import entry_diff
from overlay.bundle import build_bundle, open_bundle

EXPECTED = {
    "one line": ((), ("app.a",), ()),
    "a file added": (("app.new",), (), ()),
    "a file removed": ((), (), ("app.b",)),
    "a file renamed": (("app.sub.d",), (), ("app.sub.c",)),
    "a body that shrinks": ((), ("app",), ()),
    "everything": ((), tuple(sorted(FILES)), ()),
    "nothing": ((), (), ()),
}


@pytest.fixture
def base(signing_key, trusted):
    return open_base(signing_key, trusted)


@pytest.mark.parametrize("push", PUSHES, ids=list(PUSHES))
def test_the_diff_names_what_was_added_changed_and_removed(push, base, signing_key, trusted):
    data = delta_push(PUSHES[push], base, signing_key)
    slow = entry_diff(base, open_bundle(data, trusted, content=held(base)))
    fast = entry_diff(base, open_bundle(data, trusted, content=held(base), base=base))
    assert (fast.added, fast.changed, fast.removed) == (slow.added, slow.changed, slow.removed) == EXPECTED[push]


def test_a_push_opened_against_base_carries_its_diff_when_names_and_kinds_are_the_same(base, signing_key, trusted):
    data = delta_push(PUSHES["one line"], base, signing_key)
    opened = open_bundle(data, trusted, content=held(base), base=base)
    assert opened.changed_from == (base.digest, (), ("app.a",))
    other = open_bundle(build_bundle(FILES, app_id="app", version=3, signers=[signing_key]), trusted)
    assert entry_diff(other, opened).changed == ("app.a",), "against another bundle: the full pass"
    assert open_bundle(data, trusted, content=held(base)).changed_from is None


def test_a_module_that_becomes_a_package_with_the_same_bytes_is_changed(base, signing_key, trusted):
    files = {**FILES, "app.a": ("package", FILES["app.a"][1])}
    new = open_bundle(build_bundle(files, app_id="app", version=2, signers=[signing_key]), trusted, base=base)
    assert entry_diff(base, new).changed == ("app.a",)
