"""The hook API (``overlay.integrations``): hooks run inside the push's transaction, told what changed.

A hook's changes made through ``Push`` are undone with the rest of a failed push; what it reports
with ``not_live`` reaches the push report. Driven through ``Overlay.apply`` on a real store.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from support.upgrade import live_hooks as live_hooks_of
from support.upgrade import m, start

from overlay.errors import ActivationFailed
from overlay.integrations import Push, register, registered, unregister


@pytest.fixture
def hooks() -> Iterator[list[str]]:
    """The names registered by the test, unregistered afterwards (the registry is per process)."""
    names: list[str] = []
    yield names
    for name in names:
        unregister(name)


def _add(hooks: list[str], name: str, **kw: Any) -> None:
    register(name, **kw)
    hooks.append(name)


def test_hooks_are_told_what_changed_before_and_after_the_changed_modules_run(deploy, hooks):
    start(deploy, "hooks")
    seen: list[tuple[str, Any]] = []

    def before(push: Push) -> None:
        seen.append(("before", (m.probe.runs["upapp v2"], sys.modules["upapp"].answer())))

    def after(push: Push) -> None:
        seen.append(("after", (m.probe.runs["upapp v2"], sys.modules["upapp"].answer())))
        seen.append(("push", (push.action, push.version, push.previous_version, push.changed, push.files,
                              push.reran, push.touches("upapp/templates/"), push.touches("other"),
                              [r.module for r in push.modules])))

    _add(hooks, "probe", before=before, after=after)
    deploy.push("hooks", "v2")

    assert seen == [
        ("before", (0, 1)),  # the new files are in place, no changed statement ran yet
        ("after", (1, 2)),
        ("push", ("push", 2, 1, ("upapp",), ("upapp/templates/page.txt",), ("upapp",), True, False, ["upapp"])),
    ]


def test_a_hook_that_raises_fails_the_push_and_its_changes_are_undone_with_the_rest(deploy, hooks):
    start(deploy, "hooks")
    table = {"routes": ["/"]}
    marker = types.SimpleNamespace(version="v1")

    def rebuild(push: Push) -> None:
        push.setitem(table, "routes", ["/", "/new"])
        push.setattr(marker, "version", "v2")

    def broken(push: Push) -> None:
        raise LookupError("no such blueprint")

    _add(hooks, "rebuild", after=rebuild)
    _add(hooks, "broken", after=broken)
    with pytest.raises(ActivationFailed) as failed:
        deploy.push("hooks", "v2")

    assert "the 'broken' hook (after the push) raised LookupError: no such blueprint" in str(failed.value)
    assert "still serving" in str(failed.value)
    assert table == {"routes": ["/"]} and marker.version == "v1"
    assert sys.modules["upapp"].answer() == 1 and deploy.ov.version == 1


def test_what_a_hook_could_not_make_live_is_in_the_push_report_with_its_fix(deploy, hooks):
    start(deploy, "hooks")

    def settings(push: Push) -> None:
        push.not_live("upapp: DEBUG changed", "restart the app")
        push.not_live("upapp: DEBUG changed", "restart the app")  # said once

    _add(hooks, "settings", after=settings)
    report = deploy.push("hooks", "v2")

    assert report.not_live == [{"source": "settings", "what": "upapp: DEBUG changed", "fix": "restart the app"}]
    assert report.to_dict()["not_live"] == report.not_live


def test_a_hook_waits_for_its_module_to_be_imported(deploy, hooks):
    start(deploy, "hooks")
    calls: list[int] = []
    _add(hooks, "absent", after=lambda push: calls.append(push.version), when="no_such_framework_module")
    _add(hooks, "present", after=lambda push: calls.append(-push.version), when="upapp")

    deploy.push("hooks", "v2")

    assert calls == [-2]


def test_registering_again_replaces_the_hook_and_moves_it_last(hooks):
    _add(hooks, "a", after=print)
    _add(hooks, "b", after=print)
    _add(hooks, "a", before=print)

    assert [n for n in registered() if n in ("a", "b")] == ["b", "a"]


@pytest.mark.parametrize("kw, message", [
    ({}, "give a before= or an after= hook"),
    ({"after": "not callable"}, "is not callable"),
])
def test_a_hook_without_a_callable_is_refused_at_registration(kw, message):
    with pytest.raises(TypeError, match=message):
        register("bad", **kw)


def test_an_integration_loaded_by_a_push_that_fails_is_unloaded_with_it_and_loads_again_later(
        deploy, tmp_path, monkeypatch):
    live_hooks = live_hooks_of(deploy.ov)
    (tmp_path / "fakeframework.py").write_text("ROUTES = []\n")
    (tmp_path / "fakeframework_integration.py").write_text(
        "import fakeframework, upgrade_probe\n"
        "from overlay.integrations.hooks import register\n"
        "upgrade_probe.ran('integration loaded')\n"
        "register('fakeframework', after=lambda push: fakeframework.ROUTES.append(push.version))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(live_hooks.BUILTIN, "fakeframework", ("fakeframework", "fakeframework_integration"))
    start(deploy, "hooks_load")

    with pytest.raises(ActivationFailed):
        deploy.push("hooks_load", "v2")

    assert m.probe.runs["integration loaded"] == 1  # during the failed push: the case at hand
    assert "fakeframework" not in sys.modules and "fakeframework_integration" not in sys.modules
    assert "fakeframework" not in live_hooks.registered() and "fakeframework" not in live_hooks._LOADED

    try:
        report = deploy.push("hooks_load", "v3")
        assert sys.modules["fakeframework"].ROUTES == [report.version]  # the hook of the live framework ran
        assert m.probe.runs["integration loaded"] == 2
    finally:
        live_hooks.unregister("fakeframework")
        live_hooks._LOADED.discard("fakeframework")
