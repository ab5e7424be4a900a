"""Opening a delta push by proof: the same bundle as a full parse, and nothing the full check
would refuse gets in."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.bundles import FILES, PUSHES, delta_push, held, rows_of, same, signed_bundle, wrap

from overlay.format import proof as _proof
from overlay.bundle import build_bundle, manifest_bytes_of, open_bundle
from overlay.errors import BundleRejected

# Pushes the proof covers; the others are parsed in full: a removal, and a body base holds under
# another name (an emptied __init__.py), which the push does not carry, so its list cannot say.
PROVEN = {"one line", "a file added", "everything", "nothing"}


@pytest.fixture
def proofs(monkeypatch) -> list[bool]:
    """Whether each open proved its table (True) or fell back to the full parse (False)."""
    seen: list[bool] = []
    real = _proof.proven_table
    monkeypatch.setattr(_proof, "proven_table", lambda *a: seen.append((r := real(*a)) is not None) or r)
    return seen


@pytest.mark.parametrize("push", PUSHES, ids=list(PUSHES))
def test_a_proven_table_opens_the_same_bundle_as_the_full_parse(push, base, signing_key, trusted, proofs):
    data = delta_push(PUSHES[push], base, signing_key)
    fast = open_bundle(data, trusted, content=held(base), base=base)
    assert proofs == [push in PROVEN]
    same(fast, open_bundle(data, trusted, content=held(base)))
    assert fast.manifest == {k: v for k, v in json.loads(fast.manifest_bytes).items() if k != "entries"}


def test_push_after_push_keeps_proving(base, signing_key, trusted, proofs):
    active = base
    for version in range(2, 6):
        files = {**FILES, "app.a": ("module", f"A = {version}\n".encode())}
        data = build_bundle(files, app_id="app", version=version, signers=[signing_key],
                            base=_base_of(active))
        active = open_bundle(data, trusted, content=held(active), base=active)
        assert active.read("app.a") == f"A = {version}\n".encode()
    assert proofs == [True] * 4


def _base_of(bundle):
    from overlay.bundle import ParentManifest

    return ParentManifest.from_manifest(bundle.manifest_bytes)


def test_a_manifest_written_another_way_is_parsed_in_full_and_still_opens(base, signing_key, trusted, proofs):
    # Same content, not canonical (spaces after separators): the proof cannot vouch, the parse can.
    canonical = delta_push(PUSHES["one line"], base, signing_key)
    manifest = manifest_bytes_of(canonical)
    frame = canonical[-json.loads(manifest)["payload"]["size"]:]
    spaced = json.dumps(json.loads(manifest), sort_keys=True).encode()
    data = wrap(spaced, signing_key, frame)
    opened = open_bundle(data, trusted, content=held(base), base=base)
    assert proofs == [False] and opened.read("app.a") == PUSHES["one line"]["app.a"][1]


FORGERIES = {
    "offset of a carried entry": {"app.a": {"offset": 1}},
    "size of a carried entry": {"app.a": {"size": 1}},
    "bad hash of a carried entry": {"app.a": {"sha256": "AB" * 32}},
    "kind of a carried entry": {"app.a": {"kind": "widget"}},
    "an unchanged entry's hash": {"app.b": {"sha256": "ab" * 32}},
}


@pytest.mark.parametrize("forgery", FORGERIES, ids=list(FORGERIES))
def test_a_signed_but_inconsistent_manifest_is_refused_with_base_as_without(forgery, base, signing_key, trusted):
    rows = [(n, k, b) for n, (k, b) in sorted(PUSHES["one line"].items())]
    data = signed_bundle(signing_key, rows, parent=base.digest, included=["app.a"], **FORGERIES[forgery])
    with pytest.raises(BundleRejected) as without:
        open_bundle(data, trusted, content=held(base))
    with pytest.raises(BundleRejected) as with_base:
        open_bundle(data, trusted, content=held(base), base=base)
    assert (with_base.value.code, with_base.value.message) == (without.value.code, without.value.message)


names = st.sampled_from(sorted(n for n, (k, _) in FILES.items() if k == "module"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.dictionaries(names, st.binary(max_size=40), max_size=3),
       new=st.dictionaries(st.from_regex(r"app\.n[a-z]{1,4}", fullmatch=True), st.binary(max_size=20), max_size=2),
       drop=st.sets(names, max_size=1))
def test_any_edit_opens_the_same_with_base_and_without(edits, new, drop, base, signing_key, trusted):
    files = {**FILES, **{n: ("module", b) for n, b in edits.items()}, **{n: ("module", b) for n, b in new.items()}}
    files = {n: v for n, v in files.items() if n not in drop}
    data = delta_push(files, base, signing_key)
    same(open_bundle(data, trusted, content=held(base), base=base), open_bundle(data, trusted, content=held(base)))


@pytest.mark.parametrize("builder, proven", [
    ({"entries": [{"kind": "module", "name": "app.a", "offset": 0}], "format": 1}, True),
    ({"a": 1, "entries": [{"kind": "module", "name": "app.a", "offset": 0}], "format": 1}, False),
], ids=["lookalike first in the builder", "lookalike cut out first"])
def test_an_entry_list_lookalike_in_the_builder_cannot_mislead_the_proof(builder, proven, base, signing_key,
                                                                         trusted, proofs):
    # The builder is free-form JSON: here it holds an "entries" list of its own before the real one.
    data = delta_push(PUSHES["one line"], base, signing_key, builder=builder)
    opened = open_bundle(data, trusted, content=held(base), base=base)
    same(opened, open_bundle(data, trusted, content=held(base)))
    assert opened.manifest["builder"] == builder and proofs == [proven]


@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "base"])
def test_an_integer_too_long_to_read_is_a_bad_manifest_not_a_crash(with_base, base, signing_key, trusted):
    # Python refuses to read integers of 4,300+ digits (a ValueError, not a JSONDecodeError).
    text = json.dumps(dict(json.loads(base.manifest_bytes), version=2), sort_keys=True, separators=(",", ":"))
    text = text.replace('"builder":{', '"builder":{"n":' + "9" * 5000 + ",", 1)
    data = wrap(text.encode(), signing_key, base.raw[-base.manifest["payload"]["size"]:])
    with pytest.raises(BundleRejected) as info:
        open_bundle(data, trusted, **({"base": base} if with_base else {}))
    assert info.value.code == "bad_manifest" and "not valid JSON" in info.value.message


def test_a_change_to_most_files_is_parsed_in_full_not_proven(base, signing_key, trusted, proofs):
    many = {name: (kind, body + b"# v2\n") for name, (kind, body) in FILES.items()}
    wide = {**many, **{f"app.n{i:03d}": ("module", f"N = {i}\n".encode()) for i in range(70)}}
    data = delta_push(wide, base, signing_key)
    opened = open_bundle(data, trusted, content=held(base), base=base)
    assert proofs == [False], "over 64 carried entries and an eighth of the table: the linear full parse"
    same(opened, open_bundle(data, trusted, content=held(base)))


@pytest.mark.parametrize("files", [
    {"app.sub": ("package", b""), "app/sub": ("data", b"a file where a directory must be")},
    {"app/data": ("data", b"x"), "app/data/x.txt": ("data", b"y")},
    {"app/a.py/x": ("data", b"under a module's file")},
], ids=["data file named like a package directory", "data file and a directory", "under a module file"])
def test_a_file_where_another_entry_needs_a_directory_is_refused(files, base, signing_key, trusted):
    # build_bundle refuses to write these; a hand-signed delta carrying them is refused too.
    new = sorted(n for n in files if n not in FILES)
    data = signed_bundle(signing_key, rows_of({**FILES, **files}), parent=base.digest, included=new)
    for kw in ({}, {"base": base}):
        with pytest.raises(BundleRejected) as info:
            open_bundle(data, trusted, content=held(base), **kw)
        assert info.value.code == "bad_entry_name" and "need a directory" in info.value.message


def test_a_proven_bundle_knows_where_its_entries_are_as_a_full_parse_finds_them(base, signing_key, trusted, proofs):
    active = base
    for files in (PUSHES["one line"], PUSHES["a file added"], {**PUSHES["a file added"], "app.aa": ("module", b"AA = 1\n")}):
        data = build_bundle(files, app_id="app", version=active.version + 1, signers=[signing_key],
                            base=_base_of(active))
        fresh = open_bundle(data, trusted, content=held(active))
        active = open_bundle(data, trusted, content=held(active), base=active)
        assert active._spans == fresh.spans is not None  # set by the proof, not worked out afterwards
    assert proofs == [True] * 3


def test_a_base_written_another_way_is_not_proven_against(base, signing_key, trusted, proofs):
    # The proof compares runs of base's own manifest bytes: only a base whose manifest is the
    # canonical text of its entries may lend them.
    manifest = json.loads(base.manifest_bytes)
    spaced = json.dumps(manifest, sort_keys=True).encode()
    odd = open_bundle(wrap(spaced, signing_key, base.raw[-manifest["payload"]["size"]:]), trusted)
    assert odd.spans is None
    data = delta_push(PUSHES["one line"], odd, signing_key)
    opened = open_bundle(data, trusted, content=held(odd), base=odd)
    assert proofs == [False]
    same(opened, open_bundle(data, trusted, content=held(odd)))


def test_a_push_whose_top_level_changes_length_keeps_its_own_entry_spans(base, signing_key, trusted, proofs):
    # Builder fields come and go between pushes (a user name, git_dirty): the first entry then
    # starts elsewhere in each manifest, and each bundle's spans must be its own, not its base's.
    active = base
    for version, builder in enumerate([{"git_dirty": True}, {"user": "someone-with-a-long-name"}, {}], start=2):
        files = {**FILES, "app.a": ("module", f"A = {version}\n".encode())}
        data = build_bundle(files, app_id="app", version=version, signers=[signing_key], builder=builder,
                            base=_base_of(active))
        fresh = open_bundle(data, trusted, content=held(active))
        active = open_bundle(data, trusted, content=held(active), base=active)
        assert active._spans == fresh.spans is not None
    assert proofs == [True] * 3


def test_a_manifest_laid_out_from_misplaced_runs_is_refused_with_base_as_without(base, signing_key, trusted):
    # A bundle opened by proof whose head is longer than its base's; then a manifest that copies its
    # bytes from where its base's first entry began: cut mid-entry, not JSON. Only an index of the
    # wrong manifest would line those bytes up with entries.
    import hashlib

    import zstandard

    from overlay.format import manifest as _manifest

    files = {**FILES, "app.a": ("module", b"A = 2\n")}
    data = build_bundle(files, app_id="app", version=2, signers=[signing_key], base=_base_of(base),
                        builder={"user": "someone-with-a-long-name"})
    active = open_bundle(data, trusted, content=held(base), base=base)
    top = dict(active.manifest, version=3, parent=active.digest, builder={})
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"")
    top["payload"] = {"codec": "zstd-delta", "included": [], "size": len(frame),
                      "sha256": hashlib.sha256(frame).hexdigest(),
                      "uncompressed_size": active.manifest["payload"]["uncompressed_size"]}
    head, tail = _manifest.canonical_parts(top)
    lengths = active.spans.lengths
    start = base.spans.start  # where base's entries began, not this manifest's
    misplaced = active.manifest_bytes[start : start + sum(lengths) + len(lengths) - 1]
    forged = wrap(head.encode() + misplaced + tail.encode(), signing_key, frame)
    for kw in ({}, {"base": active}):
        with pytest.raises(BundleRejected) as info:
            open_bundle(forged, trusted, content=held(active), **kw)
        assert info.value.code == "bad_manifest"


def test_a_carried_entry_with_a_non_ascii_name_is_refused_with_base_as_without(base, signing_key, trusted):
    rows = sorted(rows_of(FILES) + [("app.\u00e9", "module", b"x = 1\n")])
    data = signed_bundle(signing_key, rows, parent=base.digest, included=["app.\u00e9"])
    for kw in ({}, {"base": base}):
        with pytest.raises(BundleRejected) as info:
            open_bundle(data, trusted, content=held(base), **kw)
        assert info.value.code == "bad_entry_name"
