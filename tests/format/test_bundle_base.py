"""Opening a push against the active bundle (``base``): the same bundle, less work, no less checking."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.bundles import (
    FILES,
    PUSHES,
    delta_push,
    held,
    rows_of,
    same,
    sha256_of,
    signed_bundle,
    wrap,
)

from overlay.format import manifest as _manifest
from overlay import bundle as bundle_module
from overlay.format.delta import pack
from overlay.format.manifest import parse_manifest
from overlay.bundle import Bundle, ParentManifest, build_bundle, open_bundle
from overlay.errors import BadManifest, BundleRejected

# ----------------------------------------------------------------------------- the same bundle


@pytest.mark.parametrize("push", PUSHES, ids=list(PUSHES))
def test_a_delta_opened_against_base_is_the_one_opened_from_the_store(push, base, signing_key, trusted):
    data = delta_push(PUSHES[push], base, signing_key)
    fast = open_bundle(data, trusted, content=held(base), base=base)
    same(fast, open_bundle(data, trusted, content=held(base)))
    assert {n: fast.read(n) for n in fast.entries} == {n: c for n, (_, c) in PUSHES[push].items()}


@pytest.mark.parametrize("push", PUSHES, ids=list(PUSHES))
def test_a_packed_push_opened_against_base_is_the_same_bundle(push, base, signing_key, trusted):
    canonical = delta_push(PUSHES[push], base, signing_key)
    wire = pack(canonical, ParentManifest.from_manifest(base.manifest_bytes), [signing_key])
    lookup = {base.digest: base.manifest_bytes}.get
    fast = open_bundle(wire, trusted, content=held(base), base_manifest=lookup, base=base)
    same(fast, open_bundle(canonical, trusted, content=held(base)))


@pytest.mark.parametrize("push", PUSHES, ids=list(PUSHES))
def test_a_full_push_opened_against_base_is_the_same_bundle(push, base, signing_key, trusted):
    data = build_bundle(PUSHES[push], app_id="app", version=2, signers=[signing_key])
    same(open_bundle(data, trusted, base=base), open_bundle(data, trusted))


def test_a_delta_needs_no_store_for_what_base_holds(base, signing_key, trusted):
    data = delta_push(PUSHES["a file renamed"], base, signing_key)
    opened = open_bundle(data, trusted, content={}.get, base=base)  # the renamed body: from base, by hash
    assert opened.read("app.sub.d") == FILES["app.sub.c"][1]


def test_bundle_hashes_and_by_hash_describe_its_entries(base):
    assert base.hashes == {name: entry.sha256 for name, entry in base.entries.items()}
    twin_hash = base.hashes["app.b"]
    assert base.hashes["app.copy"] == twin_hash and base.by_hash[twin_hash].name == "app.b"  # the first
    assert {sha: e.name for sha, e in base.by_hash.items()} == {e.sha256: e.name for e in reversed(base.entries.values())}
    assert base.hashes is base.hashes  # computed once


# ------------------------------------------------------------------------ less work, measured


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names whose bodies ``open_bundle`` hashes, in order."""
    names: list[str] = []
    check = bundle_module._check_hashes

    def spy(entries, bodies):
        entries = list(entries)
        names.extend(e.name for e in entries)
        return check(entries, bodies)

    monkeypatch.setattr(bundle_module, "_check_hashes", spy)
    return names


def test_against_base_only_the_carried_body_of_a_delta_is_hashed(base, signing_key, trusted, hashed):
    data = delta_push(PUSHES["one line"], base, signing_key)
    open_bundle(data, trusted, content=held(base))
    assert sorted(hashed) == sorted(PUSHES["one line"])  # without base: every body
    hashed.clear()
    open_bundle(data, trusted, content=held(base), base=base)
    assert hashed == ["app.a"]


def test_against_base_a_full_push_hashes_only_the_bodies_that_differ(base, signing_key, trusted, hashed):
    data = build_bundle(PUSHES["a file added"], app_id="app", version=2, signers=[signing_key])
    open_bundle(data, trusted, base=base)
    assert hashed == ["app.new"]


def test_a_body_from_the_store_is_hashed_even_against_base(base, signing_key, trusted, hashed):
    new = b"NEW = 1\n"
    claims = ParentManifest(base.digest, base.manifest_bytes, frozenset(base.hashes.values()) | {sha256_of(new)})
    data = build_bundle({**FILES, "app.new": ("module", new)}, app_id="app", version=2, signers=[signing_key],
                        base=claims)  # the builder believes the server holds app.new's body
    open_bundle(data, trusted, content=held(base, **{sha256_of(new): new}), base=base)
    assert hashed == ["app.new"]


