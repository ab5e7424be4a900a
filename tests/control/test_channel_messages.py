"""The channel's signed messages and addresses (``overlay.channel``): unit tests, no Redis."""

from __future__ import annotations

import pytest

from overlay.channel import METHOD, is_channel_url, open_message, parse_url, path_of, seal, verify_record
from overlay.control import RequestVerifier
from overlay.errors import ConfigError, ControlRejected
from overlay.keys import load_trusted_keys


def _trust(key):
    return load_trusted_keys([key.public.line()])


def test_channel_urls_parse_with_tls_sentinel_and_credentials():
    plain = parse_url("redis://:s3cret@10.0.0.2:6379/3")
    assert (plain.hosts, plain.db, plain.password, plain.tls) == ((("10.0.0.2", 6379),), 3, "s3cret", False)
    assert "s3cret" not in str(plain)
    assert parse_url("rediss://cache.example:6380/0").tls
    sentinel = parse_url("redis+sentinel://s1:26379,s2/mymaster/1")
    assert (sentinel.hosts, sentinel.service, sentinel.db) == ((("s1", 26379), ("s2", 26379)), "mymaster", 1)
    assert is_channel_url("redis://h") and not is_channel_url("http://h:8000")


@pytest.mark.parametrize("url", ["http://h:6379", "redis://", "redis://h:6379/x", "redis+sentinel://s1:26379",
                                 "redis://a:1,b:2/0"])
def test_a_bad_channel_url_is_a_config_error_naming_the_fix(url):
    with pytest.raises(ConfigError, match="redis"):
        parse_url(url)


def test_a_sealed_message_verifies_once_for_its_op_and_app_only(signing_key):
    verifier = RequestVerifier(_trust(signing_key), "shop")
    op, body, auth, text = open_message(seal(signing_key, "shop", "prepare", {"txn": "t1", "action": "push"}))
    assert (op, body["txn"]) == ("prepare", "t1")
    assert verifier.verify(METHOD, path_of(op), auth, text) == signing_key.key_id
    with pytest.raises(ControlRejected) as replay:
        verifier.verify(METHOD, path_of(op), auth, text)
    assert replay.value.code == "replayed_request"
    _, _, auth2, text2 = open_message(seal(signing_key, "shop", "commit", {"txn": "t1"}))
    with pytest.raises(ControlRejected, match="does not verify"):  # a commit is not an apply
        verifier.verify(METHOD, path_of("apply"), auth2, text2)
    with pytest.raises(ControlRejected, match="does not verify"):  # nor an HTTP request
        verifier.verify("POST", path_of("commit"), auth2, text2)


def test_an_altered_body_or_a_body_naming_another_op_is_refused(signing_key):
    raw = seal(signing_key, "shop", "prepare", {"txn": "t1", "action": "push"})
    verifier = RequestVerifier(_trust(signing_key), "shop")
    _, _, auth, text = open_message(raw.replace(b'\\"push\\"', b'\\"rollback\\"'))
    with pytest.raises(ControlRejected, match="does not verify"):
        verifier.verify(METHOD, path_of("prepare"), auth, text)
    with pytest.raises(ControlRejected, match="another operation"):
        open_message(raw.replace(b'"op":"prepare"', b'"op":"apply"', 1))


def test_the_active_record_must_be_signed_by_a_trusted_key_for_this_app(signing_key, other_key):
    record = seal(signing_key, "shop", "active", {"txn": "t", "version": 3, "digest": "d" * 64})
    assert verify_record(record, _trust(signing_key), "shop")["version"] == 3
    with pytest.raises(ControlRejected, match="does not trust"):
        verify_record(seal(other_key, "shop", "active", {"version": 9}), _trust(signing_key), "shop")
    with pytest.raises(ControlRejected):
        verify_record(record, _trust(signing_key), "other")
    with pytest.raises(ControlRejected):  # a step is not a record
        verify_record(seal(signing_key, "shop", "commit", {"txn": "t"}), _trust(signing_key), "shop")


def test_a_sealed_message_carries_short_signature_fields_and_the_long_spelling_still_reads(signing_key):
    import json

    from overlay.control import H_APP, H_KEY, H_NONCE, H_SIG, H_TIME

    raw = seal(signing_key, "shop", "apply", {"txn": "t1"})
    outer = json.loads(raw)
    assert set(outer["auth"]) == {"k", "t", "n", "s"}  # each store reads every message: no header names
    verifier = RequestVerifier(_trust(signing_key), "shop")
    op, _, auth, text = open_message(raw)
    assert verifier.verify(METHOD, path_of(op), auth, text) == signing_key.key_id
    long = {H_KEY: outer["auth"]["k"], H_TIME: outer["auth"]["t"], H_NONCE: "other-nonce", H_SIG: outer["auth"]["s"],
            H_APP: "shop"}
    op, _, auth, text = open_message(json.dumps({**outer, "auth": long}).encode())
    with pytest.raises(ControlRejected, match="does not verify"):  # read, and checked: the nonce is signed
        verifier.verify(METHOD, path_of(op), auth, text)
