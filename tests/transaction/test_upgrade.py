"""The push transaction through ``Overlay.apply`` / ``Overlay.rollback``, on a real store and finder.

The rebinding engine has its own module-level scenarios (``tests/rebinding``); these drive the whole
transaction in this process: verify, plan, stage, apply under the import lock, commit or undo. Each
scenario is a pair of source trees in ``snippets/<scenario>/v1`` and ``v2``. Import state
(``sys.modules``, ``sys.meta_path``) is restored after every test by the ``import_state`` fixture, and
the overlay is uninstalled even when a test fails.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.upgrade import (
    APP,
    Deployment,
    assert_same,
    m,
    snapshot,
    snippet_files,
    start,
    write_tree,
)

import overlay
from overlay.bundle import bundle_digest
from overlay.transaction.plan import imported_names
from overlay.format.wire import FLAG_PACKED, HEADER as _HEADER
from overlay.errors import (
    StaleVersion,
    ActivationFailed,
    BundleRejected,
    CompileFailed,
    ControlRejected,
)

# ------------------------------------------------------------------------- the scenario matrix


AS_V1 = object()


@dataclass
class Case:
    """One kind of change: what the app observes at v1 and v2, and which objects keep identity.

    ``hold`` takes references before the push (instances, bound methods, closures), as running
    code would; ``kept`` names objects that must be the very same after the push and after the
    rollback; ``check`` looks at the push's report.
    """

    scenario: str
    behaviour: Callable[[dict[str, Any]], Any]
    v1: Any
    v2: Any
    kept: Callable[[], dict[str, Any]] = dict
    hold: Callable[[], dict[str, Any]] = dict
    check: Callable[[Any], None] = lambda report: None
    after_rollback: Any = AS_V1  # when it differs from v1, with the reason in a comment


def _replaced(report: Any) -> dict[str, str]:
    return {name: reason for mod in report.modules for name, reason in mod.replaced}


def _slots_reported(report: Any) -> None:
    reason = _replaced(report)["Pair"]
    assert "__slots__" in reason and f"instances created before version {report.version} keep the old class" in reason


def _freevars_reported(report: Any) -> None:
    reasons = _replaced(report)
    assert any("free variables changed" in r for r in reasons.values()), reasons


def _legacy_removed(report: Any) -> None:
    assert report.removed == ["upapp.legacy"]


def _only_data_changed(report: Any) -> None:
    assert report.data_changed == ["upapp/templates/page.html"] and report.changed == report.modules == []


def _legacy(_: Any) -> str:
    try:
        return importlib.import_module("upapp.legacy").old()
    except ModuleNotFoundError:
        return "not served"


def _module_state(held: dict[str, Any]) -> tuple[Any, ...]:
    fresh = m.core.lookup(f"k{len(m.core.CACHE)}")  # a key never asked before
    return (m.core.lookup("seen"), fresh.rpartition(" by ")[2], len(m.probe.registry),
            m.core.CACHE is held["cache"])


def _hold_greeter() -> dict[str, Any]:
    greeter = m.core.Greeter("ann")
    return {"g": greeter, "bound": greeter.hello}


def _hold_cache() -> dict[str, Any]:
    m.core.lookup("seen")
    return {"cache": m.core.CACHE}


CASES = [
    Case("function_body", lambda h: h["greet"]("ann"), "hello ann from v1", "hello ann from v2",
         kept=lambda: {"greet": m.core.greet}, hold=lambda: {"greet": m.core.greet}),
    Case("defaults", lambda h: (m.core.scale(1), m.core.scale(1, offset=0)), (2, 2), (4, 3),
         kept=lambda: {"scale": m.core.scale}),
    Case("methods",
         lambda h: (h["bound"](), h["g"].hello(), hasattr(h["g"], "wave") and h["g"].wave(),
                    hasattr(h["g"], "retired")),
         ("hello ann (v1)", "hello ann (v1)", False, True),
         ("hello ann (v2)", "hello ann (v2)", "ann waves (new in v2)", False),
         kept=lambda: {"Greeter": m.core.Greeter, "hello": m.core.Greeter.__dict__["hello"]},
         hold=_hold_greeter),
    Case("descriptors",
         lambda h: (h["s"].label, m.core.Shape.make(), h["s"].unit(), m.core.Shape.unit()),
         ("4 sides (v1)", "Shape.make v1", "unit v1", "unit v1"),
         ("4 sides (v2)", "Shape.make v2", "unit v2", "unit v2"),
         kept=lambda: {"Shape": m.core.Shape, "label": m.core.Shape.__dict__["label"].fget,
                       "make": m.core.Shape.__dict__["make"].__func__,
                       "unit": m.core.Shape.__dict__["unit"].__func__},
         hold=lambda: {"s": m.core.Shape()}),
    Case("class_attribute",
         lambda h: (h["c"].speak(), m.child.Child.greeting, isinstance(h["c"], m.base.Base)),
         ("hello from Base v1", "hello", True), ("howdy from Base v2", "howdy", True),
         kept=lambda: {"Base": m.base.Base, "Child": m.child.Child, "speak": m.base.Base.speak},
         hold=lambda: {"c": m.child.Child()}),
    Case("super_call", lambda h: h["dog"].sound(), "woof v1 over ...", "woof v2 over ...",
         kept=lambda: {"Dog": m.core.Dog, "sound": m.core.Dog.sound}, hold=lambda: {"dog": m.core.Dog()}),
    Case("decorated",
         lambda h: (m.core.price(5), h["registered"](5), len(m.probe.registry)),
         (("traced", 10), ("traced", 10), 1), (("traced", 15), ("traced", 15), 1),
         kept=lambda: {"price": m.core.price, "inner": m.core.price.__wrapped__},
         hold=lambda: {"registered": m.probe.registry[0][1]}),
    Case("closure", lambda h: (h["made"](1), m.core.add_ten(1), m.core.make_adder(5)(1)),
         (6, 11, 6), (1006, 1011, 1006),
         kept=lambda: {"make_adder": m.core.make_adder, "add_ten": m.core.add_ten},
         hold=lambda: {"made": m.core.make_adder(5)}),
    Case("closure_freevars", lambda h: (h["made"](1), m.core.make_adder(5)(1)), (6, 6), (6, 1006),
         kept=lambda: {"make_adder": m.core.make_adder}, hold=lambda: {"made": m.core.make_adder(5)},
         check=_freevars_reported),
    Case("dataclass_field",
         lambda h: (h["p"].norm1(), repr(m.core.Point(1, 2)), len(dataclasses.fields(m.core.Point))),
         (3, "Point(x=1, y=2)", 2), (3, "Point(x=1, y=2, z=0)", 3),
         kept=lambda: {"Point": m.core.Point, "norm1": m.core.Point.norm1},
         hold=lambda: {"p": m.core.Point(1, 2)}),
    Case("enum_member", lambda h: ([c.name for c in m.core.Color], m.core.Color(1) is h["red"]),
         (["RED", "GREEN"], True), (["RED", "GREEN", "BLUE"], True),
         kept=lambda: {"Color": m.core.Color, "RED": m.core.Color.RED}, hold=lambda: {"red": m.core.Color.RED}),
    # A __slots__ change replaces the class (reported); instances made before keep the old one.
    Case("slots", lambda h: (h["a"].total(), m.core.Pair.__slots__, type(h["a"]) is m.core.Pair),
         (1, ("a",), True), (1, ("a", "b"), False), hold=lambda: {"a": m.core.Pair(1)},
         check=_slots_reported,
         after_rollback=(1, ("a",), False)),  # the rollback makes a third class from v1's source
    Case("module_state", _module_state, ("seen computed by v1", "v1", 1, True),
         ("seen computed by v1", "v2", 1, True), kept=lambda: {"lookup": m.core.lookup}, hold=_hold_cache),
    Case("deleted_function", lambda h: (m.core.keep(), hasattr(m.core, "obsolete")), ("kept", True),
         ("kept", False), kept=lambda: {"keep": m.core.keep}),
    Case("from_import", lambda h: (m.views.checkout(10), m.views.price is m.core.price), (20, True), (30, True),
         kept=lambda: {"price": m.core.price, "checkout": m.views.checkout}),
    Case("new_module", lambda h: (m.core.total([1, 2]), "upapp.tax" in sys.modules), (3, False), (4.5, True),
         kept=lambda: {"total": m.core.total}),
    Case("dependency_order", lambda h: m.alpha.price(), 10, 15, kept=lambda: {"price": m.alpha.price}),
    Case("migration", lambda h: (m.sessions.since("ann"), type(m.sessions.SESSIONS["ann"]).__name__),
         ("2024-01-01", "str"), ("2024-01-01", "dict"), kept=lambda: {"since": m.sessions.since}),
    Case("removed_module", _legacy, "legacy v1", "not served", check=_legacy_removed),
    # Only a data file changed: the unchanged package and module must read the new version's tree.
    Case("data_file", lambda h: (m.pages.page(), m.pages.page_beside_me()),
         ("<h1>page v1</h1>\n",) * 2, ("<h1>page v2</h1>\n",) * 2,
         kept=lambda: {"page": m.pages.page}, check=_only_data_changed),
]


@pytest.mark.parametrize("case", CASES, ids=[c.scenario for c in CASES])
def test_push_changes_behaviour_in_place_and_rollback_restores_it_keeping_identities(deploy, case):
    start(deploy, case.scenario)
    held = case.hold()
    kept = case.kept()
    assert case.behaviour(held) == case.v1

    report = deploy.push(case.scenario, "v2")

    assert deploy.ov.version == 2 and report.action == "push" and report.version == 2
    assert case.behaviour(held) == case.v2
    assert_kept(case, kept)
    case.check(report)

    back = deploy.ov.rollback()

    assert back.action == "rollback" and back.version == 1 and deploy.ov.version == 1
    expected = case.v1 if case.after_rollback is AS_V1 else case.after_rollback
    assert case.behaviour(held) == expected
    assert_kept(case, kept)


def assert_kept(case: Case, kept: dict[str, Any]) -> None:
    now = case.kept()
    for name, obj in kept.items():
        assert now[name] is obj, f"{name} is another object than before the push"


# ------------------------------------------------------------------------------ modules


def test_a_new_module_imported_by_a_changed_module_is_served_from_the_new_version(deploy, probe):
    start(deploy, "new_module")

    report = deploy.push("new_module", "v2")

    assert report.added == ["upapp.tax"] and report.changed == ["upapp.core"]
    tax = sys.modules["upapp.tax"]
    assert m.core.with_tax is tax.with_tax and probe.runs["upapp.tax"] == 1
    assert tax.__file__ == str(deploy.ov.tree_root / "upapp" / "tax.py")
    assert tax.__spec__.loader is deploy.ov.finder.loader and tax.__spec__.loader.index.version == 2


def test_two_changed_modules_run_in_dependency_order_not_name_order(deploy):
    start(deploy, "dependency_order")

    report = deploy.push("dependency_order", "v2")

    # alpha sorts first, but its new `from upapp.beta import SURCHARGE` needs beta's new name
    assert [r.module for r in report.modules] == ["upapp.beta", "upapp.alpha"]
    assert m.alpha.price() == 15 and m.alpha.SURCHARGE == 5


def test_from_import_in_an_unchanged_module_runs_the_new_code(deploy):
    start(deploy, "from_import")
    checkout, views_spec = m.views.checkout, m.views.__spec__

    report = deploy.push("from_import", "v2")

    assert report.changed == ["upapp.core"] and [r.module for r in report.modules] == ["upapp.core"]
    assert m.views.checkout is checkout and m.views.checkout(10) == 30
    # the unchanged module kept its spec: its path and the finder's loader serve every version
    assert m.views.__spec__ is views_spec and m.views.__loader__ is deploy.ov.finder.loader
    assert m.views.__loader__.get_source("upapp.views") == Path(m.views.__file__).read_text()


@pytest.mark.parametrize("when", ["before_install", "through_the_finder"])
def test_a_module_first_imported_from_disk_is_upgraded_against_the_source_it_ran(
        probe, tmp_path, trusted_keys_file, signing_key, when):
    disk = write_tree("from_disk", "v1", tmp_path / "disk")
    sys.path.insert(0, str(disk))
    if when == "before_install":
        importlib.import_module("upapp.core")
    ov = overlay.install(packages=[APP], trusted_keys=trusted_keys_file, store=tmp_path / "store")
    try:
        deploy = Deployment(ov, signing_key)
        core = importlib.import_module("upapp.core")
        assert core.__file__ == str(disk / "upapp" / "core.py")
        greet, calls = core.greet, core.CALLS
        greet("ann")
        # The developer edits the file on disk after it ran: the first push must diff against
        # what the process runs, not against this file, or the counter statement would run again.
        (disk / "upapp" / "core.py").write_text("EDITED_AFTER_IMPORT = True\n")

        report = deploy.push("from_disk", "v2")

        assert ov.finder.disk_sources["upapp.core"] == snippet_files("from_disk", "v1")["upapp.core"][1]
        assert report.added == ["upapp", "upapp.core"] and report.previous_version is None
        core_report = next(r for r in report.modules if r.module == "upapp.core")
        assert core_report.patched == ["greet"] and core_report.reran == ["def greet (line 7)"]
        assert probe.runs["upapp.core top level"] == 1  # the unchanged top level did not run again
        assert core.greet is greet and core.CALLS is calls and calls == ["ann"]
        assert greet("bob") == "hello bob from bundle v2" and calls == ["ann", "bob"]
        assert core.__file__ == str(deploy.ov.tree_root / "upapp" / "core.py")
        assert not hasattr(core, "EDITED_AFTER_IMPORT")
    finally:
        ov.uninstall()


def test_a_module_removed_from_the_bundle_is_no_longer_served_and_is_reported(deploy):
    start(deploy, "removed_module")
    upapp = sys.modules["upapp"]
    assert upapp.legacy.old() == "legacy v1"

    report = deploy.push("removed_module", "v2")

    assert report.removed == ["upapp.legacy"] and report.changed == []
    assert "upapp.legacy" not in sys.modules and not hasattr(upapp, "legacy")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("upapp.legacy")


def test_removing_a_module_others_still_import_is_refused_naming_them_and_nothing_runs(deploy, probe):
    start(deploy, "removed_in_use")
    before = snapshot(deploy.ov.finder)
    history = len(deploy.ov.history())

    with pytest.raises(BundleRejected) as info:
        deploy.push("removed_in_use", "v2")

    error = info.value
    assert error.code == "removed_module_in_use"
    assert "upapp.legacy" in error.message and "upapp.reports, upapp.views" in error.message
    assert error.details["importers"] == ["upapp.reports", "upapp.views"]
    assert probe.runs == {"upapp.views v1": 1}  # views v2 changed its counter line: it did not run
    assert_same(before, deploy.ov.finder)
    assert deploy.ov.version == 1 and deploy.staged() == [] and deploy.tree_shows() == 1
    last = deploy.ov.history()[-1]
    assert len(deploy.ov.history()) == history + 1
    assert (last["outcome"], last["code"], last["version"]) == ("failed", "removed_module_in_use", 2)


# --------------------------------------------------------------------------- failures undo


def test_an_exception_while_running_the_new_code_undoes_everything_by_identity(deploy):
    start(deploy, "import_error")
    upapp, core, views = sys.modules["upapp"], m.core, m.views
    greeter = core.Greeter()
    assert core.square(4) == 16  # something in the lru_cache
    before = snapshot(deploy.ov.finder)
    store = deploy.ov.store
    active, highest = store.active, store.highest

    with pytest.raises(ActivationFailed) as info:
        deploy.push("import_error", "v2")

    error = info.value
    assert error.code == "activation_failed" and "RuntimeError: views v2 cannot start" in error.message
    assert "still serving" in error.message and "version 1" in error.message
    assert 'raise RuntimeError("views v2 cannot start' in error.remote_traceback
    assert "views.py" in error.remote_traceback
    assert "overlay/upgrade.py" not in error.remote_traceback  # the app's frames, not habanero's
    # core ran first and succeeded (it imported the new module upapp.extra): all of it is undone
    assert_same(before, deploy.ov.finder)
    assert "upapp.extra" not in sys.modules and not hasattr(upapp, "extra")
    assert greeter.hello("ann") == "hello ann (v1)" and not hasattr(greeter, "wave")
    assert core.greet("ann") == "hello ann (v1)" and views.page("ann") == "hello ann (v1)"
    assert core.__file__ == before.namespaces["upapp.core"]["__file__"]
    assert store.active is active and store.highest == highest == 1 and deploy.ov.version == 1
    assert deploy.staged() == [] and deploy.tree_shows() == 1 and deploy.bundles() == [1]
    last = deploy.ov.history()[-1]
    assert (last["action"], last["outcome"], last["version"], last["code"]) == (
        "push", "failed", 2, "activation_failed")
    # nothing of the failed push is in the way of the next one, not even its version number
    fixed = deploy.ov.apply(deploy.bundle("import_error", "v1", number=2))
    assert fixed.version == 2 and deploy.ov.version == 2 and core.greet("ann") == "hello ann (v1)"


def test_a_syntax_error_refuses_the_bundle_before_anything_runs_or_is_staged(deploy, probe):
    start(deploy, "syntax_error")
    before = snapshot(deploy.ov.finder)

    with pytest.raises(CompileFailed) as info:
        deploy.push("syntax_error", "v2")

    error = info.value
    assert error.code == "syntax_error" and "nothing ran" in error.message
    assert error.details["module"] == "upapp.zebra" and error.details["line"] == 5
    assert error.details["file"] == str(deploy.ov.tree_root / "upapp" / "zebra.py")
    assert error.details["text"] == "def broken(:"
    assert "upapp.zebra does not compile: invalid syntax" in error.message and "line 5" in error.message
    assert probe.runs == {"upapp.counter v1": 1}  # counter (sorted before zebra) did not run
    assert_same(before, deploy.ov.finder)
    assert deploy.staged() == [] and deploy.tree_shows() == 1 and deploy.bundles() == [1]
    assert deploy.ov.store.highest == 1 and deploy.ov.version == 1
    last = deploy.ov.history()[-1]
    assert (last["outcome"], last["code"], last["version"]) == ("failed", "syntax_error", 2)


def test_a_migration_hook_carries_state_across_versions(deploy):
    start(deploy, "migration")
    m.sessions.SESSIONS["bob"] = "2024-06-01"  # state made at run time, after the import

    report = deploy.push("migration", "v2")

    assert m.sessions.SESSIONS == {"ann": {"since": "2024-01-01"}, "bob": {"since": "2024-06-01"}}
    assert m.sessions.since("bob") == "2024-06-01"
    assert "ran __habanero_migrate__ with the previous namespace" in report.modules[0].notes


def test_a_migration_hook_that_raises_undoes_the_push(deploy):
    start(deploy, "migration_fails")
    sessions = m.sessions.SESSIONS
    sessions["bob"] = "2024-06-01"
    before = snapshot(deploy.ov.finder)

    with pytest.raises(ActivationFailed) as info:
        deploy.push("migration_fails", "v2")

    assert "LookupError: cannot migrate the sessions of v1" in info.value.message
    assert "__habanero_migrate__" in info.value.remote_traceback
    assert_same(before, deploy.ov.finder)
    assert m.sessions.SESSIONS is sessions and sessions == {"ann": "2024-01-01", "bob": "2024-06-01"}
    assert m.sessions.since("bob") == "2024-06-01" and deploy.ov.version == 1


# ------------------------------------------------------------------------------- rollback


def test_rollback_to_a_named_version_skips_the_ones_between(deploy):
    start(deploy, "function_body")
    greet = m.core.greet
    deploy.push("function_body", "v2")
    deploy.push("function_body", "v3")
    assert greet("ann") == "hello ann from v3"

    report = deploy.ov.rollback(to=1)

    assert (report.action, report.version, report.previous_version) == ("rollback", 1, 3)
    assert greet("ann") == "hello ann from v1" and m.core.greet is greet
    assert deploy.ov.version == 1 and deploy.ov.store.active.version == 1
    assert deploy.ov.store.highest == 3  # a rollback never lowers the mark: v2, v3 are not replayable
    last = deploy.ov.history()[-1]
    assert (last["action"], last["outcome"], last["version"]) == ("rollback", "ok", 1)


def test_rollback_with_a_wrong_expected_version_is_refused_and_changes_nothing(deploy):
    start(deploy, "function_body")
    deploy.push("function_body", "v2")
    before = snapshot(deploy.ov.finder)

    with pytest.raises(ControlRejected) as info:
        deploy.ov.rollback(expect=1)

    assert info.value.code == "version_mismatch" and "expected version 1" in info.value.message
    assert_same(before, deploy.ov.finder)
    assert deploy.ov.version == 2 and m.core.greet("ann") == "hello ann from v2"
    assert deploy.ov.rollback(expect=2).version == 1


def test_rollback_without_an_earlier_version_is_refused(deploy):
    start(deploy, "function_body")
    with pytest.raises(ControlRejected) as info:
        deploy.ov.rollback()
    assert info.value.code == "nothing_to_roll_back" and deploy.ov.version == 1


# --------------------------------------------------------------------------------- report


def test_the_report_says_what_ran_what_was_patched_what_was_replaced_and_how_long_each_phase_took(deploy):
    start(deploy, "report")

    report = deploy.push("report", "v2")

    assert (report.version, report.previous_version, report.changed) == (2, 1, ["upapp.core"])
    assert report.digest == deploy.ov.store.active.digest
    (core,) = report.modules
    assert core.module == "upapp.core"
    assert core.reran == ["LIMIT = ... (line 1)", "def greet (line 4)", "class Greeter (line 8)",
                          "class Pair (line 13)"]
    assert sorted(core.patched) == ["Greeter", "Greeter.hello", "greet"]
    assert [name for name, _ in core.replaced] == ["Pair"]
    assert "`__slots__` changed from ('a',) to ('a', 'b')" in core.replaced[0][1]
    assert "instances created before version 2 keep the old class" in core.replaced[0][1]
    assert report.patched == 3 and report.replaced == 1
    # drain: the request gate emptied; prepare: the other processes verifying and planning it (none here)
    assert set(report.timings_ms) == {"verify", "plan", "stage", "drain", "prepare", "apply", "commit", "total"}
    assert all(t >= 0 for t in report.timings_ms.values())
    phases = sum(v for k, v in report.timings_ms.items() if k != "total")
    assert phases <= report.timings_ms["total"] + 0.01
    assert report.to_dict()["modules"][0]["patched"] == core.patched


def test_a_packed_delta_bundle_applies_like_a_full_one_and_is_stored_unpacked(deploy):
    start(deploy, "new_module")
    total = m.core.total
    full = deploy.bundle("new_module", "v2")
    delta = deploy.bundle("new_module", "v2", delta=True)
    assert _HEADER.unpack_from(delta)[2] == FLAG_PACKED and len(delta) < len(full)

    report = deploy.ov.apply(delta)

    assert report.version == 2 and report.added == ["upapp.tax"] and report.changed == ["upapp.core"]
    assert m.core.total is total and total([1, 2]) == 4.5
    stored = deploy.ov.store.active
    on_disk = (deploy.store_path / "bundles" / f"{2:010d}-{stored.digest}.hbn").read_bytes()
    assert _HEADER.unpack_from(on_disk)[2] == 0  # the store keeps the plain signed form
    assert bundle_digest(on_disk) == stored.digest and len(on_disk) == stored.size
    assert deploy.ov.rollback().version == 1 and total([1, 2]) == 3


def test_a_running_version_keeps_no_source_in_memory_yet_serves_it_and_takes_the_next_delta(deploy):
    start(deploy, "new_module")
    active = deploy.ov.store.active
    assert all(active.bodies.held(name) is None for name in active.entries)  # read back from the store
    assert "def total" in inspect.getsource(m.core)
    total = m.core.total

    report = deploy.ov.apply(deploy.bundle("new_module", "v2", delta=True))

    assert report.changed == ["upapp.core"] and total([1, 2]) == 4.5
    assert "def total" in inspect.getsource(m.core) and "tax" in inspect.getsource(m.core)
    assert deploy.ov.rollback().version == 1 and total([1, 2]) == 3


# ------------------------------------------------------------------------------- planning


NESTED_IMPORTS = b'''
import upapp.a
if FLAG:
    from upapp import b
else:
    from .c import thing
try:
    import upapp.d as d
except ImportError:
    from . import e
finally:
    import upapp.p
with open(__file__):
    from upapp.f import g
for _ in range(1):
    import upapp.h
while False:
    import upapp.i


class K:
    from upapp import j

    def method(self):
        import upapp.k


def lazy():
    def inner():
        from ..sibling import m
    from upapp import n


match FLAG:
    case 1:
        import upapp.o
'''


def test_the_planner_sees_imports_at_any_depth_for_ordering_and_removal_checks():
    found = imported_names("upapp.sub.mod", False, NESTED_IMPORTS)

    wanted = {"upapp.a", "upapp.b", "upapp.sub.c", "upapp.d", "upapp.sub.e", "upapp.f", "upapp.h",
              "upapp.i", "upapp.j", "upapp.k", "upapp.sibling", "upapp.n", "upapp.o", "upapp.p"}
    assert wanted <= found
    assert "upapp.sibling.m" in found and "upapp.sub.c.thing" in found


def test_a_replayed_old_bundle_is_refused_every_time_and_recorded_once(deploy):
    first = deploy.bundle("hooks", "v1", number=1)
    deploy.ov.apply(first)
    deploy.push("hooks", "v2")
    history = len(deploy.ov.history())

    for _ in range(5):
        with pytest.raises(StaleVersion):
            deploy.ov.apply(first)

    records = deploy.ov.history()[history:]
    assert [(r["code"], r["version"], r["digest"]) for r in records] == [
        ("stale_version", 1, bundle_digest(first))]
    assert records[0]["key_ids"] == [deploy.key.public.key_id]