def test_against_base_entries_it_holds_skip_the_name_checks(base, signing_key, trusted, monkeypatch):
    added, one_line = (delta_push(PUSHES[p], base, signing_key) for p in ("a file added", "one line"))
    checked: list[str] = []
    check = _manifest.check_name
    monkeypatch.setattr(_manifest, "check_name", lambda name, kind: checked.append(name) or check(name, kind))
    open_bundle(added, trusted, content=held(base), base=base)
    assert checked == ["app.new"]
    checked.clear()
    open_bundle(one_line, trusted, content=held(base), base=base)
    assert checked == []  # the same names and kinds as base: only the changed hash is checked
    open_bundle(one_line, trusted, content=held(base))
    assert sorted(checked) == sorted(PUSHES["one line"])  # without base: every name


def test_a_well_formed_manifest_never_needs_the_entry_by_entry_check(base, signing_key, trusted, monkeypatch):
    def slow(*args, **kw):
        raise AssertionError("the column-wise check should have vouched for this manifest")

    monkeypatch.setattr(_manifest, "_check_entries", slow)
    for push in PUSHES.values():
        data = delta_push(push, base, signing_key)
        open_bundle(data, trusted, content=held(base), base=base)
        open_bundle(data, trusted, content=held(base))


# ------------------------------------------------------------------------- no less checking


def _refused(code: str, data: bytes, trusted, **kw) -> BundleRejected:
    with pytest.raises(BundleRejected) as info:
        open_bundle(data, trusted, **kw)
    assert info.value.code == code, info.value.message
    return info.value


@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "base"])
def test_a_wrong_body_from_the_store_is_refused_against_base(with_base, base, signing_key, trusted):
    new = b"NEW = 1\n"
    claims = ParentManifest(base.digest, base.manifest_bytes, frozenset(base.hashes.values()) | {sha256_of(new)})
    data = build_bundle({**FILES, "app.new": ("module", new)}, app_id="app", version=2, signers=[signing_key],
                        base=claims)
    kw = {"base": base} if with_base else {}
    for lie in (b"NEW = 2\n", new + b"# and more\n", new[:-1]):  # base does not hold this hash
        err = _refused("entry_hash_mismatch", data, trusted, content=held(base, **{sha256_of(new): lie}), **kw)
        assert err.details["name"] == "app.new"


def test_a_full_payload_that_differs_from_base_under_its_hashes_is_refused(base, signing_key, trusted):
    rows = [(n, k, b"X" * len(b) if n == "app.b" else b) for n, k, b in rows_of(FILES)]
    data = signed_bundle(signing_key, rows, parent=None, **{"app.b": {"sha256": base.hashes["app.b"]}})
    _refused("entry_hash_mismatch", data, trusted, base=base)


def test_a_delta_claiming_base_holds_a_body_of_another_size_is_refused(base, signing_key, trusted):
    rows = [(n, k, b + b"!" if n == "app.b" else b) for n, k, b in rows_of(PUSHES["one line"])]
    lie = {"app.b": {"sha256": base.hashes["app.b"]}}  # base's hash, one byte more: no such body
    data = signed_bundle(signing_key, rows, parent=base.digest, included=["app.a"], **lie)
    err = _refused("entry_hash_mismatch", data, trusted, content=held(base), base=base)
    assert err.details["name"] == "app.b"


ONE_LINE_SIZE = len(PUSHES["one line"]["app.a"][1])
CHANGED_BADLY = {  # how the entry table changes, what the delta carries, fields to override, the refusal
    "a bad name": (lambda rows: sorted(rows + [("app.class", "module", b"X = 1\n")]), ["app.a", "app.class"], {},
                   "bad_entry_name"),
    "an upper-case hash": (lambda rows: rows, ["app.a"], {"app.a": {"sha256": "A" * 64}}, "bad_manifest"),
    "a hash of another length": (lambda rows: rows, ["app.a"], {"app.a": {"sha256": "a" * 63}}, "bad_manifest"),
    "a size that is not an integer": (lambda rows: rows, ["app.a"], {"app.a": {"size": float(ONE_LINE_SIZE)}},
                                      "bad_manifest"),
    "an offset (a format 1 field)": (lambda rows: rows, ["app"], {"app": {"offset": 0}}, "bad_manifest"),
    "an entry out of order": (lambda rows: [rows[2], rows[1], rows[0], *rows[3:]], ["app.a"], {}, "bad_entry_name"),
    "a package removed, its module kept": (lambda rows: [r for r in rows if r[0] != "app.sub"], ["app.a"], {},
                                           "bad_entry_name"),
    "a package that became a module": (lambda rows: [(n, "module" if n == "app.sub" else k, b) for n, k, b in rows],
                                       ["app.a"], {}, "bad_entry_name"),
    "a data file shadowing a module": (lambda rows: sorted(rows + [("app/b.py", "data", b"x")]),
                                       ["app.a", "app/b.py"], {}, "bad_entry_name"),
    "a module __init__ beside its package (one file)": (
        lambda rows: sorted(rows + [("app.sub.__init__", "module", b"x = 1\n")]), ["app.a", "app.sub.__init__"],
        {}, "bad_entry_name"),
    "a .py data file importable through a plain directory": (
        lambda rows: sorted(rows + [("app/tools/run.py", "data", b"import os\n")]), ["app.a", "app/tools/run.py"],
        {}, "bad_entry_name"),
}


