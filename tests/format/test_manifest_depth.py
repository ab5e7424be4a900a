"""Manifest nesting is bounded: a manifest deeper than ``MAX_DEPTH`` is refused by name, from its
bytes, before any parser or check recurses into it, so no depth reaches a ``RecursionError``."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.bundles import FILES, delta_push, held, wrap

from overlay.bundle import build_bundle, open_bundle
from overlay.errors import BadManifest, BundleRejected
from overlay.format.manifest import MAX_DEPTH, nesting_depth, nesting_exceeds, parse_manifest


def _nested(depth: int, kind: str = "list") -> str:
    """JSON text of ``depth`` levels of lists (or of objects ``{"k": ...}``) around a 1."""
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"k":' * depth + "1" + "}" * depth


def _builder_manifest(base, builder_json: str) -> bytes:
    """The base's manifest as a version 2, with its builder's JSON text replaced by ``builder_json``."""
    text = json.dumps(dict(json.loads(base.manifest_bytes), version=2, builder={"x": 0}),
                      sort_keys=True, separators=(",", ":"))
    return text.replace('"builder":{"x":0}', f'"builder":{builder_json}', 1).encode()


def _refused_by_depth(raw: bytes) -> BadManifest:
    with pytest.raises(BadManifest) as info:
        parse_manifest(raw)
    err = info.value
    assert f"more than {MAX_DEPTH} levels" in err.message
    # Refused up front: nothing was tried (and caught) on the way, a RecursionError least of all.
    assert err.__context__ is None and err.__cause__ is None
    return err


@pytest.mark.parametrize("depth", [10, 100, 10_000, 100_000])
@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_deep_value_is_refused_naming_the_limit(depth, kind):
    _refused_by_depth(_nested(depth, kind).encode())
    _refused_by_depth(f'{{"format":2,"entries":{_nested(depth, kind)}}}'.encode())


def test_a_hundred_thousand_brackets_are_refused_quickly():
    raw = b"[" * 100_000 + b"]" * 100_000
    started = time.perf_counter()
    _refused_by_depth(raw)
    assert time.perf_counter() - started < 0.5
    _refused_by_depth(b"[" * 100_000)  # never closed: still the depth, not a parser's recursion


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 10, 100, 10_000])
@pytest.mark.parametrize("with_base", [False, True], ids=["no base", "base"])
def test_the_builder_field_is_bounded_in_a_signed_bundle(depth, with_base, base, signing_key, trusted):
    # builder is level 2 of the manifest: its own depth counts from there.
    raw = _builder_manifest(base, _nested(depth, "object"))
    data = wrap(raw, signing_key, base.raw[-base.manifest["payload"]["size"]:])
    kw = {"base": base} if with_base else {}
    if 1 + depth <= MAX_DEPTH:
        assert nesting_depth(open_bundle(data, trusted, **kw).manifest["builder"]) == depth
        return
    with pytest.raises(BundleRejected) as info:
        open_bundle(data, trusted, **kw)
    assert info.value.code == "bad_manifest"
    assert f"more than {MAX_DEPTH} levels" in info.value.message
    assert info.value.__context__ is None


def test_a_delta_push_with_a_deep_builder_is_refused_on_the_proof_path_too(base, signing_key, trusted):
    push = delta_push({**FILES, "app.a": ("module", b"A = 2\n")}, base, signing_key)
    manifest = open_bundle(push, trusted, content=held(base), base=base).manifest_bytes
    deep = manifest.replace(b'"builder":{', b'"builder":{"deep":' + _nested(50).encode() + b",", 1)
    assert deep != manifest
    payload = push[-json.loads(manifest)["payload"]["size"]:]
    with pytest.raises(BadManifest, match=f"more than {MAX_DEPTH} levels"):
        open_bundle(wrap(deep, signing_key, payload), trusted, content=held(base), base=base)


def test_a_builder_too_deep_to_read_back_is_never_built(signing_key):
    with pytest.raises(BadManifest, match="builder nests more than"):
        build_bundle(FILES, app_id="app", version=1, signers=[signing_key], builder=json.loads(_nested(MAX_DEPTH, "object")))
    build_bundle(FILES, app_id="app", version=1, signers=[signing_key],
                 builder=json.loads(_nested(MAX_DEPTH - 1, "object")))


@pytest.mark.parametrize("text", [
    '{"note": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',          # brackets in a string are text
    '{"note": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\""}',      # ... behind an escaped quote too
    '{"note": "\\\\", "a": [[[[1]]]]}',                        # an escaped backslash ends no string
    '{"a": "]]]]]]]]]]]]]]]]", "b": "{{{{{{{{{{{{{{{{"}',
])
def test_brackets_inside_strings_do_not_count(text):
    assert not nesting_exceeds(text.encode(), MAX_DEPTH)
    assert parse_manifest(text.encode()) == json.loads(text)


def test_a_string_cannot_hide_depth():
    # Closing brackets inside strings must not cancel the real ones around them.
    hidden = "[" * 5 + '"]]]]]]]]]]"' + "," + "[" * 5 + "1" + "]" * 10
    assert nesting_depth(json.loads(hidden)) == 10
    assert nesting_exceeds(hidden.encode(), MAX_DEPTH)


_STRINGS = st.text(alphabet='[]{}"\\ax:,é', max_size=6)
_VALUES = st.recursive(st.none() | st.integers() | _STRINGS,
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_STRINGS, inner, max_size=3),
                       max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES, indent=st.sampled_from([None, 1]), ascii_only=st.booleans(), limit=st.integers(0, 12))
def test_the_byte_scan_agrees_with_the_parsed_depth(value, indent, ascii_only, limit):
    raw = json.dumps(value, indent=indent, ensure_ascii=ascii_only).encode()
    assert nesting_exceeds(raw, limit) == (nesting_depth(value) > limit)
