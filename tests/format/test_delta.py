"""Delta pushes: only what changed travels, and the server rebuilds and verifies the whole snapshot."""

from __future__ import annotations

import struct
import threading

import pytest
import zstandard

from overlay.format import delta as _delta
from overlay.format.delta import pack
from overlay.bundle import ParentManifest, build_bundle, open_bundle
from overlay.errors import BundleRejected, ParentMissing

BIG = {"app": ("package", b"")}
for _p in range(20):
    BIG[f"app.p{_p}"] = ("package", b"")
    for _m in range(50):
        BIG[f"app.p{_p}.m{_m}"] = ("module", "".join(
            f"def handler_{i}(request, limit={_m}):\n    return request.get('k{i}', {i}) + limit\n\n"
            for i in range(12)).encode())


def _one_line_change(files: dict) -> dict:
    changed = dict(files)
    kind, body = files["app.p7.m13"]
    changed["app.p7.m13"] = (kind, body.replace(b"return request.get('k3', 3)", b"return request.get('k3', 4)"))
    return changed


@pytest.fixture
def v1(signing_key, trusted):
    return open_bundle(build_bundle(BIG, app_id="app", version=1, signers=[signing_key]), trusted)


def _held(bundle):
    by_hash = {e.sha256: bundle.read(n) for n, e in bundle.entries.items()}
    return by_hash.get


def test_one_line_change_in_1000_modules_sends_under_4_kb(v1, signing_key, trusted):
    base = ParentManifest.from_manifest(v1.manifest_bytes)
    canonical = build_bundle(_one_line_change(BIG), app_id="app", version=2, signers=[signing_key], base=base)
    wire = pack(canonical, base, [signing_key])
    assert len(v1.raw) > 100_000  # the full bundle: mostly manifest
    assert len(wire) < 4096
    opened = open_bundle(wire, trusted, app_id="app", content=_held(v1),
                         base_manifest={v1.digest: v1.manifest_bytes}.get)
    assert opened.manifest["payload"]["included"] == ["app.p7.m13"]
    assert opened.read("app.p7.m13") == _one_line_change(BIG)["app.p7.m13"][1]
    assert opened.read("app.p1.m1") == BIG["app.p1.m1"][1]
    assert opened.raw == canonical  # the store keeps the unpacked form


def test_delta_without_the_parent_content_is_refused_as_parent_missing(v1, signing_key, trusted):
    base = ParentManifest.from_manifest(v1.manifest_bytes)
    canonical = build_bundle(_one_line_change(BIG), app_id="app", version=2, signers=[signing_key], base=base)
    with pytest.raises(ParentMissing) as info:
        open_bundle(canonical, trusted, content={}.get)
    assert info.value.code == "parent_missing" and info.value.http_status == 409
    with pytest.raises(ParentMissing):
        open_bundle(pack(canonical, base, [signing_key]), trusted, content=_held(v1), base_manifest={}.get)


def test_packed_push_from_an_untrusted_key_is_refused_before_inflating(v1, signing_key, other_key, trusted):
    base = ParentManifest.from_manifest(v1.manifest_bytes)
    canonical = build_bundle(_one_line_change(BIG), app_id="app", version=2, signers=[other_key], base=base)
    wire = pack(canonical, base, [other_key])
    inflated = []

    def lookup(digest):
        inflated.append(digest)
        return v1.manifest_bytes

    with pytest.raises(BundleRejected) as info:
        open_bundle(wire, trusted, content=_held(v1), base_manifest=lookup)
    assert info.value.code == "unknown_key" and inflated == []


def test_tampered_packed_manifest_fails_the_transport_signature(v1, signing_key, trusted):
    base = ParentManifest.from_manifest(v1.manifest_bytes)
    wire = bytearray(pack(build_bundle(_one_line_change(BIG), app_id="app", version=2, signers=[signing_key],
                                       base=base), base, [signing_key]))
    wire[-20] ^= 1
    with pytest.raises(BundleRejected) as info:
        open_bundle(bytes(wire), trusted, content=_held(v1), base_manifest={v1.digest: v1.manifest_bytes}.get)
    assert info.value.code == "bad_signature"


