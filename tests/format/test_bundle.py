"""The bundle format: round trips, and every refusal with its stable code."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.bundle import FORMAT, Limits, build_bundle, open_bundle, read_unverified
from overlay.format.wire import MAGIC, signed_message
from overlay.errors import BundleRejected, HabaneroError
from overlay.keys import load_trusted_keys

FILES = {
    "app": ("package", b"from .util import helper\n"),
    "app.util": ("module", b"def helper():\n    return 42\n"),
    "app.sub": ("package", b""),
    "app.sub.deep": ("module", b"X = 'deep'\n" * 50),
    "app/templates/index.html": ("data", b"<h1>hello</h1>\n"),
    "app/static/logo.svg": ("data", b"<svg/>" * 100),
}


def _split(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    head = struct.Struct(">8sHHII")
    _, _, _, mlen, slen = head.unpack_from(data)
    start = head.size
    return data[:start], data[start : start + mlen], data[start + mlen : start + mlen + slen], data[start + mlen + slen :]


def _resign(manifest: dict, key, frame: bytes, *, fmt: int | None = None) -> bytes:
    """Build a bundle by hand, correctly signed for format ``fmt`` (the manifest's by default),
    around an arbitrary manifest and frame."""
    mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    fmt = manifest.get("format", FORMAT) if fmt is None else fmt
    kid = key.key_id.encode()
    sig = bytes([1, len(kid)]) + kid + key.sign(signed_message(fmt, mbytes))
    return struct.pack(">8sHHII", MAGIC, fmt, 0, len(mbytes), len(sig)) + mbytes + sig + frame


def _rejected(code: str, data: bytes, trusted, **kw) -> BundleRejected:
    with pytest.raises(BundleRejected) as info:
        open_bundle(data, trusted, **kw)
    assert info.value.code == code, info.value.message
    assert info.value.message
    return info.value


def test_round_trip_preserves_every_entry(make_bundle, trusted):
    bundle = open_bundle(make_bundle(FILES, version=3), trusted, app_id="app")
    assert bundle.version == 3 and bundle.app_id == "app" and bundle.parent is None
    assert {name: bundle.read(name) for name in bundle.entries} == {n: c for n, (_, c) in FILES.items()}
    assert [e.name for e in bundle.entries.values()] == sorted(FILES)
    assert bundle.entries["app.sub"].path == "app/sub/__init__.py"
    assert bundle.entries["app.util"].path == "app/util.py"
    assert bundle.key_ids == (next(iter(trusted)).key_id,)


def test_manifest_records_sizes_hashes_and_payload(make_bundle, trusted):
    bundle = open_bundle(make_bundle(FILES), trusted)
    m = json.loads(bundle.manifest_bytes)
    assert m["format"] == FORMAT == 2
    assert "entries" not in bundle.manifest and m["payload"] == bundle.manifest["payload"]
    total = 0
    for entry in m["entries"]:
        assert set(entry) == {"name", "kind", "size", "sha256"}  # offsets follow from the sizes
        assert entry["sha256"] == hashlib.sha256(FILES[entry["name"]][1]).hexdigest()
        total += entry["size"]
    assert m["payload"]["uncompressed_size"] == total
    assert m["payload"]["codec"] == "zstd"
    assert bundle.digest == hashlib.sha256(bundle.manifest_bytes).hexdigest()


def test_digest_names_parent_chain(make_bundle, trusted):
    first = open_bundle(make_bundle(FILES, version=1), trusted)
    second = open_bundle(make_bundle(FILES, version=2, parent=first.digest), trusted)
    assert second.parent == first.digest


def test_signature_from_second_of_two_keys_is_enough(make_bundle, signing_key, other_key, trusted):
    data = make_bundle(FILES, signers=[other_key, signing_key])
    assert open_bundle(data, trusted).key_ids == (signing_key.key_id,)


def test_unknown_key_is_refused_with_its_fingerprint(make_bundle, other_key, trusted):
    err = _rejected("unknown_key", make_bundle(FILES, signers=[other_key]), trusted)
    assert other_key.key_id in err.message and "trusted_keys" in err.message
    assert err.http_status == 401


def test_tampered_manifest_fails_signature(make_bundle, trusted):
    head, manifest, sig, frame = _split(make_bundle(FILES, version=1))
    forged = manifest.replace(b'"version":1', b'"version":9')
    _rejected("bad_signature", head + forged + sig + frame, trusted)


def test_signature_is_checked_before_the_manifest_is_parsed(make_bundle, trusted):
    head, manifest, sig, frame = _split(make_bundle(FILES))
    garbage = b"{" * len(manifest)  # unparseable JSON: must fail on signature, never reach the parser
    _rejected("bad_signature", head + garbage + sig + frame, trusted)


def test_unsigned_bundle_is_refused(make_bundle, trusted):
    head, manifest, _, frame = _split(make_bundle(FILES))
    head = head[:-4] + struct.pack(">I", 1)
    _rejected("unsigned", head + manifest + b"\x00" + frame, trusted)


def test_signature_for_another_domain_does_not_verify(make_bundle, signing_key, trusted):
    head, manifest, _, frame = _split(make_bundle(FILES))
    kid = signing_key.key_id.encode()
    sig = bytes([1, len(kid)]) + kid + signing_key.sign(manifest)  # no domain prefix
    _rejected("bad_signature", head[:-4] + struct.pack(">I", len(sig)) + manifest + sig + frame, trusted)


def test_wrong_app_is_refused(make_bundle, trusted):
    err = _rejected("wrong_app", make_bundle(FILES, app_id="other"), trusted, app_id="app")
    assert "the signer's app id 'other' differs from the app's, 'app'" in err.message


def test_unknown_format_and_bad_magic_are_refused(make_bundle, trusted):
    data = make_bundle(FILES)
    _rejected("unknown_format", b"NOTABUNDLE" + data[10:], trusted)
    newer = data[:8] + struct.pack(">H", FORMAT + 1) + data[10:]
    err = _rejected("unknown_format", newer, trusted)
    assert "upgrade habanero" in err.message


def test_oversized_bundle_is_refused_before_reading(make_bundle, trusted):
    data = make_bundle(FILES)
    _rejected("bundle_too_large", data, trusted, limits=Limits(max_bundle_bytes=len(data) - 1))


def test_oversized_manifest_is_refused(make_bundle, trusted):
    _rejected("manifest_too_large", make_bundle(FILES), trusted, limits=Limits(max_manifest_bytes=100))


def test_too_many_entries_and_entry_too_large_are_refused(make_bundle, trusted):
    data = make_bundle(FILES)
    _rejected("too_many_entries", data, trusted, limits=Limits(max_entries=3))
    _rejected("entry_too_large", data, trusted, limits=Limits(max_entry_bytes=100))
    _rejected("decompressed_too_large", data, trusted, limits=Limits(max_total_bytes=100))


def test_build_refuses_what_a_server_would_refuse(signing_key):
    with pytest.raises(BundleRejected) as info:
        build_bundle({"app": ("package", b"x" * 200)}, app_id="app", version=1, signers=[signing_key],
                     limits=Limits(max_entry_bytes=100))
    assert info.value.code == "entry_too_large"


def _manifest_for(payload: bytes, frame: bytes, entries: list[dict], **over) -> dict:
    manifest = {
        "format": FORMAT, "app_id": "app", "version": 1, "parent": None, "created": "2026-01-01T00:00:00Z",
        "builder": {}, "entries": entries,
        "payload": {"codec": "zstd", "size": len(frame), "uncompressed_size": len(payload),
                    "sha256": hashlib.sha256(frame).hexdigest()},
    }
    manifest.update(over)
    return manifest


def _entry(name, kind, content, offset=None):
    """A format 2 entry; with ``offset``, a format 1 entry."""
    entry = {"name": name, "kind": kind, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    return entry if offset is None else {**entry, "offset": offset}


def test_zstd_bomb_declaring_huge_content_size_is_refused_before_decompression(signing_key, trusted):
    # A 1 KiB frame whose header declares 256 MiB of content, in a bundle whose manifest declares 16
    # bytes: decompress() would allocate what the frame declares, so the header is checked first.
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (1 << 28))
    assert len(bomb) < 64 << 10 and zstandard.frame_content_size(bomb) == 1 << 28
    manifest = _manifest_for(b"a" * 16, bomb, [_entry("app", "package", b"a" * 16)])
    err = _rejected("bad_payload", _resign(manifest, signing_key, bomb), trusted)
    assert str(1 << 28) in err.message


def test_manifest_declaring_more_than_the_cap_is_refused(signing_key, trusted):
    content = b"a" * 1000
    frame = zstandard.ZstdCompressor().compress(content)
    manifest = _manifest_for(content, frame, [_entry("app", "package", content)])
    _rejected("decompressed_too_large", _resign(manifest, signing_key, frame), trusted,
              limits=Limits(max_total_bytes=999))


def test_decompression_past_declared_size_is_refused(signing_key, trusted):
    # No content size in the frame header, a manifest that declares less than the frame holds.
    content = b"x" * 100_000
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(content)
    manifest = _manifest_for(b"x" * 10, frame, [_entry("app", "package", b"x" * 10)])
    with pytest.raises(BundleRejected) as info:
        open_bundle(_resign(manifest, signing_key, frame), trusted)
    assert info.value.code in {"bad_payload", "decompressed_too_large"}


def test_truncated_frame_is_refused(signing_key, trusted):
    content = bytes(range(256)) * 400
    frame = zstandard.ZstdCompressor().compress(content)[:-7]  # cut inside the frame
    manifest = _manifest_for(content, frame, [_entry("app", "package", content)])
    _rejected("truncated", _resign(manifest, signing_key, frame), trusted)


def test_truncated_file_is_refused(make_bundle, trusted):
    data = make_bundle(FILES)
    _rejected("truncated", data[:-5], trusted)
    _rejected("truncated", data[:40], trusted)


def test_trailing_bytes_after_the_payload_are_refused(make_bundle, trusted):
    _rejected("trailing_data", make_bundle(FILES) + b"junk", trusted)


def test_trailing_bytes_inside_the_signed_payload_are_refused(signing_key, trusted):
    content = b"VALUE = 1\n"
    frame = zstandard.ZstdCompressor().compress(content) + b"\x00extra"
    manifest = _manifest_for(content, frame, [_entry("app", "package", content)])
    _rejected("trailing_data", _resign(manifest, signing_key, frame), trusted)


def test_payload_hash_mismatch_is_refused(signing_key, trusted):
    content = b"VALUE = 1\n"
    frame = zstandard.ZstdCompressor().compress(content)
    manifest = _manifest_for(content, frame, [_entry("app", "package", content)])
    manifest["payload"]["sha256"] = "0" * 64
    _rejected("payload_hash_mismatch", _resign(manifest, signing_key, frame), trusted)


def test_entry_hash_mismatch_is_refused(signing_key, trusted):
    content = b"VALUE = 1\n"
    frame = zstandard.ZstdCompressor().compress(content)
    entry = _entry("app", "package", content)
    entry["sha256"] = hashlib.sha256(b"other").hexdigest()
    _rejected("entry_hash_mismatch", _resign(_manifest_for(content, frame, [entry]), signing_key, frame), trusted)


def test_duplicate_json_keys_are_refused(signing_key, trusted):
    content = b"VALUE = 1\n"
    frame = zstandard.ZstdCompressor().compress(content)
    manifest = _manifest_for(content, frame, [_entry("app", "package", content)])
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    text = text.replace('"version":1', '"version":1,"version":999')
    mbytes = text.encode()
    kid = signing_key.key_id.encode()
    sig = bytes([1, len(kid)]) + kid + signing_key.sign(signed_message(FORMAT, mbytes))
    data = struct.pack(">8sHHII", MAGIC, FORMAT, 0, len(mbytes), len(sig)) + mbytes + sig + frame
    err = _rejected("bad_manifest", data, trusted)
    assert "version" in err.message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": True}, "wrong type"),
        ({"version": 0}, "positive"),
        ({"parent": "abc"}, "digest"),
        ({"extra": 1}, "unknown"),
        ({"app_id": ""}, "app_id"),
    ],
)
def test_malformed_manifest_fields_are_refused(signing_key, trusted, change, message):
    content = b"VALUE = 1\n"
    frame = zstandard.ZstdCompressor().compress(content)
    manifest = _manifest_for(content, frame, [_entry("app", "package", content)], **change)
    err = _rejected("bad_manifest", _resign(manifest, signing_key, frame), trusted)
    assert message in err.message


def _format_1(a: bytes, b: bytes, *, second_at: int) -> tuple[dict, bytes]:
    frame = zstandard.ZstdCompressor().compress(a + b)
    entries = [_entry("app", "package", a, offset=0), _entry("app.b", "module", b, offset=second_at)]
    return _manifest_for(a + b, frame, entries, format=1), frame


def test_a_format_1_bundle_is_still_read(signing_key, trusted):
    # Stores written before format 2 hold format 1 bundles: signed over the whole manifest, with offsets.
    a, b = b"A = 1\n", b"B = 2\n"
    manifest, frame = _format_1(a, b, second_at=len(a))
    bundle = open_bundle(_resign(manifest, signing_key, frame), trusted)
    assert bundle.format == 1 and bundle.read("app") == a and bundle.read("app.b") == b


def test_non_contiguous_offsets_of_a_format_1_bundle_are_refused(signing_key, trusted):
    a, b = b"A = 1\n", b"B = 2\n"
    manifest, frame = _format_1(a, b, second_at=len(a) + 1)
    _rejected("bad_manifest", _resign(manifest, signing_key, frame), trusted)


def test_an_offset_in_a_format_2_entry_is_refused(signing_key, trusted):
    a = b"A = 1\n"
    frame = zstandard.ZstdCompressor().compress(a)
    manifest = _manifest_for(a, frame, [_entry("app", "package", a, offset=0)])
    err = _rejected("bad_manifest", _resign(manifest, signing_key, frame), trusted)
    assert "offset" in err.message


@pytest.mark.parametrize("signed_as, header", [(1, 2), (2, 1)], ids=["v1 signature, v2 header", "v2 signature, v1 header"])
def test_a_signature_for_the_other_format_is_refused(signing_key, trusted, signed_as, header):
    # The signed message depends on the format: relabelling a bundle's header cannot reuse its signature.
    a = b"A = 1\n"
    frame = zstandard.ZstdCompressor().compress(a)
    entry = _entry("app", "package", a, offset=0 if header == 1 else None)
    data = _resign(_manifest_for(a, frame, [entry], format=header), signing_key, frame, fmt=signed_as)
    data = data[:8] + struct.pack(">H", header) + data[10:]
    _rejected("bad_signature", data, trusted)


def test_a_header_and_manifest_of_different_formats_are_refused(signing_key, trusted):
    a = b"A = 1\n"
    frame = zstandard.ZstdCompressor().compress(a)
    manifest = _manifest_for(a, frame, [_entry("app", "package", a, offset=0)], format=1)
    err = _rejected("unknown_format", _resign(manifest, signing_key, frame, fmt=2), trusted)
    assert "header says format 2" in err.message


@pytest.mark.parametrize(
    "name, kind",
    [
        ("app/../etc/passwd", "data"),
        ("/etc/passwd", "data"),
        ("app\\evil.txt", "data"),
        ("app/x\x00.txt", "data"),
        ("app//x.txt", "data"),
        ("app/./x.txt", "data"),
        ("app/ѕecret.txt", "data"),  # Cyrillic look-alike
        ("app/native.so", "data"),
        ("app/native.pyd", "data"),
        ("app/cached.pyc", "data"),
        ("app/hook.pth", "data"),
        ("app/.hidden", "data"),
        ("app.class", "module"),
        ("app.9lives", "module"),
        ("аpp", "package"),  # Cyrillic a
        ("app..x", "module"),
        ("app.x", "widget"),
    ],
)
def test_bad_entry_names_are_refused(signing_key, trusted, name, kind):
    root = b"ROOT = 1\n"
    content = b"payload"
    rows = sorted([("app", "package", root), (name, kind, content)])
    payload, entries = b"", []
    for n, k, c in rows:
        entries.append(_entry(n, k, c))
        payload += c
    frame = zstandard.ZstdCompressor().compress(payload)
    _rejected("bad_entry_name", _resign(_manifest_for(payload, frame, entries), signing_key, frame), trusted)
    with pytest.raises(BundleRejected):
        build_bundle({"app": ("package", root), name: (kind, content)}, app_id="app", version=1,
                     signers=[signing_key])


def test_duplicate_and_unsorted_entries_are_refused(signing_key, trusted):
    a = b"A = 1\n"
    frame = zstandard.ZstdCompressor().compress(a + a)
    entries = [_entry("app", "package", a), _entry("app", "package", a)]
    _rejected("bad_entry_name", _resign(_manifest_for(a + a, frame, entries), signing_key, frame), trusted)


def test_module_outside_a_bundled_package_is_refused(signing_key):
    with pytest.raises(BundleRejected) as info:
        build_bundle({"app.mod": ("module", b"")}, app_id="app", version=1, signers=[signing_key])
    assert info.value.code == "bad_entry_name" and "__init__" in info.value.message


def test_data_file_shadowing_a_module_is_refused(signing_key):
    with pytest.raises(BundleRejected) as info:
        build_bundle({"app": ("package", b""), "app.mod": ("module", b""), "app/mod.py": ("data", b"x")},
                     app_id="app", version=1, signers=[signing_key])
    assert info.value.code == "bad_entry_name"


def test_read_unverified_shows_manifest_and_claimed_keys(make_bundle, signing_key):
    manifest, key_ids = read_unverified(make_bundle(FILES, version=4))
    assert manifest["version"] == 4 and key_ids == (signing_key.key_id,)


def test_errors_carry_code_and_json_shape(make_bundle, trusted):
    err = _rejected("trailing_data", make_bundle(FILES) + b"!", trusted)
    assert err.to_dict()["code"] == "trailing_data" and err.to_dict()["message"] == err.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_flip_or_truncation_ends_in_a_habanero_error(data, signing_key, trusted_keys_file):
    trusted = load_trusted_keys(trusted_keys_file)
    bundle = build_bundle(FILES, app_id="app", version=1, signers=[signing_key])
    mutation = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(bundle) - 1))
    if mutation == "flip":
        bit = data.draw(st.integers(0, 7))
        mutated = bundle[:pos] + bytes([bundle[pos] ^ (1 << bit)]) + bundle[pos + 1 :]
    elif mutation == "truncate":
        mutated = bundle[:pos]
    else:
        mutated = bundle[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + bundle[pos:]
    with pytest.raises(HabaneroError):
        open_bundle(mutated, trusted, app_id="app")


def test_a_forged_signature_is_refused_after_one_check_however_many_it_lists(signing_key, other_key, monkeypatch):
    # Key ids are public: a forger can list several trusted ones. Each check hashes what is signed
    # (a packed push's whole body), so the first that fails refuses the bundle.
    from overlay import keys
    from overlay.keys import TrustedKeys

    trusted = TrustedKeys([signing_key.public, other_key.public], source="test keys")
    data = bytearray(build_bundle(FILES, app_id="app", version=1, signers=[signing_key, other_key]))
    head, manifest, sigblock, _ = _split(bytes(data))
    first_sig = len(head) + len(manifest) + 2 + sigblock[1]  # count, id length, id
    data[first_sig] ^= 1
    checks = []
    real = keys.PublicKey.verify
    monkeypatch.setattr(keys.PublicKey, "verify", lambda self, *a: checks.append(self) or real(self, *a))
    _rejected("bad_signature", bytes(data), trusted)
    assert len(checks) == 1
