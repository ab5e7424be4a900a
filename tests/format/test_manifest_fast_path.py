"""The entry table's column-wise check (the fast path) agrees with the entry-by-entry one (its
reference) on every manifest: the same table when both accept, never an acceptance the reference
refuses."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.errors import HabaneroError
from overlay.format import manifest as _manifest
from overlay.format.limits import DEFAULT_LIMITS, Limits
from overlay.format.manifest import EntryTable

LIMITS = Limits(max_entry_bytes=1000)


def _entry(name: str, kind: str, size: int) -> dict[str, Any]:
    return {"name": name, "kind": kind, "size": size, "sha256": hashlib.sha256(name.encode()).hexdigest()}


@st.composite
def valid_entries(draw: st.DrawFn) -> list[dict[str, Any]]:
    modules = draw(st.sets(st.sampled_from(["a", "b", "c", "core", "views", "z9"]), max_size=5))
    data = draw(st.sets(st.sampled_from(["t/x.html", "y.json", "static/app.css"]), max_size=3))
    rows = [("app", "package")] + [(f"app.{m}", "module") for m in modules] + [(f"app/{d}", "data") for d in data]
    return [_entry(n, k, draw(st.integers(0, 1000))) for n, k in sorted(rows)]


def _set(field: str, value: Any):
    return lambda entries, i: entries[i].__setitem__(field, value)


MUTATIONS = {
    "negative size": _set("size", -1),
    "float size": _set("size", 1.0),
    "bool size": _set("size", True),
    "string size": _set("size", "3"),
    "size over the limit": _set("size", 1001),
    "uppercase hash": lambda e, i: e[i].__setitem__("sha256", e[i]["sha256"].upper()),
    "short hash": lambda e, i: e[i].__setitem__("sha256", e[i]["sha256"][:-1]),
    "hash not a string": _set("sha256", 7),
    "bad name": _set("name", "app..x"),
    "name not a string": _set("name", ["app"]),
    "unknown kind": _set("kind", "script"),
    "module outside a package": _set("name", "zzz.m"),
    "missing field": lambda e, i: e[i].pop("sha256"),
    "extra field": _set("mode", 420),
    "not an object": lambda e, i: e.__setitem__(i, list(e[i].values())),
    "duplicate": lambda e, i: e.insert(i, copy.deepcopy(e[i])),
    "out of order": lambda e, i: e.insert(0, e.pop(i)) if i else e.append(e.pop(0)),
    "file where a directory is": lambda e, i: e.append(_entry("app/t", "data", 0)),
}


def _mutate(entries: list[Any], names: list[str], data: st.DataObject) -> None:
    for name in names:
        try:
            MUTATIONS[name](entries, data.draw(st.integers(0, len(entries) - 1)))
        except (TypeError, KeyError, AttributeError):  # an earlier mutation took what this one needs
            pass


def _outcome(check) -> tuple[str, Any]:
    try:
        result = check()
    except HabaneroError as exc:
        return "refused", exc.code
    return ("table", result) if result is not None else ("undecided", None)


def _compare(entries: list[Any], total: int, known: EntryTable | None = None) -> None:
    fast = _outcome(lambda: _manifest._fast_table(entries, total, LIMITS, known, False))
    slow = _outcome(lambda: EntryTable.of(_manifest._check_entries(entries, total, LIMITS)))
    if slow[0] == "table":
        assert fast[0] == "table", f"the fast path gave up on a valid table: {fast}"
        assert fast[1]._replace(changed=None) == slow[1]
    else:
        assert fast[0] != "table", f"the fast path accepted what the reference refuses ({slow[1]})"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(valid_entries(), st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2), st.data(),
       st.sampled_from([0, 0, 0, 1, -1]))
def test_the_fast_check_and_the_reference_agree(entries, mutations, data, total_error):
    _mutate(entries, mutations, data)
    sizes = [e.get("size") if isinstance(e, dict) else None for e in entries]
    total = sum(s for s in sizes if type(s) is int) + total_error
    _compare(entries, total)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(valid_entries(), st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=1), st.data())
def test_against_a_known_table_the_fast_check_still_agrees(entries, mutations, data):
    known = EntryTable.of(_manifest._check_entries(entries, sum(e["size"] for e in entries), LIMITS))
    pushed = copy.deepcopy(entries)
    i = data.draw(st.integers(0, len(pushed) - 1))
    pushed[i]["sha256"] = hashlib.sha256(b"changed").hexdigest()  # one changed body, as a push has
    _mutate(pushed, mutations, data)
    sizes = [e.get("size") if isinstance(e, dict) else None for e in pushed]
    _compare(pushed, sum(s for s in sizes if type(s) is int), known)


def test_the_mutations_do_reach_the_refusals():
    """Each mutation alone makes the reference refuse: the properties above test refusals too."""
    for name, mutate in MUTATIONS.items():
        entries = [_entry("app", "package", 1), _entry("app.a", "module", 2), _entry("app/t/x.html", "data", 3)]
        mutate(entries, 1)
        sizes = [e.get("size") if isinstance(e, dict) else None for e in entries]
        total = sum(s for s in sizes if type(s) is int)
        try:
            _manifest._check_entries(entries, total, LIMITS)
        except (HabaneroError, TypeError, KeyError):
            continue
        raise AssertionError(f"{name}: the reference accepted it")


def test_default_limits_are_what_manifests_are_checked_against():
    assert DEFAULT_LIMITS.max_entry_bytes > LIMITS.max_entry_bytes  # the tests' small limit is reachable