def test_packed_manifest_declaring_more_than_the_cap_is_refused(v1, signing_key, trusted):
    from overlay.format import delta as _delta
    from overlay.format.wire import FLAG_PACKED, FORMAT, HEADER as _HEADER, MAGIC, sign_block

    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"{" * (16 << 20))
    base_raw = bytes.fromhex(v1.digest)
    body = bomb + b"\x00"
    sigs = sign_block(_delta.TRANSPORT_DOMAIN + base_raw + body, [signing_key])
    wire = (_HEADER.pack(MAGIC, FORMAT, FLAG_PACKED, len(bomb), 1) + base_raw + struct.pack(">I", len(sigs))
            + sigs + body)
    with pytest.raises(BundleRejected) as info:
        open_bundle(wire, trusted, base_manifest={v1.digest: v1.manifest_bytes}.get)
    assert info.value.code == "manifest_too_large"


def test_every_entry_hash_is_still_checked_after_rebuilding(v1, signing_key, trusted):
    base = ParentManifest.from_manifest(v1.manifest_bytes)
    canonical = build_bundle(_one_line_change(BIG), app_id="app", version=2, signers=[signing_key], base=base)
    lying = {e.sha256: b"not what you think" for e in v1.entries.values()}.get
    with pytest.raises(BundleRejected) as info:
        open_bundle(canonical, trusted, content=lying)
    assert info.value.code == "entry_hash_mismatch"


def _packed_pushes(v1, key, count):
    base = ParentManifest.from_manifest(v1.manifest_bytes)
    pushes = []
    for i in range(count):
        files = dict(BIG, **{"app.p3.m3": ("module", f"VERSION = {i}\n".encode())})
        pushes.append(pack(build_bundle(files, app_id="app", version=2 + i, signers=[key], base=base), base, [key]))
    return pushes


def test_packed_pushes_against_the_same_base_reuse_one_decompressor(v1, signing_key, trusted, monkeypatch):
    monkeypatch.setattr(_delta, "_idle", {})
    first, second = _packed_pushes(v1, signing_key, 2)
    lookup = {v1.digest: v1.manifest_bytes}.get
    open_bundle(first, trusted, content=_held(v1), base_manifest=lookup)
    held = _delta._idle[v1.digest]
    opened = open_bundle(second, trusted, content=_held(v1), base_manifest=lookup)
    assert _delta._idle[v1.digest][1] is held[1]
    assert opened.read("app.p3.m3") == b"VERSION = 1\n"


def test_a_decompressor_is_reused_only_for_the_same_base_bytes(monkeypatch):
    monkeypatch.setattr(_delta, "_idle", {})
    digest = "ab" * 32
    first = _delta._take(digest, b"one manifest")
    _delta._give_back(digest, b"one manifest", first)
    assert _delta._take(digest, b"another manifest") is not first  # whatever digest a lookup claims
    for i in range(5):
        _delta._give_back(f"{i:064x}", b"m", _delta._take(f"{i:064x}", b"m"))
    assert len(_delta._idle) == _delta._KEEP


def test_packed_pushes_opened_on_several_threads_at_once_are_each_right(v1, signing_key, trusted):
    pushes = _packed_pushes(v1, signing_key, 4)
    lookup = {v1.digest: v1.manifest_bytes}.get
    results: dict[int, list[bytes]] = {i: [] for i in range(len(pushes))}

    def push(i):
        for _ in range(10):
            results[i].append(open_bundle(pushes[i], trusted, content=_held(v1), base_manifest=lookup,
                                          base=v1).read("app.p3.m3"))

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(pushes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [f"VERSION = {i}\n".encode()] * 10 for i in range(len(pushes))}
