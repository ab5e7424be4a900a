"""Imports follow their sources: a push equals a fresh start for ``from m import`` in unchanged modules."""

from __future__ import annotations

import sys

from overlay.bundle import Bundle

from support.upgrade import live_hooks, m, start


def test_star_and_named_imports_in_unchanged_modules_take_what_their_source_rebound(deploy, probe):
    start(deploy, "follow_imports")
    table = m.tables.TABLE
    assert m.extend.TABLE is table and table == ["a", "extended"] and probe.runs["extend"] == 1

    report = deploy.push("follow_imports", "v2")

    package = sys.modules["upapp"]
    # from .recipes import *: the new public name appears, the removed one disappears.
    assert package.multinomial is m.recipes.multinomial and package.multinomial(1, 2) == 3
    assert not hasattr(package, "old_recipe")
    # from .tables import TABLE / TABLE += [...]: the unchanged importers took the rebuilt list, and
    # the augmented assignment extended it again, as a fresh start of v2 would.
    assert m.tables.TABLE == ["a", "b", "extended"] and m.extend.TABLE is m.tables.TABLE
    assert package.TABLE is m.tables.TABLE
    assert probe.runs["extend"] == 1  # only the statements reading TABLE ran again, not the module
    followed = {r.module: r.followed for r in report.modules}
    assert followed["upapp.extend"] == ["from upapp.tables import TABLE (line 3) ran again: it reads "
                                        "upapp.tables:TABLE",
                                        "TABLE += ... (line 5) ran again: it reads TABLE"]
    assert "old_recipe" in {n for r in report.modules if r.module == "upapp" for n in r.removed}


def test_a_rollback_brings_the_followed_imports_back_to_the_old_version(deploy):
    start(deploy, "follow_imports")
    package = sys.modules["upapp"]
    deploy.push("follow_imports", "v2")

    deploy.ov.rollback(to=1)

    assert package.old_recipe() == "gone in v2" and not hasattr(package, "multinomial")
    assert m.extend.TABLE is m.tables.TABLE and m.tables.TABLE == ["a", "extended"]


def test_after_hooks_are_told_about_modules_that_ran_again_to_follow_an_import(deploy):
    hooks = live_hooks(deploy.ov)
    told: list[tuple[str, ...]] = []
    hooks.register("follow-probe", before=lambda push: told.append(push.reran),
                   after=lambda push: told.append(push.reran))
    try:
        start(deploy, "follow_imports")
        told.clear()
        deploy.push("follow_imports", "v2")
    finally:
        hooks.unregister("follow-probe")

    before, after = told
    assert "upapp.extend" not in before  # unchanged: only following makes it run again
    assert "upapp.extend" in after and set(before) <= set(after)


def test_a_relative_import_of_a_name_the_package_rebound_takes_the_new_value(deploy):
    start(deploy, "relfollow")
    views = sys.modules["upapp.views"]
    assert views.LIMIT == 1 and views.ABS_LIMIT == 1

    deploy.push("relfollow", "v2")

    assert views.ABS_LIMIT == 2  # from upapp import LIMIT as ABS_LIMIT
    assert views.LIMIT == 2  # from . import LIMIT: the same name, spelled without the module


def test_a_new_container_equal_to_the_old_one_reaches_the_modules_that_imported_it(deploy):
    start(deploy, "alias")
    tables, views = sys.modules["upapp.tables"], sys.modules["upapp.views"]
    assert tables.REGISTRY is views.REGISTRY

    deploy.push("alias", "v2")  # `REGISTRY = {}` became `REGISTRY: dict = {}`: a new, equal dict
    tables.register("x")

    assert views.REGISTRY is tables.REGISTRY and views.REGISTRY == {"x": 1}


def test_a_push_does_not_read_again_the_source_of_a_module_that_cannot_import_what_it_rebound(deploy, monkeypatch):
    start(deploy, "follow_imports")
    deploy.push("follow_imports", "v2")  # the first look at who imports what reads every live module
    read: list[str] = []
    original = Bundle.read

    def counting(self: Bundle, name: str) -> bytes:
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(Bundle, "read", counting)
    deploy.push("follow_imports", "v1")

    assert "upapp.bystander" not in read and "upapp.extend" in read  # an importer is still read
    package = sys.modules["upapp"]
    assert package.old_recipe() == "gone in v2" and not hasattr(package, "multinomial")
    assert m.extend.TABLE is m.tables.TABLE and m.tables.TABLE == ["a", "extended"]
