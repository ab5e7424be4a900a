"""The checks an unauthenticated request meets before its body is read (``overlay.serving.guard``)."""

from __future__ import annotations

import logging
import time

import pytest

from overlay.bundle import build_bundle, claimed_key_ids, open_bundle
from overlay.control import H_APP, H_KEY
from overlay.errors import BadSignature, ControlRejected, UntrustedKey, UploadFailed, WrongApp, printable
from overlay.format import delta
from overlay.format.wire import parse_sigblock
from overlay.keys import SigningKey, generate_signing_key, load_trusted_keys
from overlay.serving.guard import Refusals, UploadSlots, precheck


@pytest.fixture
def key(tmp_path) -> SigningKey:
    return generate_signing_key(tmp_path / "deploy")


def test_a_push_claiming_a_trusted_key_and_this_app_passes_the_claim_check(key) -> None:
    trusted = load_trusted_keys([key.public.line()])
    precheck(True, {H_KEY: f"SHA256:other,{key.key_id}", H_APP: "shop"}, trusted, "shop")


@pytest.mark.parametrize(("headers", "error", "code"), [
    ({}, BadSignature, "unsigned"),
    ({H_KEY: "SHA256:nobody"}, UntrustedKey, "unknown_key"),
    ({H_KEY: "{key}", H_APP: "other"}, WrongApp, "wrong_app"),
])
def test_a_push_whose_headers_claim_no_trusted_key_or_another_app_is_refused_unverified(key, headers, error,
                                                                                       code) -> None:
    trusted = load_trusted_keys([key.public.line()])
    headers = {k: v.format(key=key.key_id) for k, v in headers.items()}
    with pytest.raises(error) as raised:
        precheck(True, headers, trusted, "shop")
    assert raised.value.code == code and raised.value.unverified


def test_a_control_request_claiming_an_unknown_key_is_refused_before_its_body_is_read(key) -> None:
    trusted = load_trusted_keys([key.public.line()])
    with pytest.raises(ControlRejected) as raised:
        precheck(False, {H_KEY: "SHA256:\x1b[2Jnobody"}, trusted, "shop")
    assert raised.value.code == "unknown_key" and "\x1b" not in raised.value.message


def test_a_push_names_the_keys_of_its_first_signature_block_packed_or_not(key, tmp_path) -> None:
    other = generate_signing_key(tmp_path / "other")
    v1 = build_bundle({"app": ("module", b"x = 1\n")}, app_id="app", version=1, signers=[key, other])
    assert claimed_key_ids(v1) == (key.key_id, other.key_id)
    base = open_bundle(v1, load_trusted_keys([key.public.line()]), app_id="app")
    v2 = build_bundle({"app": ("module", b"x = 2\n")}, app_id="app", version=2, signers=[key], base=base)
    assert claimed_key_ids(delta.pack(v2, base, [other])) == (other.key_id,)  # the transport signature's
    assert claimed_key_ids(b"<html>") == ()


def test_a_signature_block_naming_a_key_id_with_control_characters_is_refused() -> None:
    kid = b"SHA256:\x1b[31m"
    with pytest.raises(BadSignature, match="not printable"):
        parse_sigblock(bytes([1, len(kid)]) + kid + b"\0" * 64)


def test_one_peer_never_holds_every_upload_slot() -> None:
    slots = UploadSlots(total=4, per_peer=3)
    with slots.slot("a"), slots.slot("a"), slots.slot("a"):
        with pytest.raises(UploadFailed) as raised, slots.slot("a"):
            pass
        assert raised.value.code == "too_many_uploads"
        with slots.slot("b"), pytest.raises(UploadFailed), slots.slot("c"):
            pass
    with slots.slot("a"):  # every slot given back
        pass


def test_unverified_refusals_are_counted_and_logged_at_most_once_per_window(caplog) -> None:
    refusals = Refusals(every=1.0)
    exc = UntrustedKey("no", key_ids=[])
    with caplog.at_level(logging.WARNING, logger="overlay.http"):
        for _ in range(1000):
            refusals.add(exc, "10.0.0.1\x1b[2J")
        time.sleep(1.05)
        refusals.add(exc, "10.0.0.2")
    lines = [r.getMessage() for r in caplog.records]
    assert refusals.total == 1001
    assert len(lines) == 2, lines
    assert lines[1].startswith("habanero: 1000 unverified requests refused")  # the rest of the first window
    assert all("\x1b" not in line for line in lines)


def test_printable_escapes_control_characters_and_bounds_the_length() -> None:
    assert printable("a\x1b[2J\u202eb") == "a\\x1b[2J\\u202eb"
    assert printable("x" * 500, 10) == "x" * 10 + "..."


def test_connection_limits_come_from_the_argument_then_the_environment_then_defaults(monkeypatch) -> None:
    from overlay.errors import ConfigError
    from overlay.http import ControlLimits
    from overlay.runtime.settings import resolve_control_limits

    assert resolve_control_limits(None) == ControlLimits(64, 10.0, 5.0)
    monkeypatch.setenv("HABANERO_MAX_CONNECTIONS", "8")
    monkeypatch.setenv("HABANERO_IDLE_TIMEOUT", "0.5")
    assert resolve_control_limits(None) == ControlLimits(8, 10.0, 0.5)
    assert resolve_control_limits(ControlLimits(max_connections=2)).max_connections == 2
    monkeypatch.setenv("HABANERO_REQUEST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="HABANERO_REQUEST_TIMEOUT"):
        resolve_control_limits(None)