@pytest.mark.parametrize("case", CHANGED_BADLY, ids=list(CHANGED_BADLY))
@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "base"])
def test_a_badly_changed_entry_is_refused_against_base_too(case, with_base, base, signing_key, trusted):
    reshape, included, over, code = CHANGED_BADLY[case]
    rows = reshape(rows_of(PUSHES["one line"]))
    kw = {"base": base} if with_base else {}
    delta = signed_bundle(signing_key, rows, parent=base.digest, included=included, **over)
    _refused(code, delta, trusted, content=held(base), **kw)
    _refused(code, signed_bundle(signing_key, rows, parent=None, **over), trusted, **kw)


# ------------------------------------------------------------------------------- duplicate keys


def _manifest_text(base: Bundle) -> str:
    """A valid manifest for a one-line push, as text to edit."""
    manifest = dict(json.loads(base.manifest_bytes), version=2, builder={"user": "ci", "note": "a: b"})
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


DUPLICATED = {
    "top": ('{"app_id":', '{"version":2,"app_id":'),
    "payload": ('"payload":{', '"payload":{"size":1,'),
    "builder": ('"builder":{', '"builder":{"user":"root",'),
    "inside the builder": ('"builder":{', '"builder":{"deep":{"k":1,"k":1},'),
    "first entry, same value": ('{"kind":"package",', '{"kind":"package","kind":"package",'),
    "last entry": ('"name":"app/data/x.txt"', '"name":"app/data/x.txt","name":"app/data/x.txt"'),
    "an entry, value with a colon": ('"name":"app.b"', '"name":"a:b","name":"app.b"'),
    "escaped key": ('{"app_id":', '{"\\u0076ersion":2,"app_id":'),
}


@pytest.mark.parametrize("where", DUPLICATED, ids=list(DUPLICATED))
@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "base"])
def test_a_duplicated_key_is_refused_at_every_level(where, with_base, base, signing_key, trusted):
    old, new = DUPLICATED[where]
    text = _manifest_text(base)
    assert text.count(old) >= 1
    data = wrap(text.replace(old, new, 1).encode(), signing_key, base.raw[-base.manifest["payload"]["size"]:])
    err = _refused("bad_manifest", data, trusted, **({"base": base} if with_base else {}))
    assert "repeats the key" in err.message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant, base, signing_key, trusted):
    text = _manifest_text(base).replace('"builder":{', f'"builder":{{"x":{constant},', 1)
    data = wrap(text.encode(), signing_key, base.raw[-base.manifest["payload"]["size"]:])
    err = _refused("bad_manifest", data, trusted, base=base)
    assert constant.lstrip("-") in err.message


# Hypothesis: any JSON object, written with or without whitespace and escapes, some keys repeated.
_KEYS = st.sampled_from(["a", "b", "a:b", ":", "é", 'q"', "\\", "entries"])
_SCALARS = st.one_of(st.integers(-5, 5), st.booleans(), st.none(), st.sampled_from(["", ":", "x:y", "a", "\\:", "é"]))


class _Pairs(list):
    """A JSON object as written: its key/value pairs in order, repeats and all."""


def _objects(children):
    return st.lists(st.tuples(_KEYS, children), max_size=4).map(_Pairs)


_VALUES = st.recursive(_SCALARS, lambda children: st.one_of(st.lists(children, max_size=3), _objects(children)),
                       max_leaves=12)


def _write(value, draw) -> str:
    space = draw(st.sampled_from(["", " ", "\n"]))
    if isinstance(value, _Pairs):
        return "{" + ",".join(f"{_write(k, draw)}{space}:{space}{_write(v, draw)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(_write(v, draw) for v in value) + "]"
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.replace(":", "\\u003a") if isinstance(value, str) and draw(st.booleans()) else text


def _repeats(value) -> bool:
    if isinstance(value, _Pairs):
        keys = [k for k, _ in value]
        return len(set(keys)) < len(keys) or any(_repeats(v) for _, v in value)
    return isinstance(value, list) and any(_repeats(v) for v in value)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(top=_objects(_VALUES), data=st.data())
def test_parsing_refuses_a_manifest_exactly_when_a_key_repeats(top, data):
    text = _write(top, data.draw)
    if _repeats(top):
        with pytest.raises(BadManifest, match="repeats the key"):
            parse_manifest(text.encode())
    else:
        assert parse_manifest(text.encode()) == json.loads(text)


def test_a_full_payload_equal_to_base_but_claiming_another_hash_is_refused(base, signing_key, trusted):
    # The bytes are base's, known good for base's hash: that proves nothing about another hash.
    lie = sha256_of(b"something else")
    data = signed_bundle(signing_key, rows_of(FILES), parent=None, **{"app.b": {"sha256": lie}})
    for kw in ({}, {"base": base}):
        err = _refused("entry_hash_mismatch", data, trusted, **kw)
        assert err.details["name"] == "app.b"
